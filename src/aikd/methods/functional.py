"""Loss building blocks shared by several methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """(N,) class indices -> (N, C) one-hot rows of ``dtype``.

    Not ``F.one_hot``: on the CPU it checks the labels' range with two ``.item()`` calls, which a host-sync
    count (src/aikd/bench/syncs.py) cannot tell from a GPU's; a scatter has no such check on any device.
    """
    rows = torch.zeros(labels.shape[0], num_classes, dtype=dtype, device=labels.device)
    return rows.scatter_(1, labels.unsqueeze(1), 1)


def target_probs(targets: Tensor, num_classes: int) -> Tensor:
    """Targets as (N, C) class probabilities: soft targets (a mixed batch's, CutMix or MixUp) as they are, class
    indices as one-hot float32 rows. What the methods that mix labels with other targets start from."""
    return targets if targets.ndim == 2 else one_hot(targets, num_classes)


def distillation_kl(target_logits: Tensor, student_logits: Tensor, temperature: float) -> Tensor:
    """T^2 KL(p(target; T) || p(student; T)), summed over classes, mean over the batch.

    The T^2 factor keeps the gradient scale independent of T (Hinton et al.).
    """
    return temperature * temperature * kl_rows_at(target_logits, student_logits, temperature).mean()


def kl_rows_at(target_logits: Tensor, student_logits: Tensor, temperature: float) -> Tensor:
    """KL(p(target; T) || p(student; T)) of every row, without the T^2 factor (BSS's, per sample for its masks)."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_target = F.log_softmax(target_logits / temperature, dim=1)
    return (log_p_target.exp() * (log_p_target - log_p_student)).sum(dim=1)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """The mean of ``values`` over the rows ``mask`` keeps, exactly 0 when it keeps none.

    Fixed shapes: selecting the rows instead (``values[mask]``) has a size only the device knows, so
    a GPU would stop and wait for it. The rows left out must be finite (0 x NaN is NaN).
    """
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1)


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """-sum_c target_c log p_c, mean over the batch (PS-KD's loss on soft targets)."""
    return -(target_probs * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def kl_per_sample(target_probs: Tensor, student_log_probs: Tensor) -> Tensor:
    """KL(target || student) of every sample, from probabilities and log-probabilities.

    Terms with a zero target probability contribute zero (0 log 0 = 0).
    """
    t = target_probs.clamp_min(1e-30)
    terms = target_probs * (t.log() - student_log_probs)
    return terms.where(target_probs > 0, torch.zeros_like(terms)).sum(dim=1)


def kl_from_probs(target_probs: Tensor, student_log_probs: Tensor) -> Tensor:
    """KL(target || student), summed over classes, mean over the batch."""
    return kl_per_sample(target_probs, student_log_probs).mean()
