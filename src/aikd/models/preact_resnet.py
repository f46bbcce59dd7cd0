"""PreAct ResNet-18 (He et al. 2016, identity mappings), the paper's CIFAR model."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from aikd.models.base import MODELS, Classifier, GlobalAvgPool, ModelSpec


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice, with the shortcut taken after the first BN-ReLU."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNetFeatures(nn.Module):
    def __init__(self, blocks: list[int], in_channels: int, stem: str) -> None:
        super().__init__()
        if stem == "cifar":
            self.stem = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.MaxPool2d(3, 2, 1)
            )
        layers, cin = [], 64
        for i, n in enumerate(blocks):
            cout = 64 * 2**i
            for j in range(n):
                layers.append(PreActBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.pool = GlobalAvgPool()
        self.out_features = cin

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(self.stem(x))
        return self.pool(F.relu(self.bn(out)))


@MODELS.register("preact_resnet18")
def preact_resnet18(spec: ModelSpec) -> Classifier:
    features = PreActResNetFeatures([2, 2, 2, 2], spec.in_channels, spec.stem)
    return Classifier(features, features.out_features, spec.num_classes)
