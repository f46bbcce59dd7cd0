"""Where runs are written and how they are found again: never outside ``-o``, and a moved folder still works.

Real `aikd` subprocesses on real config files in real folders; what a command wrote is listed with `find`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import yaml

from helpers import aikd_cli as aikd
from helpers import one_line_error_of

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


def test_a_damaged_summary_config_or_lock_in_a_run_folder_is_named_in_one_line(tmp_path):
    """The next sweep over a run folder whose files were damaged names the file; restored, the run is reused."""
    config = tmp_path / "cfg" / "ce.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "o"
    sweep = ("sweep", "-q", "-c", str(config), "--seeds", "0", "-o", str(out))
    assert aikd(*sweep).returncode == 0
    run = (out / "cfg" / "ce" / "seed0" / "student").resolve()  # the Baseline lives in the phase-1 cache
    for name, damage in (("summary.json", '{"method": "ce", "top1'), ("config.yaml", "data: {name: [digits\n")):
        kept = (run / name).read_bytes()
        (run / name).write_text(damage)
        done = aikd(*sweep)
        line = one_line_error_of(done.stderr)
        assert done.returncode == 2 and f"'{run / name}' is not a run" in line, line
        (run / name).write_bytes(kept)
    lock = run / ".phase1.lock"
    lock.unlink(missing_ok=True)
    lock.mkdir()
    done = aikd(*sweep)
    assert done.returncode == 2 and f"Cannot open the lock file '{lock}'" in one_line_error_of(done.stderr)
    lock.rmdir()
    assert aikd(*sweep).returncode == 0


def test_a_moved_pipeline_folder_is_reused_resumed_and_reported_while_its_teacher_weights_stay(tmp_path):
    """The teacher is known by its content hash beside its path: the path may change with the folder, the
    weights may not."""
    config = tmp_path / "cfg" / "kd.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump({**TINY, "method": "kd"}))
    first = tmp_path / "first" / "p"
    assert aikd("pipeline", "-q", "-c", str(config), "-o", str(first)).returncode == 0
    summary = json.loads((first / "student" / "summary.json").read_text())
    teacher = (first / "student" / summary["teacher"]).resolve()
    assert not Path(summary["teacher"]).is_absolute() and teacher.is_file()
    assert summary["teacher_sha256"] == hashlib.sha256(teacher.read_bytes()).hexdigest()

    moved = tmp_path / "elsewhere" / "p"
    moved.parent.mkdir()
    first.rename(moved)
    again = aikd("pipeline", "-c", str(config), "-o", str(moved))  # finished: reused, nothing trained
    assert again.returncode == 0 and again.stderr.count("reusing the finished run") == 2, again.stderr
    (moved / "student" / "summary.json").unlink()  # killed after its last checkpoint: continued, not refused
    resumed = aikd("pipeline", "-c", str(config), "-o", str(moved))
    assert resumed.returncode == 0 and "resuming the unfinished run" in resumed.stderr, resumed.stderr
    report = aikd("report", str(moved.parent))
    assert report.returncode == 0 and "| KD |" in report.stdout, report.stderr

    entry = next((moved / "superior").iterdir())
    shutil.copy(moved / "student" / "checkpoints" / "last.safetensors", entry / "checkpoints" / "last.safetensors")
    changed = aikd("pipeline", "-q", "-c", str(config), "-o", str(moved))  # same path, other weights: refused
    line = one_line_error_of(changed.stderr)
    assert changed.returncode == 2 and "another config" in line, line
