"""Rebuilding a trained model from its checkpoint, and checking it fits a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from aikd.engine.checkpoint import Checkpoint, load_checkpoint
from aikd.errors import CheckpointError
from aikd.models import build_model


def model_meta(model_name: str, stem: str, num_classes: int, in_channels: int, image_size: int,
               classes: list[str], kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The description a checkpoint carries so the model can be rebuilt without the config."""
    info = {"name": model_name, "stem": stem, "num_classes": num_classes, "in_channels": in_channels,
            "image_size": image_size, "classes": classes}
    if kwargs:
        info["kwargs"] = kwargs  # timm.create_model arguments
    return {"model": info}


def model_from_checkpoint(ckpt: Checkpoint) -> nn.Module:
    """Build the architecture the checkpoint describes and load its weights strictly."""
    info = ckpt.meta.get("model")
    if not isinstance(info, dict):
        raise CheckpointError(f"Checkpoint '{ckpt.path}' does not describe its model.")
    model = build_model(info["name"], info["num_classes"], info["in_channels"],
                        info["image_size"], info["stem"], info.get("kwargs"))
    try:
        model.load_state_dict(ckpt.model, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(
            f"Checkpoint '{ckpt.path}' does not fit its declared model '{info['name']}': {first}"
        ) from None
    return model


def load_frozen_model(path: str | Path, device: torch.device, *, num_classes: int,
                      in_channels: int, role: str = "teacher", expect_model: str | None = None,
                      image_size: int | None = None, classes: list[str] | None = None) -> nn.Module:
    """Load a trained model for inference only (eval mode, no gradients), checking that it fits the data.

    ``role`` names the model in error messages ("teacher", "superior model"). ``image_size`` and
    ``classes``, when given, must match what the model was trained on: a model from another
    dataset with the same class count would otherwise load and teach nonsense, or fail deep
    inside the first forward.
    """
    ckpt = load_checkpoint(path)
    info = ckpt.meta.get("model", {})
    check_fits(path, info, role, num_classes=num_classes, in_channels=in_channels, image_size=image_size,
               classes=classes)
    if expect_model is not None and info.get("name") != expect_model:
        raise CheckpointError(
            f"The {role} checkpoint '{path}' is a '{info.get('name')}', but this method needs the "
            f"same architecture as the student ('{expect_model}')."
        )
    model = model_from_checkpoint(ckpt).to(device).eval()
    model.requires_grad_(False)
    return model


def check_fits(path: str | Path, info: dict, role: str, *, num_classes: int, in_channels: int,
               image_size: int | None = None, classes: list[str] | None = None, fix: str | None = None) -> None:
    """Raise CheckpointError unless the model recorded in ``info`` (a checkpoint's meta["model"]) fits the data:
    its class count, channels and, when given, image size and class names. ``fix`` says what to do instead."""
    size_fix = fix or f"Train the {role} on the same data and image size."
    fix = fix or f"Train the {role} on the same dataset, or pass another checkpoint with teacher.checkpoint=PATH."
    if info.get("num_classes") != num_classes:
        raise CheckpointError(
            f"The {role} checkpoint '{path}' predicts {info.get('num_classes')} classes, but this "
            f"dataset has {num_classes}. {fix}"
        )
    if info.get("in_channels") != in_channels:
        raise CheckpointError(
            f"The {role} checkpoint '{path}' takes {info.get('in_channels')}-channel images, but "
            f"this dataset has {in_channels} channels. {fix}"
        )
    if classes is not None and info.get("classes") not in (None, classes):
        raise CheckpointError(
            f"The {role} checkpoint '{path}' was trained on other classes ({_preview(info['classes'])}) than "
            f"this dataset's ({_preview(classes)}). {fix}"
        )
    if image_size is not None and info.get("image_size") not in (None, image_size):
        raise CheckpointError(
            f"The {role} checkpoint '{path}' was trained on {info.get('image_size')}-pixel images, but this "
            f"run uses {image_size}-pixel images. {size_fix}"
        )


def _preview(names: list[str], shown: int = 4) -> str:
    return ", ".join(map(str, names[:shown])) + (", ..." if len(names) > shown else "")
