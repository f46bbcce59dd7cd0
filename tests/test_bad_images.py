"""A corrupt image in a file dataset: named in one line, found first by `aikd check-data`, or skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
RUN = ["data.name=imagefolder", "model.name=small_cnn", "data.image_size=32", "data.batch_size=8",
       "train.epochs=1", "device=cpu"]


@pytest.fixture
def tree(tmp_path) -> tuple[Path, list[Path]]:
    """An ImageFolder tree of real JPEGs and PNGs with two bad files: a truncated JPEG and a PNG of garbage."""
    rng = np.random.default_rng(3)
    root = tmp_path / "images"
    for split, count in (("train", 6), ("test", 2)):
        for cls in ("ant", "bee"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for k in range(count):
                pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{cls}{k}.{'jpg' if k % 2 else 'png'}")
    truncated = root / "train/ant/ant1.jpg"
    truncated.write_bytes(truncated.read_bytes()[:300])
    garbage = root / "test/bee/bee0.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 200, dtype=np.uint8)))
    return root, [truncated, garbage]


def aikd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aikd", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


def test_a_corrupt_image_met_in_a_loader_worker_is_named_in_one_line(tree, tmp_path):
    root, (truncated, _) = tree
    done = aikd("train", "-q", "-c", "configs/fashion_mnist/ce.yaml", "-o", str(tmp_path / "run"), *RUN,
                f"data.root={root}", "data.num_workers=2")
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith(f"aikd: error: Cannot decode image '{truncated}'"), \
        done.stderr
    assert "Traceback" not in done.stderr and "worker" not in done.stderr


def test_check_data_lists_every_bad_file_with_its_split(tree):
    root, (truncated, garbage) = tree
    done = aikd("check-data", "-c", "configs/fashion_mnist/ce.yaml", *RUN, f"data.root={root}")
    assert done.returncode == 1, done.stderr
    listed = [line.split("\t") for line in done.stdout.splitlines()]
    assert [(Path(row[0]), row[1]) for row in listed] == [(truncated, "training"), (garbage, "test")]
    assert "2 bad image files" in done.stderr and "data.skip_bad_files=true" in done.stderr
    truncated.unlink()
    garbage.unlink()
    clean = aikd("check-data", "-c", "configs/fashion_mnist/ce.yaml", *RUN, f"data.root={root}")
    assert clean.returncode == 0 and "every image file decodes" in clean.stderr


def test_skip_bad_files_trains_without_them_and_lists_them(tree, tmp_path):
    root, bad = tree
    done = aikd("train", "-q", "-c", "configs/fashion_mnist/ce.yaml", "-o", str(tmp_path / "run"), *RUN,
                f"data.root={root}", "data.skip_bad_files=true", "data.num_workers=2")
    assert done.returncode == 0, done.stderr
    assert "left out 2 image files that do not decode" in done.stderr
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert [entry.split(" (")[0] for entry in summary["skipped_files"]] == [str(p) for p in bad]
    assert summary["num_train"] == 11 and summary["num_test"] == 3
