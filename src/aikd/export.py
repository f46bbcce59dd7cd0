"""``aikd export``: a trained model out of aikd, as a plain state dict for its architecture and as ONNX.

The state dict uses the names of the library the architecture comes from, so it loads
without aikd: ``timm.create_model(arch, num_classes=C, in_chans=...)`` for ``timm/<arch>``,
``torchvision.models.<arch>(num_classes=C)`` for resnet18 / densenet121 (ImageNet stem),
and ``aikd.models.build_model`` for aikd's own models. The ONNX graph takes normalized
images (N, C, H, W; any batch size) named ``images`` and returns ``logits``; ``export.json``
says how to normalize, which classes the outputs are, and how to load each file.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import Tensor, nn

from aikd.engine.checkpoint import load_checkpoint
from aikd.engine.model_io import model_from_checkpoint
from aikd.errors import AikdError
from aikd.fileio import atomic_write_bytes, atomic_write_with, check_output_folder

TORCHVISION_CLASSIFIER = {"resnet18": "fc.", "densenet121": "classifier."}


def _torchvision_key(name: str, key: str) -> str:
    """aikd's wrapper names -> torchvision's: the head is torchvision's classifier; resnet18's body sits under
    ``features.``, densenet121's ``features`` under ``features.body.``."""
    if key.startswith("head."):
        return TORCHVISION_CLASSIFIER[name] + key.removeprefix("head.")
    if name == "resnet18":
        return key.removeprefix("features.")
    return "features." + key.removeprefix("features.body.")


def plain_state_dict(model: nn.Module, info: dict[str, Any]) -> tuple[dict[str, Tensor], str]:
    """The model's weights under its own library's names, and how to load them (one line of Python)."""
    name, classes, channels = info["name"], info["num_classes"], info["in_channels"]
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if name.startswith("timm/"):
        kwargs = "".join(f", {k}={v!r}" for k, v in (info.get("kwargs") or {}).items())
        arch = name.removeprefix("timm/")
        return ({k.removeprefix("net."): v for k, v in state.items()},
                f"timm.create_model({arch!r}, num_classes={classes}, in_chans={channels}{kwargs})")
    if name in TORCHVISION_CLASSIFIER:
        plain = {_torchvision_key(name, k): v for k, v in state.items()}
        how = f"torchvision.models.{name}(num_classes={classes})"
        if info.get("stem") == "cifar" or channels != 3:
            how += (" with the CIFAR stem aikd used (first convolution 3x3 stride 1, no max-pool)"
                    if info.get("stem") == "cifar" else f" with a {channels}-channel first convolution")
        return plain, how
    return state, (f"aikd.models.build_model({name!r}, {classes}, {channels}, {info['image_size']}, "
                   f"{info.get('stem', 'auto')!r})")


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, onnx: bool = True) -> dict[str, Any]:
    """Write OUT/model.safetensors (plain state dict), OUT/model.onnx (unless ``onnx`` is False) and
    OUT/export.json; return what export.json holds."""
    check_output_folder(out_dir, "export folder")
    ckpt = load_checkpoint(checkpoint)
    info = ckpt.meta.get("model") or {}
    model = model_from_checkpoint(ckpt).eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state, how = plain_state_dict(model, info)
    atomic_write_bytes(out / "model.safetensors", save(state))
    data = (ckpt.meta.get("config") or {}).get("data", {})
    record: dict[str, Any] = {
        "checkpoint": str(checkpoint), "architecture": info.get("name"), "classes": info.get("classes"),
        "input": {"channels": info.get("in_channels"), "size": info.get("image_size"), **_normalization(data)},
        "state_dict": {"file": "model.safetensors", "load": f"model = {how}; model.load_state_dict("
                                                             f"safetensors.torch.load_file('model.safetensors'))"},
    }
    if onnx:
        _export_onnx(model, info, out / "model.onnx")
        record["onnx"] = {"file": "model.onnx", "input": "images", "output": "logits",
                          "load": "onnxruntime.InferenceSession('model.onnx').run(None, {'images': x})[0]"}
    atomic_write_bytes(out / "export.json", json.dumps(record, indent=2).encode())
    return record


def _normalization(data: dict[str, Any]) -> dict[str, Any]:
    """The per-channel mean and std the model's inputs were standardized with (pixel values in [0, 1])."""
    from aikd.catalog import datasets

    name = data.get("name")
    if name not in datasets():
        return {}
    dataset = datasets().get(name)
    return {"mean": list(dataset.mean), "std": list(dataset.std), "scale": "pixels / 255, then (x - mean) / std"}


class _Logits(nn.Module):
    """The model as a function of images alone (the graph an exporter traces)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)


def _export_onnx(model: nn.Module, info: dict[str, Any], path: Path) -> None:
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError:
        raise AikdError("ONNX export needs onnx and onnxscript: pip install 'aikd[onnx]' (or pass --no-onnx "
                        "for the state dict alone).") from None
    example = torch.zeros(2, info["in_channels"], info["image_size"], info["image_size"])
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():  # the exporter's own progress and deprecation chatter
        warnings.simplefilter("ignore")
        program = torch.onnx.export(_Logits(model), (example,), input_names=["images"], output_names=["logits"],
                                    dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
    atomic_write_with(path, lambda tmp: program.save(str(tmp)))
