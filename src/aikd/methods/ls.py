"""Label smoothing (Szegedy et al., CVPR 2016, "Rethinking the Inception architecture", section 7).

Cross-entropy against the label mixed with the uniform distribution over the C classes:

    y_ls = (1 - eps) y + eps / C,        L = -sum_c y_ls,c log p_c    (batch mean)

``y`` is the one-hot label, or a mixed sample's soft label (mixup, CutMix), smoothed the same way. This is
exactly ``F.cross_entropy(logits, targets, label_smoothing=eps)`` for both kinds of target, which is the
drop-in form for a loop of your own (tests/test_ls.py holds the two equal). ``spread: others`` spreads eps
over the C - 1 other classes instead, (1 - eps) y + eps (1 - y) / (C - 1): the variant of
megvii-research/zipfls pytorch_zipfls/losses.py:50-59 (their LS baseline), for hard labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from aikd.methods.base import Batch, Method, StepOutput, register_method, require, weight
from aikd.methods.functional import one_hot, soft_cross_entropy

Spread = Literal["all", "others"]


def smoothed_targets(targets: Tensor, num_classes: int, eps: float, spread: Spread = "all") -> Tensor:
    """(1 - eps) y + eps / C (``all``), or (1 - eps) y + eps (1 - y) / (C - 1) (``others``), as (N, C) rows."""
    y = targets.float() if targets.ndim == 2 else one_hot(targets, num_classes)
    if spread == "all":
        return (1 - eps) * y + eps / num_classes
    return (1 - eps) * y + eps * (1 - y) / (num_classes - 1)


def label_smoothing_loss(logits: Tensor, targets: Tensor, eps: float = 0.1, spread: Spread = "all") -> Tensor:
    """-sum_c y_ls,c log softmax(z)_c, mean over the batch; ``targets`` class indices or (N, C) probabilities."""
    return soft_cross_entropy(logits.float(), smoothed_targets(targets, logits.shape[1], eps, spread))


@dataclass
class LSConfig:
    smoothing: float = 0.1  # eps (Szegedy et al. 2016; the Self-KD-Lib and zipfls CIFAR-100 runs)
    spread: Spread = "all"  # all: eps / C on every class (Szegedy, torch); others: eps / (C - 1) off the label

    def __post_init__(self) -> None:
        weight("ls.smoothing", self.smoothing)
        require(self.smoothing < 1, "ls.smoothing", self.smoothing, "must be below 1 (1 leaves no label)")


@register_method("ls", LSConfig)
class LabelSmoothing(Method):
    """Cross-entropy against smoothed labels: one term, ``ce``."""

    label = "Label smoothing"

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        logits = model(batch.images)
        loss = label_smoothing_loss(logits, batch.targets, self.hparams.smoothing, self.hparams.spread)
        return StepOutput(logits, {"ce": loss})
