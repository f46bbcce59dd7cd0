"""AEKT (adaptive explicit knowledge transfer, Park and Lee 2024): a documented reconstruction.

Only the abstract is public (docs/methods/aekt.md). It states three things,
each of which is a switch here (docs/methods/aekt.md gives the reasoning):

1. DKD's strength is an adaptive control of *implicit* knowledge (the
   non-target distribution). Classical KD weights NCKD by (1 - p_t^T), the
   teacher's non-target mass; ``implicit_weight`` chooses that adaptive weight
   or DKD's constant.
2. A loss that transfers *explicit* knowledge, the teacher's target-class
   confidence, adaptively: TCKD (the binary target / non-target KL) weighted
   per sample by ``explicit_weight``, a function of the teacher's and the
   student's target confidences p_t^T, p_t^S.
3. Classification and distillation are separated: a linear head g (C -> C,
   initialised to the identity) maps the student's logits to the ones the
   distillation losses see, while CE uses the logits themselves. g is trained
   with the student and dropped at inference (it is not part of the model).

    L = CE(z) + ramp(t) [alpha * mean_i(w_E,i TCKD_i(g(z))) + beta * mean_i(w_I,i NCKD_i(g(z)))]

With ``explicit_weight: one``, ``implicit_weight: one`` and ``head: false`` this
is exactly DKD (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aikd.methods.base import (
    Batch,
    Method,
    MethodContext,
    StepOutput,
    hard_labels,
    non_negative,
    positive,
    register_method,
)
from aikd.methods.dkd import dkd_warmup, nckd_rows, tckd_rows
from aikd.methods.functional import one_hot

ExplicitWeight = Literal["one", "teacher", "gap", "ratio"]
ImplicitWeight = Literal["one", "teacher_nontarget"]


def explicit_weight(kind: ExplicitWeight, p_teacher: Tensor, p_student: Tensor) -> Tensor:
    """Per-sample weight of the explicit (target-confidence) term; no gradient flows through it.

    one: 1 (DKD's TCKD). teacher: p_t^T (trust confident teachers). gap: 1 + |p_t^T - p_t^S|
    (push harder where the student's confidence is off). ratio: p_t^T / p_t^S, clipped to [0, 10].
    """
    p_teacher, p_student = p_teacher.detach(), p_student.detach()
    if kind == "one":
        return torch.ones_like(p_teacher)
    if kind == "teacher":
        return p_teacher
    if kind == "gap":
        return 1 + (p_teacher - p_student).abs()
    return (p_teacher / p_student.clamp_min(1e-6)).clamp(0, 10)


def implicit_weight(kind: ImplicitWeight, p_teacher: Tensor) -> Tensor:
    """Per-sample weight of NCKD: 1 (DKD) or 1 - p_t^T (the weight classical KD gives it)."""
    return torch.ones_like(p_teacher) if kind == "one" else (1 - p_teacher).detach()


def aekt_terms(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float,
               explicit: ExplicitWeight = "gap", implicit: ImplicitWeight = "one") -> tuple[Tensor, Tensor]:
    """(mean w_E TCKD, mean w_I NCKD), both times T^2, on the distillation logits."""
    t = temperature
    mask = one_hot(labels, student_logits.shape[1])
    p_s, p_t = F.softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1)
    tckd = tckd_rows(p_s, p_t, mask)
    nckd = nckd_rows(student_logits, teacher_logits, mask, t)
    pt_teacher, pt_student = (p_t * mask).sum(1), (p_s * mask).sum(1)
    w_e = explicit_weight(explicit, pt_teacher, pt_student)
    w_i = implicit_weight(implicit, pt_teacher)
    return t * t * (w_e * tckd).mean(), t * t * (w_i * nckd).mean()


@dataclass
class AEKTConfig:
    alpha: float = 1.0  # explicit (target-class) term
    beta: float = 8.0  # implicit (non-target) term
    temperature: float = 4.0
    warmup: int = 20
    ce_weight: float = 1.0
    explicit_weight: ExplicitWeight = "gap"
    implicit_weight: ImplicitWeight = "one"
    head: bool = True  # the separate distillation head g
    # The head maps logits (large, unnormalised inputs) and sits under beta * T^2: at the student's
    # learning rate its weights blow up within a few steps, so it learns 100x slower.
    head_lr_scale: float = 0.01

    def __post_init__(self) -> None:
        for key in ("alpha", "beta", "warmup", "ce_weight", "head_lr_scale"):
            non_negative(f"aekt.{key}", getattr(self, key))
        positive("aekt.temperature", self.temperature)


@register_method("aekt", AEKTConfig)
class AEKT(Method):
    label = "AEKT"

    requires_teacher = True

    @classmethod
    def loss_terms(cls, hparams: AEKTConfig) -> set[str]:
        return {"ce", "explicit", "implicit"}

    def __init__(self, hparams: AEKTConfig, ctx: MethodContext) -> None:
        super().__init__(hparams, ctx)
        self.head = None
        if hparams.head:
            self.head = nn.Linear(ctx.num_classes, ctx.num_classes)
            with torch.no_grad():  # starts as the identity: distillation first sees the logits themselves
                self.head.weight.copy_(torch.eye(ctx.num_classes))
                self.head.bias.zero_()

    def student_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters()) if self.head is not None else []

    def student_parameters_lr_scale(self) -> float:
        return self.hparams.head_lr_scale

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        h = self.hparams
        logits = model(batch.images)
        teacher_logits = self.teacher_logits(batch.images)
        labels = hard_labels(batch.targets)
        distill_logits = self.head(logits.float()) if self.head is not None else logits.float()
        explicit, implicit = aekt_terms(distill_logits, teacher_logits, labels, h.temperature,
                                        h.explicit_weight, h.implicit_weight)
        ramp = dkd_warmup(batch.epoch, h.warmup)
        return StepOutput(logits, {
            "ce": h.ce_weight * F.cross_entropy(logits, batch.targets),
            "explicit": ramp * h.alpha * explicit,
            "implicit": ramp * h.beta * implicit,
        })
