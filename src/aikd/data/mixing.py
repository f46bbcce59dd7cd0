"""Batch-level augmentations of the paper's Table 7: Cutout, Mixup and CutMix.

They run on the training device, after normalization, for in-memory and
image-file datasets alike, so every method sees them the same way:

* Cutout (DeVries & Taylor, 2017) zeroes a square of side ``data.cutout`` at a
  uniformly drawn centre of each image (the square may hang over the border);
  zero in normalized space is the dataset's mean colour, as in their code.
* Mixup (Zhang et al., 2018) and CutMix (Yun et al., 2019) combine each image
  with its neighbour in the batch (a roll by one) using a ratio drawn from
  Beta(alpha, alpha), and return soft targets (N, C) that sum to 1.

Why not torchvision's ``v2.MixUp`` / ``v2.CutMix``: they draw from the global
RNG and pair samples across the whole batch. Here every draw comes from the
epoch's generator (an epoch replays exactly on resume), and a method whose
batch is [anchors | same-class partners] (CS-KD) is mixed within each half
with one shared ratio and box, so anchor i and partner i stay a same-label pair.

The batch-wide draws (whether to mix, the ratio, CutMix's box) are made on the host, from a
NumPy stream of their own keyed by (seed, step, rank): a decision read back from the device would
make the host wait for it in every step (the draws of one step depend on nothing else, so a
resumed run draws them again). The per-image draws (Cutout's centres) stay on the device, from the
epoch's generator.

The dataset index of sample i stays with position i, so buffer-based methods
(PS-KD, AI-KD) store the prediction on the mixed image under the index of
the image that dominates position i; see docs/methods/aikd.md.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from aikd.methods.functional import one_hot

if TYPE_CHECKING:
    from aikd.data.settings import DataConfig


class BatchMixer:
    """Applies the configured Cutout and batch mixing to one normalized batch."""

    def __init__(self, cfg: DataConfig, num_classes: int, paired: bool = False, seed: int = 0) -> None:
        self.cutout = cfg.cutout
        self.mix = cfg.mix
        self.alpha = cfg.mix_alpha
        self.prob = cfg.mix_prob
        self.num_classes = num_classes
        self.paired = paired
        self.seed = seed

    @property
    def active(self) -> bool:
        return self.cutout > 0 or self.mix != "none"

    def draws(self, step: int, rank: int = 0) -> np.random.Generator:
        """The host stream of one step's batch-wide draws on one rank (each rank mixes its own slice)."""
        return np.random.default_rng([self.seed, step, rank, _MIXING_STREAM])

    def __call__(self, images: Tensor, labels: Tensor, generator: torch.Generator | None, step: int = 0,
                 rank: int = 0) -> tuple[Tensor, Tensor]:
        """(images, class indices) -> (images, targets): targets are (N, C) when the batch was mixed."""
        if self.cutout > 0:
            images = cutout(images, self.cutout, generator)
        host = self.draws(step, rank)
        if self.mix == "none" or host.random() >= self.prob:
            return images, labels
        lam = float(host.beta(self.alpha, self.alpha))
        partner = neighbour_permutation(len(labels), self.paired, images.device)
        if self.mix == "mixup":
            images, lam = mixup(images, partner, lam)
        else:
            images, lam = cutmix(images, partner, lam, host)
        targets = one_hot(labels, self.num_classes, images.dtype)
        return images, lam * targets + (1 - lam) * targets[partner]


_MIXING_STREAM = 0x6D6978  # keeps this stream apart from any other keyed by (seed, step, rank)


def cutout(images: Tensor, size: int, generator: torch.Generator | None = None) -> Tensor:
    """Zero a ``size`` x ``size`` square around a random centre of every image."""
    n, _, h, w = images.shape
    device = images.device
    cy = torch.randint(0, h, (n, 1, 1), device=device, generator=generator)
    cx = torch.randint(0, w, (n, 1, 1), device=device, generator=generator)
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    half = size // 2
    inside = (rows >= cy - half) & (rows < cy - half + size) & (cols >= cx - half) & (cols < cx - half + size)
    return images.masked_fill(inside.unsqueeze(1), 0.0)


def neighbour_permutation(n: int, paired: bool, device: torch.device) -> Tensor:
    """Index of the partner each position is mixed with: a roll by one, within each half if ``paired``."""
    if not paired:
        return torch.arange(n, device=device).roll(1)
    half = n // 2
    first = torch.arange(half, device=device).roll(1)
    return torch.cat([first, first + half])


def mixup(images: Tensor, partner: Tensor, lam: float) -> tuple[Tensor, float]:
    """lam * x + (1 - lam) * x[partner]."""
    return lam * images + (1 - lam) * images[partner], lam


def cutmix(images: Tensor, partner: Tensor, lam: float, host: np.random.Generator) -> tuple[Tensor, float]:
    """Paste a box of area (1 - lam) from x[partner], its centre drawn from ``host``; return the images and lam
    of the clipped box."""
    _, _, h, w = images.shape
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(host.integers(h)), int(host.integers(w))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    mixed = images.clone()
    mixed[:, :, top:bottom, left:right] = images[partner, :, top:bottom, left:right]
    return mixed, 1 - (bottom - top) * (right - left) / (h * w)
