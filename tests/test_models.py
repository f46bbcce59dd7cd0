"""Every registered model: output shapes, features, stems, channel counts."""

from __future__ import annotations

import pytest
import torch

from aikd.errors import ConfigError
from aikd.models import MODELS, build_model


@pytest.mark.parametrize("name,size,channels", [
    ("small_cnn", 28, 1), ("small_cnn", 8, 1), ("preact_resnet18", 32, 3), ("resnet18", 32, 3),
    ("resnet18", 64, 1), ("densenet121", 32, 3), ("preact_resnet18", 64, 3),
])
def test_logits_and_features(name, size, channels):
    model = build_model(name, 7, channels, size).eval()
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        logits, feats = model(x, return_features=True)
        assert torch.equal(model(x), logits)
    assert logits.shape == (2, 7)
    assert feats.shape == (2, model.num_features)
    # The head is a plain linear map of the features.
    assert torch.allclose(model.head(feats), logits, atol=1e-5)


def test_stems_follow_image_size():
    small = build_model("resnet18", 10, 3, 32)
    large = build_model("resnet18", 10, 3, 224)
    assert small.features.conv1.kernel_size == (3, 3) and isinstance(small.features.maxpool, torch.nn.Identity)
    assert large.features.conv1.kernel_size == (7, 7)
    dense = build_model("densenet121", 10, 3, 32)
    assert dense.features.body.conv0.kernel_size == (3, 3)


def test_preact_resnet18_size():
    model = build_model("preact_resnet18", 100, 3, 32)
    params = sum(p.numel() for p in model.parameters())
    assert 11.0e6 < params < 11.3e6  # the CIFAR PreAct ResNet-18 has about 11.2 M parameters


def test_unknown_model_name_suggests():
    with pytest.raises(ConfigError, match="preact_resnet18"):
        build_model("preact_resnet_18", 10, 3, 32)
    assert {"small_cnn", "preact_resnet18", "resnet18", "densenet121"} <= set(MODELS.names())
