"""Assertions shared by test modules."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

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
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}) here: {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)
