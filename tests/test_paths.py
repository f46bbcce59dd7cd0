"""Where runs are written and how they are found again: never outside ``-o``, and a moved folder still works.

Real `aikd` subprocesses on real config files in real folders; what a command wrote is listed with `find`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from helpers import aikd_cli as aikd

TINY = {"method": "ce", "model": {"name": "small_cnn"}, "device": "cpu",
        "data": {"name": "digits", "batch_size": 32, "train_limit": 64, "test_limit": 40},
        "train": {"epochs": 1}}


def found(folder: Path) -> set[str]:
    """Every file and folder under ``folder``, as `find` lists them."""
    done = subprocess.run(["find", str(folder)], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_a_sweep_writes_nowhere_but_its_out_folder_whatever_the_spelling_of_the_config_path(tmp_path):
    """Absolute, relative and `..` paths of one config name one file: one folder inside -o, trained once."""
    home = tmp_path / "dir"
    sub = home / "sub"
    sub.mkdir(parents=True)
    (home / "mypskd.yaml").write_text(yaml.safe_dump(TINY))
    work = tmp_path / "work"
    work.mkdir()
    out = work / "o"
    before = found(tmp_path)
    for config, cwd in [(str(sub / ".." / "mypskd.yaml"), work), ("../mypskd.yaml", sub), ("mypskd.yaml", home)]:
        done = aikd("sweep", "-q", "-c", config, "--seeds", "0", "-o", str(out), cwd=cwd)
        assert done.returncode == 0, done.stderr
        outside = sorted(p for p in found(tmp_path) - before if not p.startswith(f"{out}/") and p != str(out))
        assert outside == [], outside
        assert done.stdout.startswith(f"aikd sweep: 1 runs finished in {out}")
    summaries = [p for p in found(out) if p.endswith("/summary.json")]
    assert len(summaries) == 1 and (out / "dir" / "mypskd" / "seed0" / "student" / "summary.json").is_file()
    report = aikd("report", str(out), cwd=work)
    assert report.returncode == 0 and "| Baseline |" in report.stdout, report.stderr
