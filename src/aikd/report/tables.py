"""Markdown tables of run summaries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

COLUMNS = (("Top-1 err %", "top1_err", "{:.2f}"), ("Top-5 err %", "top5_err", "{:.2f}"),
           ("Macro F1", "macro_f1", "{:.4f}"), ("ECE %", "ece", "{:.2f}"),
           ("NLL", "nll", "{:.4f}"))


def markdown_table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """One row per (name, summary), the paper's metrics as columns."""
    head = "| Method | " + " | ".join(c[0] for c in COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(COLUMNS)
    body = ["| " + name + " | " + " | ".join(fmt.format(s[key]) for _, key, fmt in COLUMNS) + " |"
            for name, s in rows]
    return "\n".join([head, rule, *body])
