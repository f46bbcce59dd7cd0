"""Baseline: plain cross-entropy (the paper's "Baseline" row)."""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import nn

from aikd.methods.base import Batch, Method, StepOutput, register_method


@register_method("ce")
class CrossEntropy(Method):
    """Cross-entropy with the label (or a mixed soft label)."""

    label = "Baseline"
    # Plain training twice as long: AI-KD's cost in epochs (phase 1 and 2), given to CE (``ce_equal_compute.yaml``);
    # CE with CutMix on every batch, the augmentation self-KD methods are compared with (``ce_cutmix.yaml``).
    recipe_rows: ClassVar[dict[str, tuple[int, str]]] = {"ce_equal_compute": (1, "CE, equal compute"),
                                                         "ce_cutmix": (2, "CE + CutMix")}

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        logits = model(batch.images)
        return StepOutput(logits, {"ce": F.cross_entropy(logits, batch.targets)})
