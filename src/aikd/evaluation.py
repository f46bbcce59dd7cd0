"""Evaluating a saved model (``aikd eval``): test metrics, temperature scaling, penultimate features."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from aikd.config import RunConfig, apply_overrides, from_saved
from aikd.data import DataBundle, load_data
from aikd.distributed import DistInfo, device_for
from aikd.engine.checkpoint import load_checkpoint
from aikd.engine.evaluator import Evaluator
from aikd.engine.model_io import check_fits, model_from_checkpoint
from aikd.engine.output import Output
from aikd.engine.runtime import pick_device
from aikd.errors import AikdError, CheckpointError
from aikd.strategy import Placement


@dataclass
class LoadedModel:
    """A checkpoint's model on its device, with the config and data it was trained with."""

    path: Path
    cfg: RunConfig
    data: DataBundle
    model: nn.Module
    device: torch.device
    name: str  # the architecture
    epoch: int | None

    def evaluator(self, quiet: bool = True) -> Evaluator:
        """The evaluator a training run uses, for this model as saved (it keeps its answers: hold on to it)."""
        return Evaluator(self.model, self.data, Placement(self.device), Output(quiet=quiet))

    def predict(self, split=None, quiet: bool = True, description: str = "eval") -> tuple[Tensor, Tensor]:
        """Logits and labels on ``split`` (default: the test split)."""
        return self.evaluator(quiet).predict(split, description)


def load_model(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> LoadedModel:
    """Load a checkpoint with the data of its saved config (``overrides`` adjust it, e.g. data.root)."""
    ckpt = load_checkpoint(path)
    saved = ckpt.meta.get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"Checkpoint '{path}' does not record the config it was trained with.")
    _refuse_overrides_it_cannot_apply(path, overrides)
    cfg = from_saved(apply_overrides(saved, overrides), source=f"{path} (saved config)")
    data = load_data(cfg.data)
    info = ckpt.meta["model"]
    check_fits(path, info, "model", num_classes=data.num_classes, in_channels=data.in_channels,
               image_size=data.image_size, classes=list(data.train.classes),
               fix="Evaluate it on the dataset it was trained on, at its size (data.name, data.root, "
                   "data.image_size).")
    device = device_for(DistInfo(), pick_device(cfg.device))  # cuda:N made current, as in training
    model = model_from_checkpoint(ckpt).to(device)
    return LoadedModel(Path(path), cfg, data, model, device, info["name"], ckpt.meta.get("epoch"))


# What a saved model is evaluated with; every other key describes its training, which is over (train.amp too:
# evaluation is float32, aikd.metrics.predict).
EVAL_KEYS = ("data.", "device", "deterministic", "train.channels_last")


def _refuse_overrides_it_cannot_apply(path: str | Path, overrides: list[str] | tuple[str, ...]) -> None:
    """Overrides of the architecture, the method or the recipe cannot change a trained model: refuse them, naming
    them, instead of dropping them in silence."""
    ignored = [o for o in overrides if not o.partition("=")[0].strip().startswith(EVAL_KEYS)]
    if ignored:
        allowed = ", ".join(f"{key}*" if key.endswith(".") else key for key in EVAL_KEYS)
        raise AikdError(f"Evaluating '{path}' uses the model as it was trained; {', '.join(ignored)} cannot be "
                        f"applied to it. Overrides here may set {allowed}.")


def evaluate_checkpoint(path: str | Path, overrides: list[str] | tuple[str, ...] = (), quiet: bool = False,
                        calibrate: bool = False, plot: str | Path | None = None) -> dict[str, Any]:
    """Test metrics of the model in ``path`` on the test split of the data it was trained on.

    ``calibrate`` fits temperature scaling on the run's held-out training images
    (``data.holdout``) and adds ``temperature``, ``ece_ts`` and ``nll_ts``;
    ``plot`` writes the reliability diagram before and after scaling there.
    """
    loaded = load_model(path, overrides)
    evaluator = loaded.evaluator(quiet)
    result = {**evaluator.metrics(loaded.epoch), "checkpoint": str(path), "method": loaded.cfg.method,
              "model": loaded.name, "dataset": loaded.cfg.data.name, "epoch": loaded.epoch}
    if calibrate:
        result.update(_calibrate(loaded, evaluator, plot))
    return result


def _calibrate(loaded: LoadedModel, evaluator: Evaluator, plot: str | Path | None) -> dict[str, float]:
    from aikd.metrics.reliability import write_reliability

    calibration = evaluator.calibration(loaded.epoch)
    if calibration is None:
        raise AikdError(
            f"'{loaded.path}' was trained on the whole training split (data.holdout=0), so no held-out "
            f"images are left to fit the temperature on, and the test set must not be used. Retrain with "
            f"data.holdout=0.1, or pass data.holdout=0.1 here to fit on 10% of the training split (images "
            f"the model has seen, so the fitted temperature will be too low)."
        )
    metrics, bins = calibration
    if plot is not None:
        write_reliability(bins, metrics["temperature"], f"{loaded.cfg.method} - {loaded.cfg.data.name}", plot)
    return metrics


@torch.inference_mode()
def penultimate_features(loaded: LoadedModel, classes: list[int], per_class: int,
                         seed: int = 0) -> tuple[Tensor, Tensor]:
    """Penultimate features of up to ``per_class`` test images of each class in ``classes``.

    The same images for every checkpoint on the same data (the pick depends on ``seed`` only).
    """
    test = loaded.data.test
    bad = [c for c in classes if not 0 <= c < loaded.data.num_classes]
    if bad:
        raise AikdError(f"Classes {bad} do not exist: '{loaded.cfg.data.name}' has classes "
                        f"0..{loaded.data.num_classes - 1}.")
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in classes:
        members = torch.nonzero(test.labels == c).flatten()
        picks.append(members[torch.randperm(len(members), generator=g)[:per_class]])
    subset = test.subset(torch.sort(torch.cat(picks)).values)
    loaded.model.eval()
    feats, labels = [], []
    for images, batch_labels, _ in loaded.data.loader(train=False, split=subset, device=loaded.device):
        images = loaded.data.to_device(images.to(loaded.device), False, None)
        _, f = loaded.model(images, return_features=True)
        feats.append(f.float().cpu())
        labels.append(batch_labels.cpu())
    return torch.cat(feats), torch.cat(labels)


def tsne_panels(checkpoints: Sequence[str | Path], names: Sequence[str] | None, classes: Sequence[int],
                per_class: int, overrides: Sequence[str] = (), seed: int = 0
                ) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], list[str]]:
    """What ``aikd tsne`` draws (:func:`aikd.report.tsne.tsne_plot`): each checkpoint's penultimate features of
    the same test images of ``classes``, titled, and the classes' names."""
    if names is not None and len(names) != len(checkpoints):
        raise AikdError(f"--names gives {len(names)} names for {len(checkpoints)} checkpoints.")
    panels, class_names = [], []
    for i, path in enumerate(checkpoints):
        loaded = load_model(path, list(overrides))
        feats, labels = penultimate_features(loaded, list(classes), per_class, seed)
        if len(labels) < 5:
            raise AikdError(f"Only {len(labels)} test images in classes {list(classes)}: t-SNE needs more.")
        title = names[i] if names else f"{loaded.cfg.method} ({Path(path).parent.parent.name})"
        panels.append((title, feats.numpy(), labels.numpy()))
        class_names = [loaded.data.test.classes[c] for c in classes]
    return panels, class_names
