"""DKD (decoupled knowledge distillation, Zhao et al. CVPR 2022), as mdistiller implements it.

With b = [p_y, 1 - p_y] the binary target / non-target split of p(z; T):

    TCKD = T^2 KL(b_T || b_S)
    NCKD = T^2 KL(softmax(z_T / T - 1000 q) || softmax(z_S / T - 1000 q))   (target class masked out)
    L    = CE + min((t + 1) / warmup, 1) (alpha TCKD + beta NCKD)   (t 0-based: mdistiller counts from 1)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aikd.methods.base import Batch, Method, StepOutput, hard_labels, non_negative, positive, register_method
from aikd.methods.functional import kl_per_sample, one_hot


def binary_split(probs: Tensor, target_mask: Tensor) -> Tensor:
    """[p_target, 1 - p_target] per sample, from class probabilities."""
    p_t = (probs * target_mask).sum(dim=1, keepdim=True)
    p_rest = (probs * (1 - target_mask)).sum(dim=1, keepdim=True)
    return torch.cat([p_t, p_rest], dim=1)


def tckd_rows(student_probs: Tensor, teacher_probs: Tensor, target_mask: Tensor) -> Tensor:
    """Target-class KD of every sample, without T^2: KL between the binary target / non-target distributions,
    from the class probabilities at T (DKD's and AEKT's TCKD)."""
    b_s, b_t = binary_split(student_probs, target_mask), binary_split(teacher_probs, target_mask)
    return kl_per_sample(b_t, b_s.clamp_min(1e-30).log())


def nckd_rows(student_logits: Tensor, teacher_logits: Tensor, target_mask: Tensor, temperature: float) -> Tensor:
    """Non-target-class KD of every sample, without T^2: KL among the non-target classes (target logit pushed
    down by 1000; DKD's and AEKT's NCKD). mdistiller masks after the division, so the target logit is always
    1000 below the others."""
    p_t = F.softmax(teacher_logits / temperature - 1000.0 * target_mask, dim=1)
    log_p_s = F.log_softmax(student_logits / temperature - 1000.0 * target_mask, dim=1)
    return kl_per_sample(p_t, log_p_s)


def tckd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Target-class KD: KL between the binary target / non-target distributions, times T^2."""
    mask = one_hot(labels, student_logits.shape[1])
    rows = tckd_rows(F.softmax(student_logits / temperature, dim=1), F.softmax(teacher_logits / temperature, dim=1),
                     mask)
    return temperature**2 * rows.mean()


def nckd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Non-target-class KD: KL among the non-target classes (target logit pushed down by 1000), times T^2."""
    mask = one_hot(labels, student_logits.shape[1])
    return temperature**2 * nckd_rows(student_logits, teacher_logits, mask, temperature).mean()


def dkd_warmup(epoch: int, warmup: int) -> float:
    return min((epoch + 1) / warmup, 1.0) if warmup > 0 else 1.0


@dataclass
class DKDConfig:
    alpha: float = 1.0  # TCKD weight
    beta: float = 8.0  # NCKD weight
    temperature: float = 4.0
    warmup: int = 20  # epochs of linear ramp of the KD terms
    ce_weight: float = 1.0

    def __post_init__(self) -> None:
        for key in ("alpha", "beta", "warmup", "ce_weight"):
            non_negative(f"dkd.{key}", getattr(self, key))
        positive("dkd.temperature", self.temperature)


@register_method("dkd", DKDConfig)
class DKD(Method):
    label = "DKD"

    requires_teacher = True

    @classmethod
    def loss_terms(cls, hparams: DKDConfig) -> set[str]:
        return {"ce", "tckd", "nckd"}

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        h = self.hparams
        logits = model(batch.images)
        teacher_logits = self.teacher_logits(batch.images)
        labels = hard_labels(batch.targets)
        ramp = dkd_warmup(batch.epoch, h.warmup)
        tckd = tckd_loss(logits.float(), teacher_logits, labels, h.temperature)
        nckd = nckd_loss(logits.float(), teacher_logits, labels, h.temperature)
        return StepOutput(logits, {
            "ce": h.ce_weight * F.cross_entropy(logits, batch.targets),
            "tckd": ramp * h.alpha * tckd,
            "nckd": ramp * h.beta * nckd,
        })
