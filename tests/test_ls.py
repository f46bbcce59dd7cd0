"""Label smoothing: the loss against torch's own label_smoothing (an independent formula) and by hand, its
gradient, mixed labels, and one epoch inside aikd's loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from aikd.config import load_config
from aikd.engine import Trainer
from aikd.errors import ConfigError
from aikd.methods import METHODS, Batch, MethodContext
from aikd.methods.ls import LSConfig, label_smoothing_loss, smoothed_targets
from aikd.models import build_model
from helpers import check_loss_records

pytestmark = pytest.mark.usefixtures("one_thread")

LOGITS = torch.tensor([[2.0, 1.0, 0.1, -0.5], [0.5, 2.5, -1.0, 0.3], [-0.2, 0.4, 1.7, 0.9]])
LABELS = torch.tensor([0, 1, 3])


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_equals_torch_label_smoothing_for_labels_and_mixed_labels(eps):
    assert label_smoothing_loss(LOGITS, LABELS, eps).item() == pytest.approx(
        F.cross_entropy(LOGITS, LABELS, label_smoothing=eps).item(), rel=1e-6)
    mixed = torch.softmax(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), 1)
    assert label_smoothing_loss(LOGITS, mixed, eps).item() == pytest.approx(
        F.cross_entropy(LOGITS, mixed, label_smoothing=eps).item(), rel=1e-6)


def test_by_hand():
    # Two classes, logits (ln 3, 0): p = (3/4, 1/4). Label 0, eps 0.1: y = (0.95, 0.05).
    logits = torch.tensor([[math.log(3.0), 0.0]])
    expected = -(0.95 * math.log(0.75) + 0.05 * math.log(0.25))
    assert label_smoothing_loss(logits, torch.tensor([0]), 0.1).item() == pytest.approx(expected, rel=1e-6)
    # spread=others, three classes: y = (0.9, 0.05, 0.05) against p = (1/2, 1/4, 1/4) (logits ln 2, 0, 0).
    logits = torch.tensor([[math.log(2.0), 0.0, 0.0]])
    expected = -(0.9 * math.log(0.5) + 0.1 * math.log(0.25))
    assert label_smoothing_loss(logits, torch.tensor([0]), 0.1, "others").item() == pytest.approx(expected, rel=1e-6)
    # A mixed label (0.6, 0.4) with eps 0.1 over two classes: (0.59, 0.41).
    torch.testing.assert_close(smoothed_targets(torch.tensor([[0.6, 0.4]]), 2, 0.1), torch.tensor([[0.59, 0.41]]))


def test_gradient_is_softmax_minus_the_smoothed_label():
    logits = LOGITS.clone().requires_grad_(True)
    label_smoothing_loss(logits, LABELS, 0.1).backward()
    smoothed = 0.9 * F.one_hot(LABELS, 4).float() + 0.1 / 4
    torch.testing.assert_close(logits.grad, (torch.softmax(LOGITS, 1) - smoothed) / 3)


def test_config_ranges():
    with pytest.raises(ConfigError, match=r"ls\.smoothing"):
        LSConfig(smoothing=1.0)
    with pytest.raises(ConfigError, match=r"ls\.smoothing"):
        LSConfig(smoothing=-0.1)


def test_method_step_is_the_loss_on_the_students_logits():
    torch.manual_seed(0)
    model = build_model("small_cnn", 4, 1, 8)
    method = METHODS.get("ls")(LSConfig(), MethodContext(num_classes=4, num_train=8, epochs=1, student=model))
    images = torch.randn(3, 1, 8, 8)
    out = method.training_step(model, Batch(images, LABELS, torch.arange(3), 0, 0))
    assert set(out.losses) == METHODS.get("ls").loss_terms(LSConfig()) == {"ce"}
    assert out.losses["ce"].item() == pytest.approx(
        F.cross_entropy(out.logits, LABELS, label_smoothing=0.1).item(), rel=1e-6)


def test_trains_one_epoch_in_aikds_loop(tmp_path):
    overrides = ["data.name=digits", "model.name=small_cnn", "data.batch_size=64", "data.train_limit=256",
                 "data.test_limit=128", "deterministic=true", "device=cpu", "train.epochs=1", "method=ls"]
    summary = Trainer(load_config(None, overrides), tmp_path, quiet=True).fit()
    assert summary["method"] == "ls"
    check_loss_records(tmp_path / "metrics.jsonl", {"ce"}, epochs=1)
