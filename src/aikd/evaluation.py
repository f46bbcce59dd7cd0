"""Evaluating a saved model on its test split (``aikd eval``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aikd.config import apply_overrides, from_dict
from aikd.data import load_data
from aikd.engine.checkpoint import load_checkpoint
from aikd.engine.model_io import model_from_checkpoint
from aikd.engine.runtime import autocast_dtype, pick_device
from aikd.errors import CheckpointError
from aikd.metrics import classification_metrics, predict


def evaluate_checkpoint(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                        quiet: bool = False) -> dict[str, Any]:
    """Test metrics of the model in ``path`` on the test split of the data it was trained on.

    ``overrides`` adjust the saved config, e.g. ``data.root=/elsewhere``.
    """
    from aikd.engine.logger import progress_bar

    ckpt = load_checkpoint(path)
    saved = ckpt.meta.get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"Checkpoint '{path}' does not record the config it was trained with.")
    cfg = from_dict(apply_overrides(saved, overrides), source=f"{path} (saved config)")
    data = load_data(cfg.data)
    info = ckpt.meta["model"]
    if info["num_classes"] != data.num_classes or info["in_channels"] != data.in_channels:
        raise CheckpointError(
            f"Checkpoint '{path}' is for {info['num_classes']} classes and {info['in_channels']} "
            f"channels, but '{cfg.data.name}' has {data.num_classes} and {data.in_channels}."
        )
    device = pick_device(cfg.device)
    model = model_from_checkpoint(ckpt).to(device)
    loader = data.loader(train=False)
    bar = progress_bar(len(loader), "eval", quiet)
    logits, labels = predict(model, loader, lambda x: data.to_device(x, False, None), device,
                             autocast_dtype(cfg.train, device), bar)
    bar.close()
    return {**classification_metrics(logits, labels), "checkpoint": str(path),
            "method": cfg.method, "model": info["name"], "dataset": cfg.data.name,
            "epoch": ckpt.meta.get("epoch")}
