"""The common shape of every model: a feature extractor and a linear head.

Splitting the two lets every method reach the penultimate features (t-SNE,
AMKD's embeddings) through one call, whatever the architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from aikd.registry import Registry


@dataclass(frozen=True)
class ModelSpec:
    """What a constructor needs to know about the data."""

    num_classes: int
    in_channels: int
    image_size: int
    stem: str  # "cifar" (3x3 stride 1, no max-pool) or "imagenet" (7x7 stride 2 + max-pool)


class GlobalAvgPool(nn.Module):
    """(N, C, H, W) -> (N, C): the mean over each feature map, as ``x.mean((2, 3))``.

    In place of ``nn.AdaptiveAvgPool2d(1)`` + flatten: that layer's CUDA backward accumulates with atomics,
    has no deterministic kernel and so stops a ``deterministic: true`` run, while a mean's backward is a
    broadcast. On the CPU both give the same bits, forward and backward, in either memory format
    (tests/test_precision.py compares them), so CPU results do not change.
    """

    def forward(self, x: Tensor) -> Tensor:
        return x.mean((2, 3))


class Classifier(nn.Module):
    """``features`` maps images to a vector; ``head`` maps it to logits."""

    def __init__(self, features: nn.Module, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.head = nn.Linear(num_features, num_classes)
        self.num_features = num_features
        self.num_classes = num_classes

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        feats = self.features(x)
        logits = self.head(feats)
        return (logits, feats) if return_features else logits


MODELS: Registry[Callable[[ModelSpec], Classifier]] = Registry("model", "model.name")


def build_model(name: str, num_classes: int, in_channels: int, image_size: int,
                stem: str = "auto", kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build a registered model, or ``timm/<arch>`` (with ``kwargs``), for data with the given shape.

    ``stem="auto"`` picks the CIFAR stem for images under 100 pixels, as the
    paper does for CIFAR-100 and Tiny-ImageNet, and the ImageNet stem above
    (aikd's own and torchvision's models; timm models keep their own stems).
    """
    from aikd.models.timm_nets import build_timm, is_timm

    if is_timm(name):
        return build_timm(name, num_classes, in_channels, image_size, kwargs)
    return MODELS.get(name)(ModelSpec(num_classes, in_channels, image_size, resolve_stem(stem, image_size)))


def resolve_stem(stem: str, image_size: int) -> str:
    """``auto`` -> ``cifar`` below 100 px, ``imagenet`` from 100 px up."""
    if stem != "auto":
        return stem
    return "cifar" if image_size < 100 else "imagenet"
