"""The evaluator: each answer computed once per epoch of the model, again once the model moved on; the trainer's
summary and `aikd eval` give the same numbers through it."""

from __future__ import annotations

import pytest
import torch

from aikd.config import load_config
from aikd.data import load_data
from aikd.data.settings import DataConfig
from aikd.engine import Trainer
from aikd.engine.evaluator import Evaluator
from aikd.evaluation import evaluate_checkpoint
from aikd.metrics import classification_metrics
from aikd.models import build_model
from aikd.strategy import Placement

DIGITS = ["data.name=digits", "model.name=small_cnn", "data.batch_size=64", "deterministic=true", "device=cpu",
          "train.epochs=1", "data.holdout=0.1", "data.train_limit=400"]


class CountingModel(torch.nn.Module):
    """A model that counts the images it is asked about."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.images = inner, 0

    def forward(self, x):
        self.images += len(x)
        return self.inner(x)


@pytest.fixture
def evaluator():
    data = load_data(DataConfig(name="digits", holdout=0.2, eval_batch_size=50))
    torch.manual_seed(0)
    return Evaluator(CountingModel(build_model("small_cnn", data.num_classes, data.in_channels, data.image_size)),
                     data, Placement(torch.device("cpu")))


def test_each_answer_is_computed_once_per_epoch_and_again_after_the_model_moved(evaluator):
    n_test, n_held = len(evaluator.data.test), len(evaluator.data.holdout)
    first = evaluator.metrics(epoch=1)
    assert evaluator.model.images == n_test
    assert evaluator.metrics(epoch=1) is first and evaluator.model.images == n_test  # cached
    metrics, bins = evaluator.calibration(epoch=1)  # reuses the test predictions, adds the holdout's
    assert evaluator.model.images == n_test + n_held and 0 < metrics["temperature"] < 100 and bins
    assert evaluator.calibration(epoch=1)[0] is metrics
    with torch.no_grad():
        evaluator.model.inner.head.weight.mul_(-1)  # the model of epoch 2 answers otherwise
    second = evaluator.metrics(epoch=2)
    assert evaluator.model.images == 2 * n_test + n_held
    logits, labels = evaluator.predict()
    assert second == classification_metrics(logits, labels) and second != first


def test_the_summary_and_aikd_eval_agree(tmp_path, one_thread):
    summary = Trainer(load_config(None, DIGITS), tmp_path, quiet=True).fit()
    evaluated = evaluate_checkpoint(tmp_path / "checkpoints/last.safetensors", quiet=True, calibrate=True)
    for key in ("top1_err", "top5_err", "ece", "nll", "macro_f1", "temperature", "ece_ts", "nll_ts"):
        # Equal up to float rounding: the run evaluates in channels_last, a loaded checkpoint in NCHW.
        assert evaluated[key] == pytest.approx(summary[key], rel=1e-6, abs=1e-6), key
