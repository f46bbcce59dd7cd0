"""DDGSD (data-distortion guided self-distillation, Xu and Liu AAAI 2019; reference implementation
github:winycg/Self-KD-Lib methods/ddsgd.py).

Every image is seen twice in its batch, under two independent random distortions a and b (crop, flip).
The student learns both views' labels, each view's softened prediction from the other's, and to give
the two views' features the same mean:

    L = w_ce (CE(y, z_a) + CE(y, z_b)) / 2
        + T^2 KL(p(z_b; T) || p(z_a; T)) + T^2 KL(p(z_a; T) || p(z_b; T))    (each target side detached)
        + mu MMD(f_a, f_b)

with MMD the linear-kernel estimate on the features' means. Self-KD-Lib takes the means over every
element, (mean(f_a) - mean(f_b))^2 (``mmd: grand_mean``); ``mmd: feature_mean`` is the usual linear-kernel
MMD, ||mean_i f_a,i - mean_i f_b,i||^2. Defaults, Self-KD-Lib's: w_ce 0.5 (its CE over both views,
halved), T 4, mu 5e-4, grand_mean.

The batch sampler yields each index twice, [i1..iB | i1..iB]; the augmentation draws every position's
crop and flip on its own, so the copies are two views. ``data.batch_size`` is the number of images B.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from aikd.data.loaders import EpochBatchSampler
from aikd.methods.base import Batch, Method, StepOutput, non_negative, positive, register_method, require
from aikd.methods.functional import distillation_kl

MMD = Literal["grand_mean", "feature_mean"]


def mmd_linear(feats_a: Tensor, feats_b: Tensor, form: MMD = "grand_mean") -> Tensor:
    """Linear-kernel MMD between two views' features: (mean(f_a) - mean(f_b))^2 over every element
    (``grand_mean``, Self-KD-Lib's), or ||mean_i f_a,i - mean_i f_b,i||^2 (``feature_mean``)."""
    a, b = feats_a.float().flatten(1), feats_b.float().flatten(1)
    if form == "grand_mean":
        return (a.mean() - b.mean()) ** 2
    return (a.mean(dim=0) - b.mean(dim=0)).pow(2).sum()


def ddgsd_loss(logits_a: Tensor, logits_b: Tensor, feats_a: Tensor, feats_b: Tensor, targets_a: Tensor,
               targets_b: Tensor | None = None, temperature: float = 4.0, ce_weight: float = 0.5,
               mmd_weight: float = 5e-4, mmd: MMD = "grand_mean") -> tuple[Tensor, Tensor, Tensor]:
    """(w_ce mean CE over both views, the symmetric T^2 KL with each target side detached, mu MMD).

    ``targets_b``: view b's targets when they differ from view a's (mixed batches); by default the same.
    """
    za, zb = logits_a.float(), logits_b.float()
    targets_b = targets_a if targets_b is None else targets_b
    ce = ce_weight * (F.cross_entropy(za, targets_a) + F.cross_entropy(zb, targets_b)) / 2
    kl = (distillation_kl(zb.detach(), za, temperature)  # view a learns from view b
          + distillation_kl(za.detach(), zb, temperature))  # and view b from view a
    return ce, kl, mmd_weight * mmd_linear(feats_a, feats_b, mmd)


class TwoViewBatchSampler(EpochBatchSampler):
    """:class:`~aikd.data.loaders.EpochBatchSampler`'s shuffled batches, each index twice: [i1..iB | i1..iB]."""

    group_size = 2  # the second view of sample i sits at B + i

    def __iter__(self) -> Iterator[list[int]]:
        for batch in super().__iter__():
            yield batch + batch


@dataclass
class DDGSDConfig:
    temperature: float = 4.0
    ce_weight: float = 0.5  # Self-KD-Lib halves its CE over both views; 1: the mean of the two views' CE
    mmd_weight: float = 5e-4  # mu
    mmd: str = "grand_mean"  # grand_mean (Self-KD-Lib) or feature_mean (the linear-kernel MMD of the means)

    def __post_init__(self) -> None:
        positive("ddgsd.temperature", self.temperature)
        non_negative("ddgsd.ce_weight", self.ce_weight)
        non_negative("ddgsd.mmd_weight", self.mmd_weight)
        require(self.mmd in ("grand_mean", "feature_mean"), "ddgsd.mmd", self.mmd,
                "must be 'grand_mean' or 'feature_mean'")


@register_method("ddgsd", DDGSDConfig)
class DDGSD(Method):
    """Two views per image in one forward; CE on both, symmetric consistency, MMD between their features."""

    label = "DDGSD"

    paired_batches = True  # position i and B + i are the same image: mixing keeps the pairs, sharding too

    @classmethod
    def loss_terms(cls, hparams: DDGSDConfig) -> set[str]:
        return {"ce", "kl", "mmd"}

    def batch_sampler(self, batch_size: int, seed: int) -> TwoViewBatchSampler:
        return TwoViewBatchSampler(self.ctx.num_train, batch_size, seed)

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        h = self.hparams
        half = len(batch.indices) // 2
        logits, feats = model(batch.images, return_features=True)
        ce, kl, mmd = ddgsd_loss(logits[:half], logits[half:], feats[:half], feats[half:], batch.targets[:half],
                                 batch.targets[half:], h.temperature, h.ce_weight, h.mmd_weight, h.mmd)
        # The images' prediction is the mean of both views' (as Self-KD-Lib reports its training accuracy).
        return StepOutput((logits[:half] + logits[half:]).detach() / 2, {"ce": ce, "kl": kl, "mmd": mmd})


class DDGSDLoss(nn.Module):
    """DDGSD as one loss for a training loop of your own. Give it both views' logits and pooled features
    (one forward of the concatenated views keeps BatchNorm's statistics as in the reference)::

        criterion = DDGSDLoss()
        for images, labels in loader:  # images: uint8 or PIL, two independent augmentations each
            view_a, view_b = augment(images), augment(images)
            logits, feats = model(torch.cat([view_a, view_b]), return_features=True)
            n = len(labels)
            loss = criterion(logits[:n], logits[n:], feats[:n], feats[n:], labels)
    """

    def __init__(self, temperature: float = 4.0, ce_weight: float = 0.5, mmd_weight: float = 5e-4,
                 mmd: str = "grand_mean") -> None:
        super().__init__()
        DDGSDConfig(temperature=temperature, ce_weight=ce_weight, mmd_weight=mmd_weight, mmd=mmd)  # checks
        self.temperature, self.ce_weight, self.mmd_weight, self.mmd = temperature, ce_weight, mmd_weight, mmd

    def forward(self, logits_a: Tensor, logits_b: Tensor, feats_a: Tensor, feats_b: Tensor,
                labels: Tensor) -> Tensor:
        ce, kl, mmd = ddgsd_loss(logits_a, logits_b, feats_a, feats_b, labels, None, self.temperature,
                                 self.ce_weight, self.mmd_weight, self.mmd)  # type: ignore[arg-type]
        return ce + kl + mmd
