"""Sizes a model cannot take are refused before any compute, in one line: eval's image size, batches of one.

Real `aikd` subprocesses on a real ImageFolder tree of PNGs and on the embedded digits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import aikd_cli, one_line_error_of

CONFIG = "configs/fashion_mnist/ce.yaml"
DIGITS = ["data.name=digits", "model.name=small_cnn", "data.test_limit=40", "train.epochs=1", "device=cpu"]


@pytest.fixture(scope="module")
def trained_at_32(tmp_path_factory) -> Path:
    """The checkpoint of a small CNN trained at 32 pixels on an ImageFolder tree of PNGs."""
    tmp = tmp_path_factory.mktemp("sizes")
    rng = np.random.default_rng(7)
    for split, count in (("train", 6), ("test", 3)):
        for cls in ("ant", "bee"):
            folder = tmp / "images" / split / cls
            folder.mkdir(parents=True)
            for k in range(count):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    done = aikd_cli("train", "-q", "-c", CONFIG, "-o", str(tmp / "run"), "data.name=imagefolder",
                    f"data.root={tmp / 'images'}", "data.image_size=32", "model.name=small_cnn", "data.batch_size=4",
                    "train.epochs=1", "device=cpu", "data.num_workers=0")
    assert done.returncode == 0, done.stderr
    return tmp / "run" / "checkpoints" / "last.safetensors"


def test_eval_at_another_image_size_is_refused_naming_both_sizes(trained_at_32, tmp_path):
    checkpoint = trained_at_32
    done = aikd_cli("eval", "-k", str(checkpoint), "-o", str(tmp_path / "eval.json"), "data.image_size=24",
                    "data.num_workers=0")
    line = one_line_error_of(done.stderr)
    assert done.returncode == 2 and "trained on 32-pixel images" in line and "uses 24-pixel images" in line, line
    assert not (tmp_path / "eval.json").exists()
    same = aikd_cli("eval", "-q", "-k", str(checkpoint), "data.image_size=32", "data.num_workers=0")
    assert same.returncode == 0 and json.loads(same.stdout)["dataset"] == "imagefolder", same.stderr


def test_a_batch_of_one_under_batchnorm_is_refused_before_the_first_step(tmp_path):
    done = aikd_cli("train", "-q", "-c", CONFIG, "-o", str(tmp_path / "run"), *DIGITS, "data.train_limit=40",
                    "data.batch_size=1")
    line = one_line_error_of(done.stderr)
    assert done.returncode == 2 and "data.batch_size=1" in line and "BatchNorm" in line, line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("method", ["ce", "cskd"])
def test_a_last_batch_of_one_sample_is_left_out_and_the_run_finishes(tmp_path, method):
    """17 images in batches of 8: two batches an epoch, the 17th image in another epoch's batches."""
    done = aikd_cli("train", "-q", "-c", f"configs/fashion_mnist/{method}.yaml", "-o", str(tmp_path / "run"),
                    *DIGITS, "data.train_limit=17", "data.batch_size=8")
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["num_train"] == 17
