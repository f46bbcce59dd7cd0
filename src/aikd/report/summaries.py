"""Collecting run summaries from disk and reducing them over seeds."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def load_summaries(root: str | Path) -> list[dict[str, Any]]:
    """Every summary.json under ``root``, each with its ``run_dir`` (relative to ``root``)."""
    root = Path(root)
    rows = []
    for path in sorted(root.rglob("summary.json")):
        summary = json.loads(path.read_text())
        summary["run_dir"] = str(path.parent.relative_to(root))
        rows.append(summary)
    return rows


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for a single value) and count."""
    values = list(values)
    if not values:
        raise ValueError("no values to average")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std, len(values)


def format_mean_std(values: Iterable[float], digits: int = 2) -> str:
    mean, std, _ = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"
