"""Repeated inputs and runs of another config: refused in one line before any compute, and every command a
refusal suggests works. Real `aikd` subprocesses on real config files."""

from __future__ import annotations

from pathlib import Path

import yaml

from helpers import aikd_cli, one_line_error_of

TINY = {"model": {"name": "small_cnn"}, "device": "cpu", "train": {"epochs": 1},
        "data": {"name": "digits", "batch_size": 32, "train_limit": 64, "test_limit": 40}}


def config(folder: Path, method: str = "pskd", **data) -> Path:
    path = folder / "cfg" / f"{method}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump({**TINY, "method": method, "data": {**TINY["data"], **data}}))
    return path


def test_a_repeated_seed_or_config_is_refused_before_anything_runs(tmp_path):
    cfg = config(tmp_path)
    out = tmp_path / "o"
    for args, words in ((["-c", str(cfg), "--seeds", "0", "0"], "--seeds repeats 0"),
                        (["-c", str(cfg), str(cfg.parent / ".." / "cfg" / "pskd.yaml"), "--seeds", "0"],
                         "names the config")):
        done = aikd_cli("sweep", "-q", *args, "-o", str(out))
        assert done.returncode == 2 and words in one_line_error_of(done.stderr)
        assert not out.exists()


def test_sweep_overwrite_replaces_a_run_of_another_config_as_its_refusal_says(tmp_path):
    cfg, out = config(tmp_path), tmp_path / "o"
    sweep = ("sweep", "-q", "-c", str(cfg), "--seeds", "0", "-o", str(out))
    assert aikd_cli(*sweep).returncode == 0
    config(tmp_path, test_limit=30)  # the same file, another config
    refused = aikd_cli(*sweep)
    assert refused.returncode == 2 and "pass --overwrite to replace it" in one_line_error_of(refused.stderr)
    replaced = aikd_cli(*sweep, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    saved = yaml.safe_load((out / "cfg" / "pskd" / "seed0" / "student" / "config.yaml").read_text())
    assert saved["data"]["test_limit"] == 30


def test_demo_over_an_unfinished_run_of_another_config_refuses_before_phase_1_naming_overwrite(tmp_path):
    out = tmp_path / "demo"
    started = aikd_cli("train", "-q", "-c", str(config(tmp_path, "ce")), "-o", str(out / "student"),
                       "train.epochs=2", "--stop-after", "1")
    assert started.returncode == 0 and (out / "student" / "checkpoints" / "last.safetensors").is_file()
    done = aikd_cli("demo", "-q", "-o", str(out), "data.train_limit=64", "data.test_limit=40", "train.epochs=1")
    line = one_line_error_of(done.stderr)
    assert done.returncode == 2 and "unfinished run made with another config" in line and "--overwrite" in line
    assert "data.name" in line and "{" not in line  # the keys that differ, not a dict dump
    assert not (out / "superior").exists()  # refused before phase 1 trained anything
