"""aikd export: the plain state dict loads into the architecture's own library, and ONNX gives PyTorch's logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from aikd.config import load_config
from aikd.data import load_data
from aikd.engine import Trainer
from aikd.engine.checkpoint import load_checkpoint
from aikd.engine.model_io import model_from_checkpoint
from aikd.errors import CheckpointError, ConfigError

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")
SMALL = ["data.train_limit=256", "data.test_limit=64", "data.batch_size=64", "train.epochs=1", "device=cpu"]


def train(tmp_path: Path, *overrides: str) -> Path:
    Trainer(load_config(None, [*SMALL, *overrides]), tmp_path / "run", quiet=True).fit()
    return tmp_path / "run" / "checkpoints" / "last.safetensors"


def real_images(checkpoint: Path) -> torch.Tensor:
    """Normalized test images of the data the model was trained on, as export.json says to prepare them."""
    cfg = load_config(None, [f"data.{k}={v}" for k, v in load_checkpoint(checkpoint).meta["config"]["data"].items()
                             if k in ("name", "test_limit")])
    bundle = load_data(cfg.data)
    return bundle.augment.normalize(bundle.test.images[:32])


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_onnx_runtime_gives_pytorchs_logits_on_real_images(tmp_path, one_thread):
    import onnxruntime

    checkpoint = train(tmp_path, "data.name=fashion-mnist", "model.name=small_cnn")
    record = json.loads(subprocess.run([sys.executable, "-m", "aikd", "export", "-k", str(checkpoint), "-o",
                                        str(tmp_path / "out")], capture_output=True, text=True, check=True).stdout)
    images = real_images(checkpoint)
    mean, std = record["input"]["mean"], record["input"]["std"]
    raw = load_data(load_config(None, ["data.name=fashion-mnist", "data.test_limit=64"]).data).test.images[:32]
    torch.testing.assert_close(images, (raw.float() / 255 - mean[0]) / std[0])  # export.json's recipe
    expected = model_from_checkpoint(load_checkpoint(checkpoint)).eval()(images).detach().numpy()
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "model.onnx"))
    for batch in (images[:1], images):  # any batch size
        got = session.run(None, {"images": batch.numpy()})[0]
        np.testing.assert_allclose(got, expected[: len(batch)], rtol=1e-4, atol=1e-4)
    assert record["classes"][0] == "T-shirt/top" and record["input"]["size"] == 28


def test_timm_student_loads_back_into_plain_timm(tmp_path, one_thread):
    import timm

    checkpoint = train(tmp_path, "data.name=digits", "model.name=timm/resnet18")
    from aikd.export import export_checkpoint

    record = export_checkpoint(checkpoint, tmp_path / "out", onnx=False)
    plain = timm.create_model("resnet18", num_classes=10, in_chans=1).eval()
    plain.load_state_dict(load_file(str(tmp_path / "out" / "model.safetensors")))  # strict: every key
    images = real_images(checkpoint)
    ours = model_from_checkpoint(load_checkpoint(checkpoint)).eval()
    torch.testing.assert_close(plain(images), ours(images))
    assert record["state_dict"]["load"].startswith("model = timm.create_model('resnet18', num_classes=10")


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_torchvision_student_loads_back_into_plain_torchvision(tmp_path, name):
    from torchvision import models

    from aikd.export import plain_state_dict
    from aikd.models import build_model

    ours = build_model(name, 7, 3, 224).eval()  # ImageNet stem: exactly torchvision's network
    state, how = plain_state_dict(ours, {"name": name, "num_classes": 7, "in_channels": 3, "image_size": 224,
                                         "stem": "imagenet"})
    plain = getattr(models, name)(num_classes=7).eval()
    plain.load_state_dict(state)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(plain(x), ours(x))
    assert how == f"torchvision.models.{name}(num_classes=7)"


def test_model_weights_start_from_a_plain_timm_file(tmp_path, one_thread):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    source = timm.create_model("resnet18", num_classes=5, in_chans=1)  # another class count: the head is skipped
    save_file(source.state_dict(), str(tmp_path / "r18.safetensors"))
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    for path in ("r18.safetensors", "r18.pth"):
        cfg = load_config(None, [*SMALL, "data.name=digits", "model.name=timm/resnet18",
                                 f"model.weights={tmp_path / path}"])
        with pytest.warns(UserWarning, match="start untrained"):
            trainer = Trainer(cfg, tmp_path / path.replace(".", "_"), quiet=True)
        weights = trainer.model.state_dict()
        assert torch.equal(weights["net.conv1.weight"], source.state_dict()["conv1.weight"])
        assert weights["net.fc.weight"].shape == (10, 512)


def test_bad_architectures_and_weights_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"Unknown timm architecture 'resnet19'.*Did you mean 'resnet18'"):
        load_config(None, ["model.name=timm/resnet19"])
    with pytest.raises(ConfigError, match=r"model\.weights.*does not exist"):
        load_config(None, [f"model.weights={tmp_path / 'missing.pth'}"])
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    cfg = load_config(None, [*SMALL, "data.name=digits", "model.name=small_cnn", f"model.weights={tmp_path}/wrong.pth"])
    with pytest.raises(CheckpointError, match=r"'.*wrong\.pth' \(model\.weights\) does not fit this model"):
        Trainer(cfg, tmp_path / "run", quiet=True)
    (tmp_path / "code.pth").write_bytes(b"\x80\x04cos\nsystem\n.")  # a pickle that would run code
    cfg = load_config(None, [*SMALL, "data.name=digits", "model.name=small_cnn", f"model.weights={tmp_path}/code.pth"])
    with pytest.raises(CheckpointError, match=r"code\.pth' \(model\.weights\) holds pickled objects.*could run code"):
        Trainer(cfg, tmp_path / "run2", quiet=True)
