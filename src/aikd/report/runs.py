"""Reading finished runs from disk for the report (``aikd report``): one :class:`Run` per run folder.

The report is made only from what runs leave on disk (summary.json, config.yaml, metrics.jsonl, read through
src/aikd/run_files.py), never from the engine. This module turns those files into runs and asks each run's
registered method what it says about the run's saved settings (:class:`MethodFacts`: its loss terms, its row
in the tables, whether it is an ablation), so that the tables (src/aikd/report/tables.py) and figures
(src/aikd/report/figures.py) name no method but the Baseline.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aikd.errors import AikdError
from aikd.run_files import read_saved_config, read_summary, teacher_path

# A row's sort key and name: the method's aikd.methods.table_rank (two values), the place among its rows, the name.
RowKey = tuple[int, str, int, str]
UNPLACED: RowKey = (1_000_000, "", 0, "")  # a run that no method placed: after every method's rows


@dataclass
class Run:
    """One finished run as the report sees it."""

    recipe: str
    method: str
    dataset: str
    model: str
    seed: int
    metrics: dict[str, Any]
    loss_terms: frozenset[str] | None  # what it trained with (Method.loss_terms), its ablation switches; None: unknown
    folder: Path
    subset: int = 0  # data.subset_seed: which draw of the training images
    row: RowKey = UNPLACED  # its row's place and name in the tables: from its method (MethodFacts.row)
    ablation: bool = False  # a setting that switches parts of its method off (AI-KD's Table 4 rows)
    calibration_figure: bool = False  # drawn also after temperature scaling (Method.calibration_figure)

    @property
    def draw(self) -> tuple[int, int]:
        """What pairs two runs: the same seed on the same training subset."""
        return self.seed, self.subset


def collect_runs(*roots: str | Path) -> tuple[list[Run], int]:
    """Every finished run under the ``roots``, one per (recipe, dataset, model, seed, subset); and how many
    duplicates were left out.

    A pipeline's phase-1 model and a ``ce`` run of the same seed are the same recipe; the first found
    is kept. Several roots make one report (seeds of one table committed in two places).
    """
    runs: dict[tuple, Run] = {}
    duplicates = 0
    for root in map(Path, roots):
        if not root.is_dir():
            raise AikdError(f"Report folder '{root}' does not exist.")
        for path in _summaries(root):
            run = _read_run(path, root)
            key = (run.recipe, run.dataset, run.model, run.draw)
            if key in runs:
                duplicates += 1
            else:
                runs[key] = run
    if not runs:
        raise AikdError(f"No finished runs (summary.json files) under {', '.join(f'{r}' for r in roots)}.")
    return list(runs.values()), duplicates


def _summaries(root: Path) -> list[Path]:
    """Every summary.json under ``root``, following linked run folders (a sweep's Baseline links to its phase-1
    model, which may sit in a cache outside ``root``); a folder reached twice is read once."""
    seen: set[str] = set()
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        dirs.sort()
        if "summary.json" in files:
            found.append(Path(folder) / "summary.json")
    return sorted(found)


def _read_run(path: Path, root: Path) -> Run:
    summary = read_summary(path)
    try:
        method, dataset, model, seed = summary["method"], summary["dataset"], summary["model"], int(summary["seed"])
        if summary.get("eval_split", "test") != "test":  # never in one column with test-set numbers
            dataset = f"{dataset} ({summary['eval_split']})"
    except (KeyError, TypeError, ValueError) as err:
        raise AikdError(f"'{path}' is not a run summary written by aikd ({type(err).__name__}: {err}).") from None
    _check_metrics(summary, path)
    summary["total_time_s"] = _total_time(summary, path.parent)
    config = _saved_config(path.parent / "config.yaml")
    subset = int((config.get("data") or {}).get("subset_seed") or 0)
    recipe = summary.get("recipe") or method
    facts = _method_facts(config, method, recipe)
    return Run(recipe, method, dataset, model, seed, summary, facts.loss_terms, path.parent, subset, facts.row,
               facts.ablation, facts.calibration_figure)


ALWAYS_MEASURED = ("top1_err", "top5_err", "macro_f1", "ece", "nll")  # null only in a damaged summary
METRIC_KEYS = ("top1_err", "top5_err", "macro_f1", "ece", "ece_ts", "nll", "nll_ts", "train_acc", "train_time_s")


def _check_metrics(summary: dict[str, Any], path: Path) -> None:
    """Every metric a table may show is a finite number (or absent): a report never prints nan as a value."""
    for key in METRIC_KEYS:
        value = summary.get(key)
        if value is None and key in ALWAYS_MEASURED and key in summary:
            raise AikdError(f"'{path}': metric '{key}' is null, but every finished run measures it (a damaged or "
                            f"hand-edited summary?). Fix or remove that run.")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise AikdError(f"'{path}': metric '{key}' is {value!r}, not a number. Fix or remove that run.")
        if not math.isfinite(value):
            raise AikdError(f"'{path}': metric '{key}' is {value}, not a finite number (a diverged run?). "
                            f"Fix or remove that run.")


def _saved_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return read_saved_config(path)


def _total_time(summary: dict[str, Any], run_dir: Path) -> float | None:
    """Training wall time from nothing to this model: its own, plus its teacher's phase 1 if it had one.

    The phase-1 time comes from the pipeline's record beside the run (``../pipeline.json``),
    else from the summary next to the teacher checkpoint the run names; None if it cannot be
    found (a teacher trained elsewhere), so that no cost is understated.
    """
    own = summary.get("train_time_s")
    teacher = teacher_path(summary, run_dir)
    if own is None or teacher is None:
        return own
    record = run_dir.parent / "pipeline.json"
    candidates = [record] if record.is_file() else []
    candidates.append(teacher.parent.parent / "summary.json")  # <entry>/checkpoints/last
    for path in candidates:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        phase1 = (data.get("superior") or data).get("train_time_s")
        if phase1 is not None:
            return own + phase1
    return None


@dataclass(frozen=True)
class MethodFacts:
    """What a run's method says about the run's saved settings."""

    loss_terms: frozenset[str] | None  # the loss terms it trained with; None when the method or settings are unknown
    row: RowKey  # its row: the method's place among methods, the row's among the method's, the row's name
    ablation: bool = False  # Method.is_ablation: shown in the method's ablation table only
    calibration_figure: bool = False  # the method's own recipe, with Method.calibration_figure


def _method_facts(config: dict[str, Any], method: str, recipe: str) -> MethodFacts:
    """What the run's method says about its saved settings: the loss terms it trained with
    (``Method.loss_terms``), its row in the tables (``table_rank``, ``Method.recipe_rows`` or
    ``Method.report_row``, and a grid point's settings in brackets), whether it is an ablation, and whether
    its reliability curve is drawn after temperature scaling too."""
    from aikd.config import from_saved
    from aikd.errors import ConfigError
    from aikd.methods import METHODS, table_rank

    base, bracket, variant = recipe.partition("[")
    grid = f" [{variant}" if bracket else ""
    try:  # a run without its config.yaml trained with the defaults
        method_cls = METHODS.get(method)
        hparams = from_saved({**(config or {}), "method": method}).hparams
    except ConfigError:  # a method no longer known, or a config that no longer validates: named by its recipe
        return MethodFacts(None, (*table_rank(method), 0, recipe))
    place, name = method_cls.recipe_rows.get(base) or method_cls.report_row(hparams)
    return MethodFacts(frozenset(method_cls.loss_terms(hparams)), (*table_rank(method), place, name + grid),
                       method_cls.is_ablation(hparams), method_cls.calibration_figure and recipe == method)


def read_history(path: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl as {epoch: record}; a run resumed after a crash keeps the last record of each epoch."""
    if not path.is_file():
        return {}
    history = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash mid-write
            continue
        if isinstance(record, dict) and "epoch" in record:
            history[int(record["epoch"])] = record
    return history
