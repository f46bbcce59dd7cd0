"""timm architectures by name, end to end: AI-KD's two phases with a timm model, and its features."""

from __future__ import annotations

import pytest
import torch

from aikd.config import load_config
from aikd.engine.checkpoint import load_checkpoint
from aikd.engine.model_io import model_from_checkpoint
from aikd.engine.pipeline import run_pipeline
from aikd.errors import ConfigError

pytest.importorskip("timm")

DIGITS = ["data.name=digits", "data.train_limit=320", "data.test_limit=128", "data.batch_size=64", "train.epochs=1",
          "device=cpu"]
ARCHS = {"timm/resnet18": [], "timm/vit_tiny_patch16_224": ["model.kwargs={patch_size: 2, depth: 2}"]}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_aikd_pipeline_with_a_timm_architecture(tmp_path, arch, one_thread):
    result = run_pipeline("configs/fashion_mnist/aikd.yaml", [*DIGITS, f"model.name={arch}", *ARCHS[arch]], tmp_path,
                          quiet=True, log=lambda m: None)
    assert result["superior"]["model"] == result["student"]["model"] == arch
    assert 0 <= result["student"]["top1_err"] < 95
    model = model_from_checkpoint(load_checkpoint(tmp_path / "student" / "checkpoints" / "last.safetensors")).eval()
    logits, features = model(torch.zeros(3, 1, 8, 8), return_features=True)
    assert logits.shape == (3, 10) and features.shape == (3, model.num_features)
    torch.testing.assert_close(model(torch.zeros(3, 1, 8, 8)), logits)


def test_vit_gets_the_datas_image_size_and_kwargs_are_checked():
    from aikd.models import build_model

    vit = build_model("timm/vit_tiny_patch16_224", 10, 1, 8, kwargs={"patch_size": 2, "depth": 1})
    assert vit.net.patch_embed.img_size == (8, 8) and len(vit.net.blocks) == 1
    with pytest.raises(ConfigError, match=r"does not take model\.kwargs"):
        build_model("timm/resnet18", 10, 1, 8, kwargs={"no_such_option": 1})
    with pytest.raises(ConfigError, match=r"model\.kwargs"):
        load_config(None, ["model.kwargs=3"])


def test_an_architecture_too_deep_for_the_images_is_named_before_training(tmp_path):
    from aikd.engine import Trainer

    cfg = load_config(None, [*DIGITS, "model.name=timm/convnext_atto"])  # strides 32: nothing left of 8 pixels
    with pytest.raises(ConfigError, match=r"Model 'timm/convnext_atto' cannot take 1x8x8 images of 'digits'"):
        Trainer(cfg, tmp_path, quiet=True)
    assert not any(tmp_path.iterdir())
