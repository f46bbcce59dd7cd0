"""The report's figures (``aikd report --plots``): the numbers each figure shows, and one PNG per (dataset, model).

Each ``*_data`` function gathers a figure's numbers from the runs (reliability bins, learning curves from
metrics.jsonl, the paired table's differences, the cost table's ratios), so that they can be tested without
drawing; each ``*_figures`` function hands them to the matplotlib drawing in src/aikd/report/plots.py. Rows are
named and ordered as in the tables (:class:`aikd.report.tables.Rows`).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aikd.report.runs import Run, read_history
from aikd.report.tables import ECE, NLL, TOP1, Rows, cost_table, group_order, paired_table

if TYPE_CHECKING:
    from aikd.report.plots import TradeoffPoint


def reliability_figures(runs: Sequence[Run], out_dir: str | Path) -> list[Path]:
    """One reliability diagram per (dataset, model), like the paper's Figures 4-5.

    Each recipe with calibrated runs is one line (its test-set bins pooled over
    seeds); a method with ``calibration_figure`` (AI-KD) also gets its own recipe's line after temperature
    scaling.
    """
    from aikd.metrics.calibration import ReliabilityBins
    from aikd.metrics.reliability import reliability_diagram

    rows = Rows(runs)
    pooled: dict[tuple[str, str], dict[str, ReliabilityBins]] = defaultdict(dict)
    for run in runs:
        path = run.folder / "reliability.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        curves = pooled[(run.dataset, run.model)]
        row = rows.label(run.recipe)
        entries = [(row, data["raw"])] + ([(f"{row} + TS", data["ts"])] if run.calibration_figure else [])
        for name, bins in entries:
            bins = ReliabilityBins.from_dict(bins)
            curves[name] = curves[name] + bins if name in curves else bins
    written = []
    order = [rows.label(r) for r in rows.order({r.recipe for r in runs})]
    for (dataset, model), curves in sorted(pooled.items()):
        ordered = dict(sorted(curves.items(), key=lambda kv: _curve_rank(kv[0], order)))
        path = Path(out_dir) / f"reliability_{dataset}_{model}.png"
        written.append(reliability_diagram(ordered, path, f"{dataset} / {model}"))
    return written


def _curve_rank(name: str, order: list[str]) -> tuple[int, str]:
    base = name.removesuffix(" + TS")
    return (order.index(base) if base in order else len(order), name)


CURVE_METRICS = (("test.top1_err", "Top-1 error (%)"), ("test.ece", "ECE (%)"))


Curves = dict[str, dict[str, tuple[Any, Any, Any]]]  # metric title -> row name -> (epochs, mean, std)


def learning_curve_data(runs: Sequence[Run]) -> dict[tuple[str, str], Curves]:
    """Per (dataset, model): for each metric and recipe, (epochs, mean over seeds, std over seeds).

    Only the epochs that every seed of a recipe evaluated count (``train.eval_every``), read
    from each run's metrics.jsonl; the std is the population std of the seeds (the band drawn).
    """
    import numpy as np

    rows = Rows(runs)
    by_group: dict[tuple[str, str], dict[str, list[dict[int, dict[str, Any]]]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        history = read_history(run.folder / "metrics.jsonl")
        if history:
            by_group[(run.dataset, run.model)][run.recipe].append(history)
    data = {}
    for group, recipes in sorted(by_group.items()):
        curves: Curves = {title: {} for _, title in CURVE_METRICS}
        for recipe in rows.order(set(recipes)):
            histories = recipes[recipe]
            epochs = sorted(set.intersection(*(set(h) for h in histories)))
            for key, title in CURVE_METRICS:
                points = [e for e in epochs if all(key in h[e] for h in histories)]
                if points:
                    values = np.array([[h[e][key] for e in points] for h in histories])
                    curves[title][rows.label(recipe)] = (np.array(points), values.mean(0), values.std(0))
        curves = {title: lines for title, lines in curves.items() if lines}
        if curves:
            data[group] = curves
    return data


def learning_curve_figures(runs: Sequence[Run], out_dir: str | Path) -> list[Path]:
    """Test error and ECE against epoch, one PNG per (dataset, model), every recipe a line with a +-1 std band."""
    from aikd.report.plots import learning_curves

    written = []
    for (dataset, model), curves in learning_curve_data(runs).items():
        path = Path(out_dir) / _figure_name("curves", dataset, model)
        written.append(learning_curves(curves, path, f"{dataset} / {model}"))
    return written


FOREST_METRICS = (TOP1, ECE, NLL)


def forest_data(runs: Sequence[Run]) -> dict[tuple[str, str], dict[str, list[tuple[str, float, Any]]]]:
    """The paired table's numbers by (dataset, model), for :func:`aikd.report.plots.forest_figure`: per metric,
    (row label, mean difference, 95 % interval) in the table's order; rows without a Baseline pairing left out."""
    table = paired_table(runs, FOREST_METRICS)
    out: dict[tuple[str, str], dict[str, list[tuple[str, float, Any]]]] = {}
    for g, (dataset, model) in enumerate(group_order(runs)):
        panels: dict[str, list[tuple[str, float, Any]]] = {m.title: [] for m in FOREST_METRICS}
        for name, row in zip(table.row_names, table.cells, strict=True):
            cells = row[g * len(FOREST_METRICS):(g + 1) * len(FOREST_METRICS)]
            if any(c.mean is None for c in cells):
                continue
            for metric, cell in zip(FOREST_METRICS, cells, strict=True):
                panels[metric.title].append((name, cell.mean, cell.interval))
        if panels[TOP1.title]:
            out[(dataset, model)] = panels
    return out


def forest_figures(runs: Sequence[Run], out_dir: str | Path) -> list[Path]:
    """The paired differences to the Baseline as a forest plot, one PNG per (dataset, model)."""
    from aikd.report.plots import forest_plot

    return [forest_plot(panels, Path(out_dir) / _figure_name("forest", dataset, model), f"{dataset} / {model}")
            for (dataset, model), panels in forest_data(runs).items()]


TRADEOFF_METRICS = (TOP1, ECE)


def tradeoff_data(runs: Sequence[Run]) -> dict[tuple[str, str], list[TradeoffPoint]]:
    """Per (dataset, model), every recipe paired with the Baseline as one point of
    :func:`aikd.report.plots.tradeoff_figure`: the paired table's mean differences in Top-1 error and ECE with
    their 95 % intervals, and the cost table's mean wall-time ratio (None where no run recorded its time)."""
    from aikd.report.plots import TradeoffPoint

    paired, costs = paired_table(runs, TRADEOFF_METRICS), cost_table(runs)
    cost_rows = dict(zip(costs.row_names, costs.cells, strict=True))
    out: dict[tuple[str, str], list[TradeoffPoint]] = {}
    for g, (dataset, model) in enumerate(group_order(runs)):
        points = []
        for name, row in zip(paired.row_names, paired.cells, strict=True):
            error, ece = row[g * len(TRADEOFF_METRICS):(g + 1) * len(TRADEOFF_METRICS)]
            if error.mean is None or ece.mean is None:
                continue
            cost = cost_rows[name][g].mean if name in cost_rows else None
            points.append(TradeoffPoint(name, error.mean, error.interval, ece.mean, ece.interval, cost))
        if points:
            out[(dataset, model)] = points
    return out


def tradeoff_figures(runs: Sequence[Run], out_dir: str | Path) -> list[Path]:
    """Each method as a point of error against calibration, sized by cost: one PNG per (dataset, model)."""
    from aikd.report.plots import tradeoff_plot

    return [tradeoff_plot(points, Path(out_dir) / _figure_name("tradeoff", dataset, model), f"{dataset} / {model}")
            for (dataset, model), points in tradeoff_data(runs).items()]


def _figure_name(kind: str, dataset: str, model: str) -> str:
    return re.sub(r"[^\w.-]+", "_", f"{kind}_{dataset}_{model}").strip("_") + ".png"

