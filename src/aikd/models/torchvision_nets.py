"""ResNet-18 and DenseNet-121 from torchvision, with an optional CIFAR stem.

The paper uses the ImageNet-style networks for the 224-pixel fine-grained sets
and the CIFAR variants (3x3 stride-1 first convolution, no max-pool) for
32-pixel images; ``ModelSpec.stem`` selects which. Weights start random: the
paper trains every model from scratch. torchvision is imported when one of
these is built, not when aikd is imported (it adds seconds to every command).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from aikd.models.base import MODELS, Classifier, GlobalAvgPool, ModelSpec

if TYPE_CHECKING:
    from torchvision import models as tvm


@MODELS.register("resnet18")
def resnet18(spec: ModelSpec) -> Classifier:
    from torchvision import models as tvm

    net = tvm.resnet18(weights=None)
    if spec.stem == "cifar":
        net.conv1 = nn.Conv2d(spec.in_channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif spec.in_channels != 3:
        net.conv1 = nn.Conv2d(spec.in_channels, 64, 7, 2, 3, bias=False)
    num_features = net.fc.in_features
    net.avgpool = GlobalAvgPool()  # deterministic on CUDA (torchvision's forward flattens the (N, C) it returns)
    net.fc = nn.Identity()
    return Classifier(net, num_features, spec.num_classes)


class _DenseNetFeatures(nn.Module):
    """torchvision's DenseNet forward without its classifier."""

    def __init__(self, net: tvm.DenseNet) -> None:
        super().__init__()
        self.body = net.features
        self.tail = nn.Sequential(nn.ReLU(inplace=True), GlobalAvgPool())

    def forward(self, x):
        return self.tail(self.body(x))


@MODELS.register("densenet121")
def densenet121(spec: ModelSpec) -> Classifier:
    from torchvision import models as tvm

    net = tvm.densenet121(weights=None)
    if spec.stem == "cifar":
        net.features.conv0 = nn.Conv2d(spec.in_channels, 64, 3, 1, 1, bias=False)
        net.features.pool0 = nn.Identity()
    elif spec.in_channels != 3:
        net.features.conv0 = nn.Conv2d(spec.in_channels, 64, 7, 2, 3, bias=False)
    num_features = net.classifier.in_features
    return Classifier(_DenseNetFeatures(net), num_features, spec.num_classes)
