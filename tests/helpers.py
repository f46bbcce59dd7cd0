"""Assertions shared by test modules."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def check_loss_records(metrics: Path, terms: set[str], epochs: int) -> list[dict]:
    """Every epoch logged, with exactly ``terms`` as finite loss terms that sum to train.loss."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
    for record in records:
        check_loss_records_of(record, terms)
    return records


def check_loss_records_of(record: dict, terms: set[str]) -> None:
    """One epoch's record has exactly ``terms`` as finite loss terms that sum to train.loss."""
    logged = {k.removeprefix("loss.") for k in record if k.startswith("loss.")}
    assert logged == terms
    values = [record[f"loss.{k}"] for k in logged]
    assert all(math.isfinite(v) for v in values), record
    assert record["train.loss"] == pytest.approx(sum(values), rel=1e-5)
    assert 0 <= record["train.acc"] <= 100


@contextlib.contextmanager
def tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """A real tmpfs mounted at ``folder`` with mount ``options`` ("size=1536k", "ro,size=64k"), unmounted after;
    the test is skipped where this process may not mount one."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}) here: {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


ROOT = Path(__file__).resolve().parents[1]
# This checkout's aikd in every subprocess, from any working folder (a relative PYTHONPATH would not follow).
AIKD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
AIKD_ENV["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), AIKD_ENV.get("PYTHONPATH")) if p)


def aikd_cli(*args: str, cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``aikd ARGS`` in a real subprocess (one CPU thread), its output captured as text."""
    return subprocess.run([sys.executable, "-m", "aikd", *args], cwd=cwd, env=AIKD_ENV, capture_output=True,
                          text=True, timeout=timeout)


def one_line_error_of(stderr: str) -> str:
    """The single 'aikd: error: ...' line a refused command prints, with no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("aikd: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def same_state(a: Any, b: Any) -> bool:
    """Whether two saved states are equal, tensors bit for bit, through the dicts and lists of an extra state
    (an optimizer's state_dict inside a method's ``_extra_state``)."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def tensors_of(state: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every tensor of a saved state with its dotted path, through the dicts and lists of extra states."""
    import torch

    if isinstance(state, torch.Tensor):
        yield prefix, state
    elif isinstance(state, dict):
        for key, value in state.items():
            yield from tensors_of(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(state, list | tuple):
        for i, value in enumerate(state):
            yield from tensors_of(value, f"{prefix}.{i}")
