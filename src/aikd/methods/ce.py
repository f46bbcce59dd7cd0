"""Baseline: plain cross-entropy (the paper's "Baseline" row)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from aikd.methods.base import Batch, Method, StepOutput, register_method


@register_method("ce")
class CrossEntropy(Method):
    """Cross-entropy with the label (or a mixed soft label)."""

    label, table_row = "Baseline", 0

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        logits = model(batch.images)
        return StepOutput(logits, {"ce": F.cross_entropy(logits, batch.targets)})
