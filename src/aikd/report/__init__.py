"""Tables and plots made from run summaries."""
