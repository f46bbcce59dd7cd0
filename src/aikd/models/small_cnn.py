"""A small CNN for CPU demos on 28x28 grey images (Fashion-MNIST, digits)."""

from __future__ import annotations

from torch import nn

from aikd.models.base import MODELS, Classifier, ModelSpec


def _block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return layers


@MODELS.register("small_cnn")
def small_cnn(spec: ModelSpec) -> Classifier:
    """Two conv blocks (32 and 64 channels, each halving the size), then a 256-unit layer.

    About 0.8 M parameters and 5 M multiply-adds per 28x28 image: an epoch of
    Fashion-MNIST takes under a minute on two CPU cores. The fully connected
    feature layer (rather than global pooling) makes it learn in few steps,
    which is what a short CPU demo needs.
    """
    side = spec.image_size // 4
    features = nn.Sequential(
        *_block(spec.in_channels, 32, pool=True),
        *_block(32, 64, pool=True),
        nn.Flatten(),
        nn.Linear(64 * side * side, 256, bias=False),
        nn.BatchNorm1d(256),
        nn.ReLU(inplace=True),
    )
    return Classifier(features, 256, spec.num_classes)
