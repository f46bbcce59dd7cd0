"""tsne, bench, export and report check -o before any compute and write atomically with the umask's mode.

Real `aikd` subprocesses under a real umask (027) on a real checkpoint.
"""

from __future__ import annotations

import importlib.util
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import AIKD_ENV, ROOT, aikd_cli, one_line_error_of

TINY = ["data.name=digits", "model.name=small_cnn", "data.batch_size=32", "data.train_limit=100",
        "data.test_limit=100", "train.epochs=1", "device=cpu"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("writes") / "run"
    done = aikd_cli("train", "-q", "-c", "configs/fashion_mnist/ce.yaml", "-o", str(out), *TINY)
    assert done.returncode == 0, done.stderr
    return out / "checkpoints" / "last.safetensors"


def under_umask_027(*args: str) -> subprocess.CompletedProcess:
    command = " ".join(f"'{a}'" for a in (sys.executable, "-m", "aikd", *args))
    return subprocess.run(["sh", "-c", f"umask 027 && exec {command}"], cwd=ROOT, env=AIKD_ENV, capture_output=True,
                          text=True, timeout=600)


def test_export_writes_every_file_atomically_with_the_umasks_mode(tmp_path, checkpoint):
    onnx = importlib.util.find_spec("onnxscript") is not None
    done = under_umask_027("export", "-k", str(checkpoint), "-o", str(tmp_path / "exp"), *([] if onnx else
                                                                                             ["--no-onnx"]))
    assert done.returncode == 0, done.stderr
    written = sorted(p.name for p in (tmp_path / "exp").iterdir())
    assert written == sorted(["export.json", "model.safetensors", *(["model.onnx"] if onnx else [])])  # no temp
    for name in written:
        assert stat.S_IMODE((tmp_path / "exp" / name).stat().st_mode) == 0o640, name


def test_tsne_checks_its_output_before_loading_anything_and_writes_exactly_that_path(tmp_path, checkpoint):
    run_folder = checkpoint.parent.parent
    done = aikd_cli("tsne", "-k", str(tmp_path / "no_such.safetensors"), "-o", str(run_folder))
    line = one_line_error_of(done.stderr)  # the output is refused first: the missing checkpoint is never opened
    assert done.returncode == 2 and f"'{run_folder}' is a folder" in line and "tsne.png" in line, line
    assert not run_folder.with_suffix(".png").exists()
    out = tmp_path / "t1"
    made = under_umask_027("tsne", "-k", str(checkpoint), "--classes", "0", "1", "--per-class", "10", "-o", str(out))
    assert made.returncode == 0 and made.stdout.strip() == f"aikd tsne: wrote {out}", made.stderr
    assert out.read_bytes().startswith(b"\x89PNG") and stat.S_IMODE(out.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t1"]


def test_bench_checks_its_output_before_timing_anything(tmp_path):
    done = aikd_cli("bench", "--quick", "-o", str(tmp_path), timeout=60)
    line = one_line_error_of(done.stderr)
    assert done.returncode == 2 and f"'{tmp_path}' is a folder" in line and "bench.json" in line, line


def test_report_into_a_folder_suggests_a_report_file_name(tmp_path):
    done = aikd_cli("report", str(tmp_path), "-f", "latex", "-o", str(tmp_path))
    line = one_line_error_of(done.stderr)
    assert done.returncode == 2 and f"'{tmp_path / 'tables.tex'}'" in line and "out.json" not in line, line
