"""AMKD (adversarial metric knowledge distillation): a documented reconstruction on top of BSS.

Only the abstract is public (docs/methods/amkd.md): adversarial samples near
the teacher's boundary between two classes are placed, with a triplet loss,
relative to samples of the *negative* class (the class the attack aimed at).
The choices below are config keys and are argued in docs/methods/amkd.md:

    anchor   a = e(S(x_adv))                the student's embedding of a boundary sample
    positive p = e(T(x_adv))                the teacher's embedding of the same sample
    negative n = e(T(x_neg))                the teacher's embedding of a clean sample of class k in the batch
                                            (``negative: student`` uses the student's, with gradient)
    L_tri    = mean max(||a - p||_2 - ||a - n||_2 + margin, 0)
    e(z)     = z / ||z||_2 on logits (teacher and student share the class space even when
               their architectures and feature sizes differ)

    L = L_BSS + gamma b(n) L_tri   (the triplet follows the adversarial term's schedule b(n))

A boundary sample whose target class has no clean sample in the batch has no
negative and is left out of L_tri: the mean is over the boundary samples that have one
(a masked mean on BSS's fixed k rows, exactly 0 when none has; see bss.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from aikd.methods.base import Batch, hard_labels, non_negative, register_method
from aikd.methods.bss import BSS, AttackResult, BSSConfig
from aikd.methods.functional import masked_mean


def embed(logits: Tensor) -> Tensor:
    return F.normalize(logits.float(), dim=1)


def pick_negatives(target_classes: Tensor, labels: Tensor, generator: torch.Generator | None = None
                   ) -> tuple[Tensor, Tensor]:
    """For each target class, a random batch position with that label; and the mask of those found."""
    match = target_classes.unsqueeze(1) == labels.unsqueeze(0)  # (M, B)
    found = match.any(dim=1)
    noise = torch.rand(match.shape, device=labels.device, generator=generator)
    choice = torch.where(match, noise, torch.full_like(noise, -1.0)).argmax(dim=1)
    return choice, found


def triplet_loss(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float, mask: Tensor | None = None
                 ) -> Tensor:
    """mean max(||a - p|| - ||a - n|| + margin, 0) over the rows (those ``mask`` keeps)."""
    d_pos = (anchor - positive).norm(dim=1)
    d_neg = (anchor - negative).norm(dim=1)
    hinge = F.relu(d_pos - d_neg + margin)
    return hinge.mean() if mask is None else masked_mean(hinge, mask)


@dataclass
class AMKDConfig(BSSConfig):
    triplet_weight: float = 1.0  # gamma
    margin: float = 0.2
    negative: Literal["teacher", "student"] = "teacher"  # whose embedding of the negative-class sample

    def __post_init__(self) -> None:
        super().__post_init__()
        non_negative("amkd.triplet_weight", self.triplet_weight)
        non_negative("amkd.margin", self.margin)


@register_method("amkd", AMKDConfig)
class AMKD(BSS):
    """BSS plus a triplet loss on the boundary samples."""

    label = "AMKD"

    @classmethod
    def loss_terms(cls, hparams: AMKDConfig) -> set[str]:
        return {"ce", "kd", "kd_adv", "triplet"}

    def boundary_losses(self, batch: Batch, logits: Tensor, teacher_logits: Tensor, attack: AttackResult,
                        teacher_adv: Tensor, student_adv: Tensor, weight: float) -> dict[str, Tensor]:
        h = self.hparams
        losses = super().boundary_losses(batch, logits, teacher_logits, attack, teacher_adv, student_adv, weight)
        negatives, found = pick_negatives(attack.target, hard_labels(batch.targets))
        source = teacher_logits if h.negative == "teacher" else logits
        tri = triplet_loss(embed(student_adv), embed(teacher_adv), embed(source[negatives]), h.margin,
                           attack.mask & found)
        losses["triplet"] = weight * h.triplet_weight * tri
        return losses
