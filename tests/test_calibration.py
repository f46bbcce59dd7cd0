"""Temperature scaling, reliability bins and calibrated training runs."""

from __future__ import annotations

import json

import pytest
import torch

from aikd.config import load_config
from aikd.engine import Trainer
from aikd.errors import AikdError
from aikd.evaluation import evaluate_checkpoint
from aikd.metrics.calibration import ReliabilityBins, calibrate, fit_temperature, reliability_bins
from aikd.metrics.classification import expected_calibration_error


def calibrated_sample(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels where each label is drawn from softmax(logits): calibrated by construction."""
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(n, classes, generator=g, dtype=torch.float64)
    labels = torch.multinomial(logits.softmax(dim=1), 1, generator=g).flatten()
    return logits, labels


@pytest.mark.parametrize("sharpening", [0.5, 2.5])
def test_temperature_scaling_recovers_a_known_temperature(sharpening):
    logits, labels = calibrated_sample(40_000, 10, seed=1)
    # A model reporting logits * s is miscalibrated; dividing by T = s undoes it.
    assert fit_temperature(logits * sharpening, labels) == pytest.approx(sharpening, rel=0.05)


def test_calibrated_synthetic_set_has_near_zero_ece_and_sharpened_one_does_not():
    logits, labels = calibrated_sample(40_000, 10, seed=2)
    assert expected_calibration_error(logits.float().softmax(1), labels) < 1.0
    assert expected_calibration_error((2.5 * logits).float().softmax(1), labels) > 10.0


def test_bins_ece_equals_torchmetrics_and_bins_add_up():
    logits, labels = calibrated_sample(5_000, 7, seed=3)
    logits = 2 * logits  # miscalibrated, so the ECE is far from zero
    bins = reliability_bins(logits, labels)
    assert bins.ece() == pytest.approx(expected_calibration_error(logits.float().softmax(1), labels), abs=1e-3)
    assert sum(bins.counts) == 5_000
    accuracy = (logits.argmax(1) == labels).sum().item()
    assert sum(bins.correct) == accuracy
    half = reliability_bins(logits[:2_000], labels[:2_000]) + reliability_bins(logits[2_000:], labels[2_000:])
    assert half.counts == bins.counts and half.correct == bins.correct
    assert ReliabilityBins.from_dict(json.loads(json.dumps(bins.to_dict()))).ece() == pytest.approx(bins.ece())


def test_calibrate_leaves_predictions_and_lowers_ece_of_an_overconfident_model():
    held_logits, held_labels = calibrated_sample(20_000, 10, seed=4)
    test_logits, test_labels = calibrated_sample(20_000, 10, seed=5)
    metrics, bins = calibrate(3 * held_logits, held_labels, 3 * test_logits, test_labels)
    assert metrics["temperature"] == pytest.approx(3.0, rel=0.05)
    assert metrics["ece_ts"] < 1.0 < bins["raw"].ece()
    assert sum(bins["ts"].correct) == sum(bins["raw"].correct)  # same argmax, same accuracy


DIGITS = ["data.name=digits", "model.name=small_cnn", "data.batch_size=64", "deterministic=true", "train.epochs=3"]


def test_run_with_holdout_reports_calibration_and_keeps_the_holdout_out_of_training(tmp_path, one_thread):
    trainer = Trainer(load_config(None, [*DIGITS, "data.holdout=0.2"]), tmp_path / "run", quiet=True)
    held = trainer.data.holdout
    assert held is not None and len(trainer.data.train) + len(held) == 1438  # digits' 80% training split
    assert len(held) == round(0.2 * 1438)
    train_rows = {bytes(x.numpy()) for x in trainer.data.train.images}
    assert not any(bytes(x.numpy()) in train_rows for x in held.images[:50])
    assert torch.bincount(held.labels, minlength=10).min() > 0  # stratified: every class is held out
    summary = trainer.fit()
    assert {"temperature", "ece_ts", "nll_ts"} <= summary.keys() and summary["temperature"] > 0
    assert summary["recipe"] == "ce"
    saved = json.loads((tmp_path / "run/reliability.json").read_text())
    assert sum(saved["raw"]["counts"]) == summary["num_test"]
    assert (tmp_path / "run/reliability.png").read_bytes()[:4] == b"\x89PNG"
    result = evaluate_checkpoint(tmp_path / "run/checkpoints/last.safetensors", calibrate=True,
                                 plot=tmp_path / "eval.png", quiet=True)
    assert result["temperature"] == pytest.approx(summary["temperature"], rel=1e-4)
    assert result["ece_ts"] == pytest.approx(summary["ece_ts"], abs=1e-3)
    assert (tmp_path / "eval.png").is_file()


def test_calibrate_without_holdout_explains_what_to_do(tmp_path, one_thread):
    Trainer(load_config(None, [*DIGITS, "train.epochs=1"]), tmp_path, quiet=True).fit()
    with pytest.raises(AikdError, match=r"data\.holdout=0\.1"):
        evaluate_checkpoint(tmp_path / "checkpoints/last.safetensors", calibrate=True, quiet=True)
