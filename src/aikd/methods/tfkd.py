"""TF-KD (teacher-free KD, Yuan et al. CVPR 2020): two variants.

tfkd_self: the teacher is a pre-trained copy of the student's own architecture,

    L = (1 - a) CE(q, p_s) + a T^2 KL(p(z_T; T) || p(z_S; T)),   a = 0.95, T = 6

tfkd_reg: a hand-made "virtual teacher" puts 0.99 on the label and spreads
0.01 over the other classes; it is softened by tau and the student is not,

    p_d = 0.99 q + 0.01 / (C - 1) (1 - q)
    L = (1 - a) CE(q, p_s) + a KL(softmax(p_d / tau) || p_s),     a = 0.1, tau = 20

(both as the official code, which also softmaxes the probabilities p_d
themselves). The official code computes KL with ``nn.KLDivLoss()`` (mean over
batch x classes) times a multiplier; here KL is summed over classes and
averaged over the batch, which equals theirs when the multiplier is C. For
tfkd_self, ``tfkd_self.multiplier=M`` reproduces the official scaling exactly,
T^2 M / C times the batch-mean KL: its CIFAR-100 ResNet-18 recipe has M = 50,
half of the default's KD term at C = 100.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from aikd.methods.base import Batch, Method, StepOutput, positive, register_method, require, weight
from aikd.methods.functional import distillation_kl, kl_from_probs, target_probs


@dataclass
class TFKDSelfConfig:
    alpha: float = 0.95
    temperature: float = 6.0
    # None: KL summed over classes, mean over the batch. M: the official code's
    # nn.KLDivLoss() (mean over batch x classes) times its `multiplier` M (50 for CIFAR-100).
    multiplier: float | None = None

    def __post_init__(self) -> None:
        weight("tfkd_self.alpha", self.alpha)
        positive("tfkd_self.temperature", self.temperature)
        if self.multiplier is not None:
            positive("tfkd_self.multiplier", self.multiplier)


def tf_self_kd(teacher_logits: Tensor, student_logits: Tensor, temperature: float,
               multiplier: float | None = None) -> Tensor:
    """TF-KD self's distillation term before its weight: T^2 KL(p(z_T; T) || p(z_S; T)), batch mean;
    with ``multiplier`` M, the official T^2 M KL / C (the KL averaged over batch and classes)."""
    kd = distillation_kl(teacher_logits, student_logits, temperature)
    return kd if multiplier is None else kd * (multiplier / student_logits.shape[1])


@register_method("tfkd_self", TFKDSelfConfig)
class TFKDSelf(Method):
    """Distillation from a pre-trained copy of the same architecture."""

    label = "TF-KD (self)"

    requires_teacher = True
    teacher_same_architecture = True

    @classmethod
    def loss_terms(cls, hparams: TFKDSelfConfig) -> set[str]:
        return {"ce", "kd"}

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        h = self.hparams
        logits = model(batch.images)
        teacher_logits = self.teacher_logits(batch.images)
        return StepOutput(logits, {
            "ce": (1 - h.alpha) * F.cross_entropy(logits, batch.targets),
            "kd": h.alpha * tf_self_kd(teacher_logits, logits.float(), h.temperature, h.multiplier),
        })


def virtual_teacher(targets: Tensor, num_classes: int, correct_prob: float = 0.99) -> Tensor:
    """p_d: ``correct_prob`` on the label, the rest spread evenly; soft targets are mixed the same way."""
    q = target_probs(targets, num_classes)
    return correct_prob * q + (1 - correct_prob) / (num_classes - 1) * (1 - q)


def tf_reg_loss(logits: Tensor, targets: Tensor, alpha: float, tau: float,
                correct_prob: float = 0.99) -> tuple[Tensor, Tensor]:
    """The weighted terms ((1 - a) CE, a KL(softmax(p_d / tau) || p_s)) of TF-KD's regularizer."""
    teacher = F.softmax(virtual_teacher(targets, logits.shape[1], correct_prob) / tau, dim=1)
    ce = F.cross_entropy(logits, targets)
    return (1 - alpha) * ce, alpha * kl_from_probs(teacher, F.log_softmax(logits, dim=1))


@dataclass
class TFKDRegConfig:
    alpha: float = 0.1
    temperature: float = 20.0  # tau
    correct_prob: float = 0.99

    def __post_init__(self) -> None:
        weight("tfkd_reg.alpha", self.alpha)
        positive("tfkd_reg.temperature", self.temperature)
        require(0 < self.correct_prob < 1, "tfkd_reg.correct_prob", self.correct_prob, "is a probability in (0, 1)")


@register_method("tfkd_reg", TFKDRegConfig)
class TFKDReg(Method):
    """Label-smoothing-like regularization with a virtual teacher: no pre-trained model."""

    label = "TF-KD (reg)"

    @classmethod
    def loss_terms(cls, hparams: TFKDRegConfig) -> set[str]:
        return {"ce", "reg"}

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        h = self.hparams
        logits = model(batch.images)
        ce, reg = tf_reg_loss(logits.float(), batch.targets, h.alpha, h.temperature, h.correct_prob)
        return StepOutput(logits, {"ce": ce, "reg": reg})
