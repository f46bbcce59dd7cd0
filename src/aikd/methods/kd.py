"""KD (Hinton et al. 2015): distillation from any trained teacher.

    L = (1 - a) CE(q, p_s) + a T^2 KL(p(z_T; T) || p(z_S; T))

The teacher may be a different, larger architecture; only the class count
must match. Defaults a = 0.9, T = 4 are the common CIFAR-100 setting
(mdistiller's KD recipe).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from aikd.methods.base import Batch, Method, StepOutput, positive, register_method, weight
from aikd.methods.functional import distillation_kl


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, alpha: float,
            temperature: float) -> tuple[Tensor, Tensor]:
    """The two weighted terms ((1 - a) CE, a T^2 KL) of Hinton's loss."""
    ce = F.cross_entropy(student_logits, targets)
    return (1 - alpha) * ce, alpha * distillation_kl(teacher_logits, student_logits, temperature)


@dataclass
class KDConfig:
    alpha: float = 0.9  # weight of the distillation term
    temperature: float = 4.0

    def __post_init__(self) -> None:
        weight("kd.alpha", self.alpha)
        positive("kd.temperature", self.temperature)


@register_method("kd", KDConfig)
class KD(Method):
    """Teacher-student KD; the teacher is frozen and runs under no_grad."""

    label = "KD"

    requires_teacher = True

    @classmethod
    def loss_terms(cls, hparams: KDConfig) -> set[str]:
        return {"ce", "kd"}

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        logits = model(batch.images)
        teacher_logits = self.teacher_logits(batch.images)
        ce, kd = kd_loss(logits.float(), teacher_logits, batch.targets, self.hparams.alpha, self.hparams.temperature)
        return StepOutput(logits, {"ce": ce, "kd": kd})
