"""The evaluator: one model's predictions and metrics on its data, each computed once per state of the model.

A training run asks for the test metrics after every epoch, for the final model's temperature scaling
(held-out training images) and for its summary; ``aikd eval`` asks a saved model the same questions. Both
go through :class:`Evaluator`, which keeps each answer with the epoch of the model that gave it and
computes it again only once the model has moved on. In a distributed run every rank predicts its own
contiguous block of a split and the blocks are gathered in rank order, so every sample counts once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from aikd.data import DataBundle
from aikd.data.loaders import rank_eval_sampler
from aikd.data.splits import Split
from aikd.engine.output import SILENT, Output
from aikd.metrics import classification_metrics, predict
from aikd.metrics.calibration import ReliabilityBins, calibrate
from aikd.strategy import Placement

Calibration = tuple[dict[str, float], dict[str, ReliabilityBins]]  # (temperature, ece_ts, nll_ts), bins


class Evaluator:
    """Evaluates ``model`` on the splits of ``data`` (test: the test split, or the validation images), in float32
    whatever precision it trained in (:func:`aikd.metrics.predict` says why)."""

    def __init__(self, model: nn.Module, data: DataBundle, placement: Placement | None = None,
                 output: Output = SILENT) -> None:
        placement = placement or Placement()
        self.model, self.data, self.device = model, data, placement.device
        self.channels_last, self.strategy, self.output = placement.channels_last, placement.strategy, output
        self._loaders: dict[str, Any] = {}  # kept: an image-file loader's workers persist between epochs
        self._answers: dict[str, tuple[int | None, Any]] = {}  # question -> (epoch of the model, answer)

    def prepare(self, images: Tensor) -> Tensor:
        """A batch of evaluation images on the device, normalised, in the model's memory format."""
        images = self.data.to_device(images, train=False, generator=None)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def loader(self, split: Split) -> Any:
        """Sequential batches over ``split`` (this rank's block of it in a distributed run)."""
        sampler = rank_eval_sampler(len(split), self.data.loading.eval_batch_size, self.strategy.rank,
                                    self.strategy.world_size)
        return self.data.loader(False, sampler, pin_memory=self.device.type == "cuda", split=split, device=self.device)

    def predict(self, split: Split | None = None, description: str = "eval") -> tuple[Tensor, Tensor]:
        """(logits, labels) of the model as it is now on a whole split (default: the test split), on the CPU."""
        split = self.data.test if split is None else split
        named = {"test": self.data.test, "holdout": self.data.holdout}
        name = next((key for key, value in named.items() if value is split), None)
        if name is None:
            loader = self.loader(split)
        else:
            loader = self._loaders[name] = self._loaders.get(name) or self.loader(split)
        bar = self.output.bar(len(loader), description)
        logits, labels = predict(self.model, loader, self.prepare, self.device, bar)
        bar.close()
        gather = self.strategy.gather_rows  # on the device: NCCL moves GPU tensors only
        return gather(logits.to(self.device)).cpu(), gather(labels.to(self.device)).cpu()

    def _answer(self, question: str, epoch: int | None, compute: Callable[[], Any]) -> Any:
        saved = self._answers.get(question)
        if saved is None or saved[0] != epoch:
            self._answers[question] = saved = (epoch, compute())
        return saved[1]

    def test_predictions(self, epoch: int | None) -> tuple[Tensor, Tensor]:
        """(logits, labels) on the test split of the model at ``epoch``."""
        return self._answer("test", epoch, self.predict)

    def metrics(self, epoch: int | None) -> dict[str, float]:
        """Test metrics (top-1/5 error, macro F1, ECE, NLL) of the model at ``epoch``."""
        return self._answer("metrics", epoch, lambda: classification_metrics(*self.test_predictions(epoch)))

    def calibration(self, epoch: int | None) -> Calibration | None:
        """Temperature scaling fitted on the held-out training images and the test set's bins before and
        after it, for the model at ``epoch``; None without held-out images (``data.holdout=0``)."""
        if self.data.holdout is None:
            return None

        def fit() -> Calibration:
            held = self.predict(self.data.holdout, "holdout")
            return calibrate(*held, *self.test_predictions(epoch))

        return self._answer("calibration", epoch, fit)
