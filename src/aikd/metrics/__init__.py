"""Evaluation: error rates, macro F1, calibration and likelihood."""

from aikd.metrics.classification import classification_metrics, predict, topk_error

__all__ = ["classification_metrics", "predict", "topk_error"]
