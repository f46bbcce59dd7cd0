"""The small ones, one line each: a download without a network, a null metric in a summary, a pickled weights
file (without torch's advice to load it unsafely)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from aikd.errors import CheckpointError
from aikd.models.weights import read_state_dict
from helpers import AIKD_ENV, aikd_cli, one_line_error_of


def test_download_without_a_network_is_one_line_naming_the_dataset_and_folder(tmp_path, monkeypatch):
    """No network: every request goes to a proxy on a closed local port (refused at once)."""
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setitem(AIKD_ENV, key, "http://127.0.0.1:9")
    monkeypatch.setitem(AIKD_ENV, "no_proxy", "")
    for name, shown in (("cifar10", "CIFAR-10"), ("fashion-mnist", "Fashion-MNIST")):
        root = tmp_path / name
        done = aikd_cli("check-data", "-c", "configs/fashion_mnist/ce.yaml", f"data.name={name}",
                        f"data.root={root}", "data.download=true", timeout=300)
        line = one_line_error_of(done.stderr)
        assert done.returncode == 2 and f"Cannot download {shown} into '{root}'" in line, line


class Pickled:
    """Not a tensor: torch's weights_only load refuses it."""


def test_a_pickled_weights_file_is_refused_without_torchs_advice_to_load_it_unsafely(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2), "extra": Pickled()}, path)
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(path)
    message = str(caught.value)
    assert f"'{path}'" in message and "pickled objects besides tensors" in message
    assert "weights_only=False" not in message and "\n" not in message


def test_a_null_metric_in_a_summary_is_named_by_the_report(tmp_path):
    source = next(Path(__file__).resolve().parents[1].glob("results/fmnist_proxy/table10/**/summary.json"))
    run = tmp_path / "run"
    shutil.copytree(source.parent, run, symlinks=True, ignore=shutil.ignore_patterns("checkpoints"))
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "top1_err": None}))
    done = aikd_cli("report", str(tmp_path))
    line = one_line_error_of(done.stderr)
    assert done.returncode == 2 and f"'{run / 'summary.json'}': metric 'top1_err' is null" in line, line
