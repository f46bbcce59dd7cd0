"""What a dataset reader returns: one split, in memory or as a list of files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


@dataclass
class ArraySplit:
    """A split small enough to hold in memory as uint8 (N, C, H, W) images."""

    images: Tensor  # uint8, (N, C, H, W)
    labels: Tensor  # int64, (N,)
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Tensor) -> ArraySplit:
        return ArraySplit(self.images[indices].clone(), self.labels[indices].clone(), self.classes)


@dataclass
class FileSplit:
    """A split of image files on disk with their labels, decoded on the fly."""

    paths: list[Path]
    labels: Tensor  # int64, (N,)
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Tensor) -> FileSplit:
        keep = indices.tolist()
        return FileSplit([self.paths[i] for i in keep], self.labels[indices].clone(), self.classes)


Split = ArraySplit | FileSplit


def stratified_indices(labels: Tensor, limit: int, seed: int) -> Tensor:
    """Pick ``limit`` indices keeping each class's share (largest-remainder rounding).

    The pick depends only on ``seed``, so runs with different training seeds
    see the same subset and stay comparable. Indices are returned sorted.
    """
    n = len(labels)
    if limit >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * limit / n
    quota = exact.floor().long()
    remainder = limit - int(quota.sum())
    if remainder > 0:
        order = torch.argsort(exact - quota, descending=True, stable=True)
        quota[order[:remainder]] += 1
    picked = []
    for cls, k in zip(classes.tolist(), quota.tolist(), strict=True):
        members = torch.nonzero(labels == cls).flatten()
        picked.append(members[torch.randperm(len(members), generator=g)[:k]])
    return torch.sort(torch.cat(picked)).values
