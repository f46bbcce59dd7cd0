"""The paper's tables, made only from run summaries on disk (``aikd report``).

* Table 2: methods x (dataset, model), Top-1 error and macro F1;
* Table 3: Top-5 error, ECE, and ECE after temperature scaling;
* a method's own ablation of its loss terms, if it declares one (``Method.ablation``: AI-KD's Table 4,
  which of L_G, L_P, L_A are on) with Top-1 error, and its steps between rows as paired differences;
* paired differences to the Baseline: per-seed differences with a 95 % Student t
  interval (:mod:`aikd.report.stats`), starred where the interval excludes 0;
* the training cost: wall time, phase 1 included, over the Baseline's on the same seed.

Each cell is the mean ± sample standard deviation over seeds; in every column
the best mean is bold and the second best underlined (lower is better, except
macro F1), compared at the printed precision so equal-looking cells get equal
marks. Rows are recipes: a config file's name without the model suffix
(``aikd_no_adv_preact_resnet18.yaml`` -> ``aikd_no_adv``), named and ordered as their methods say
(``aikd.methods.TABLE_ORDER``, ``Method.label``, ``recipe_rows``, ``report_row``). Everything the report
shows about a method it reads from the method's registered class; it names no method but the Baseline.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aikd.errors import AikdError
from aikd.report.stats import paired_difference
from aikd.report.summaries import mean_std
from aikd.report.tables import pipe_table
from aikd.run_files import read_saved_config, read_summary, teacher_path

if TYPE_CHECKING:  # the report imports the methods (torch) only when it reads runs
    from aikd.methods import Method
    from aikd.report.plots import TradeoffPoint

DATASET_ORDER = ("cifar100", "tiny-imagenet", "cub200", "stanford-dogs", "mit67", "fgvc-aircraft", "fashion-mnist")


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
    terms: frozenset[str] | None  # the loss terms it trained with (Method.loss_terms); None: method unknown
    folder: Path
    subset: int = 0  # data.subset_seed: which draw of the training images
    row: RowKey = UNPLACED  # its row's place and name in the tables: from its method (MethodFacts.row)
    ablation: bool = False  # a setting that switches parts of its method off (AI-KD's Table 4 rows)
    calibration_figure: bool = False  # drawn also after temperature scaling (Method.calibration_figure)

    @property
    def draw(self) -> tuple[int, int]:
        """What pairs two runs: the same seed on the same training subset."""
        return self.seed, self.subset


@dataclass
class Metric:
    key: str
    title: str
    digits: int = 2
    higher_is_better: bool = False
    ranked: bool = True  # best / second marks (not for descriptive columns such as training accuracy)


TOP1 = Metric("top1_err", "Top-1 err")
MACRO_F1 = Metric("macro_f1", "Macro F1", 4, higher_is_better=True)
TOP5 = Metric("top5_err", "Top-5 err")
ECE = Metric("ece", "ECE")
ECE_TS = Metric("ece_ts", "ECE (TS)")
NLL = Metric("nll", "NLL", 4)
COST = Metric("cost_vs_baseline", "Cost vs Baseline", ranked=False)  # a ratio of total_time_s
TRAIN_ACC = Metric("train_acc", "Train acc", ranked=False)
BASELINE = "ce"


@dataclass
class Cell:
    text: str
    rank_value: float | None = None  # the mean rounded as printed, which is what is ranked
    mark: str = ""  # "best", "second", "significant" (a paired interval excluding 0) or ""
    mean: float | None = None
    std: float | None = None
    n: int = 0
    interval: tuple[float, float] | None = None  # a paired difference's 95 % confidence interval


@dataclass
class Table:
    """A two-level header (column groups, then metrics) and rows of cells."""

    title: str
    groups: list[str]
    metrics: list[Metric]
    row_names: list[str] = field(default_factory=list)
    lead: list[str] = field(default_factory=list)  # extra leading columns (the ablation's switches)
    lead_cells: list[list[str]] = field(default_factory=list)
    cells: list[list[Cell]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # lines printed under the table (Markdown)


# ---------------------------------------------------------------------------- reading runs


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
    return Run(recipe, method, dataset, model, seed, summary, facts.terms, path.parent, subset, facts.row,
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

    terms: frozenset[str] | None  # the loss terms it trained with; None when the method or settings are unknown
    row: RowKey  # its row: the method's place among methods, the row's among the method's, the row's name
    ablation: bool = False  # Method.is_ablation: shown in the method's ablation table only
    calibration_figure: bool = False  # the method's own recipe, with Method.calibration_figure


def _method_facts(config: dict[str, Any], method: str, recipe: str) -> MethodFacts:
    """What the run's method says about its saved settings: the loss terms it trained with
    (``Method.loss_terms``), its row in the tables (``table_rank``, ``Method.recipe_rows`` or
    ``Method.report_row``, and a grid point's settings in brackets), whether it is an ablation, and whether
    its reliability curve is drawn after temperature scaling too."""
    from aikd.config import from_dict
    from aikd.errors import ConfigError
    from aikd.methods import METHODS, table_rank

    base, bracket, variant = recipe.partition("[")
    grid = f" [{variant}" if bracket else ""
    try:  # a run without its config.yaml trained with the defaults
        method_cls = METHODS.get(method)
        hparams = from_dict({**(config or {}), "method": method}, source="saved config").method_config()
    except ConfigError:  # a method no longer known, or a config that no longer validates: named by its recipe
        return MethodFacts(None, (*table_rank(method), 0, recipe))
    place, name = method_cls.recipe_rows.get(base) or method_cls.report_row(hparams)
    return MethodFacts(frozenset(method_cls.loss_terms(hparams)), (*table_rank(method), place, name + grid),
                       method_cls.is_ablation(hparams), method_cls.calibration_figure and recipe == method)


# ---------------------------------------------------------------------------- building tables


def _group_name(dataset: str, model: str) -> str:
    return f"{dataset} / {model}"


def _group_order(runs: Sequence[Run]) -> list[tuple[str, str]]:
    pairs = {(r.dataset, r.model) for r in runs}
    rank = {name: i for i, name in enumerate(DATASET_ORDER)}
    return sorted(pairs, key=lambda p: (rank.get(p[0], len(rank)), p[0], p[1]))


class Rows:
    """The row names and order of a report's recipes, as their runs' methods name and place them.

    Grid points follow every plain recipe; a name that several recipes would share gets the recipe's own
    name in parentheses on all but the first.
    """

    def __init__(self, runs: Sequence[Run]) -> None:
        facts = {}
        for run in runs:
            facts.setdefault(run.recipe, run.row)
        self._order = sorted(facts, key=lambda recipe: ("[" in recipe, *facts[recipe][:3], recipe))
        self._names: dict[str, str] = {}
        for recipe in self._order:
            name = facts[recipe][3]
            self._names[recipe] = f"{name} ({recipe})" if name in self._names.values() else name

    def label(self, recipe: str) -> str:
        return self._names.get(recipe, recipe)

    def order(self, recipes: set[str]) -> list[str]:
        return [r for r in self._order if r in recipes] + sorted(recipes - set(self._order))


def build_table(title: str, runs: Sequence[Run], metrics: Sequence[Metric],
                keep: Callable[[Run], bool]) -> Table:
    """Rows = recipes of the kept runs, columns = (dataset, model) x metrics, with ranks marked."""
    rows = Rows(runs)
    runs = [r for r in runs if keep(r)]
    groups = _group_order(runs)
    by_cell: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        by_cell[(r.recipe, r.dataset, r.model)].append(r)
    table = Table(title, [_group_name(*g) for g in groups], list(metrics))
    recipes = rows.order({r.recipe for r in runs})
    for recipe in recipes:
        table.row_names.append(rows.label(recipe))
        row = []
        for dataset, model in groups:
            members = by_cell.get((recipe, dataset, model), [])
            row += [_cell(members, m) for m in metrics]
        table.cells.append(row)
    _note_seed_counts(table)
    _mark_ranks(table)
    return table


def _note_seed_counts(table: Table) -> None:
    """Append (n=k) to cells averaged over fewer seeds than the table's fullest cell."""
    full = max((c.n for row in table.cells for c in row), default=0)
    for row in table.cells:
        for cell in row:
            if 0 < cell.n < full:
                cell.text += f" (n={cell.n})"


def _cell(members: Sequence[Run], metric: Metric) -> Cell:
    values = [r.metrics[metric.key] for r in members if r.metrics.get(metric.key) is not None]
    if not values:
        return Cell("–")
    mean, std, n = mean_std(values)
    # One seed has no spread to show: its value alone (the seed count is noted where the column has more).
    text = f"{mean:.{metric.digits}f}" if n == 1 else f"{mean:.{metric.digits}f} ± {std:.{metric.digits}f}"
    return Cell(text, round(mean, metric.digits), mean=mean, std=std, n=n)


def _mark_ranks(table: Table) -> None:
    """Bold the best and underline the second-best mean of every column (ties share a mark)."""
    for col in range(len(table.groups) * len(table.metrics)):
        metric = table.metrics[col % len(table.metrics)]
        if not metric.ranked:
            continue
        column = [row[col] for row in table.cells if row[col].rank_value is not None]
        distinct = sorted({c.rank_value for c in column}, reverse=metric.higher_is_better)
        if len(column) < 2:
            continue
        for cell in column:
            if cell.rank_value == distinct[0]:
                cell.mark = "best"
            elif len(distinct) > 1 and cell.rank_value == distinct[1]:
                cell.mark = "second"


def cost_table(runs: Sequence[Run]) -> Table:
    """Each recipe's training wall time, phase 1 included, over the Baseline's on the same seed.

    A two-phase method pays for its superior model or teacher; judging it at equal cost
    means comparing it with plain training of that total length (the equal-compute row).
    """
    rows = Rows(runs)
    groups = _group_order(runs)
    totals: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in runs:
        if r.metrics.get("total_time_s"):
            totals[(r.recipe, r.dataset, r.model)][r.draw] = r.metrics["total_time_s"]
    table = Table("Training cost: wall time from nothing to the final model (phase 1 included) over the "
                  "Baseline's, same seed", [_group_name(*g) for g in groups], [COST])
    for recipe in rows.order({r.recipe for r in runs}):
        row = []
        for dataset, model in groups:
            mine, base = totals.get((recipe, dataset, model), {}), totals.get((BASELINE, dataset, model), {})
            ratios = [mine[s] / base[s] for s in sorted(set(mine) & set(base))]
            if ratios:
                mean, std, n = mean_std(ratios)
                row.append(Cell(f"{mean:.2f}x" if n == 1 else f"{mean:.2f}x ± {std:.2f}", mean=mean, std=std, n=n))
            else:
                row.append(Cell("–"))
        table.row_names.append(rows.label(recipe))
        table.cells.append(row)
    _note_seed_counts(table)
    table.notes = ["Wall times are as measured, on whatever else the machine ran at the time: compare them "
                   "only within one sweep run under one load."]
    return table


def paired_table(runs: Sequence[Run], metrics: Sequence[Metric] = (TOP1, ECE, NLL, ECE_TS)) -> Table:
    """Every recipe minus the Baseline, seed by seed: mean and 95 % interval of the paired differences.

    A recipe's runs are paired with the Baseline's (``ce``: a CE run or a pipeline's phase-1
    model) of the same seed, dataset and model; seeds without a Baseline run are left out.
    """
    rows = Rows(runs)
    groups = _group_order(runs)
    values: dict[tuple, dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in runs:
        values[(r.recipe, r.dataset, r.model)][r.draw] = r.metrics
    title = "Paired difference to Baseline (method - Baseline over the same seeds): mean [95 % CI], * excludes 0"
    table = Table(title, [_group_name(*g) for g in groups], list(metrics))
    for recipe in rows.order({r.recipe for r in runs} - {BASELINE}):
        row = []
        for dataset, model in groups:
            mine, base = values.get((recipe, dataset, model), {}), values.get((BASELINE, dataset, model), {})
            for metric in metrics:
                row.append(_paired_cell(_by_seed(mine, metric.key), _by_seed(base, metric.key), metric))
        table.row_names.append(rows.label(recipe))
        table.cells.append(row)
    return table


def _by_seed(metrics_by_seed: dict[int, dict[str, Any]], key: str) -> dict[int, float]:
    return {seed: m[key] for seed, m in metrics_by_seed.items() if m.get(key) is not None}


def _paired_cell(mine: dict[int, float], base: dict[int, float], metric: Metric) -> Cell:
    diff = paired_difference(mine, base)
    if diff is None:
        return Cell("–")
    interval = (diff.low, diff.high) if diff.n >= 2 else None
    return Cell(diff.text(metric.digits), mark="significant" if diff.excludes_zero else "", mean=diff.mean,
                n=diff.n, interval=interval)


def ablation_order_notes(table: Table, paper_order: Sequence[str]) -> list[str]:
    """Per column: the rows the paper ranks (``paper_order``, best first) sorted by mean Top-1 error, and whether
    the paper's order holds."""
    notes = []
    for col, group in enumerate(table.groups):
        means = {name: row[col].mean for name, row in zip(table.row_names, table.cells, strict=True)
                 if name in paper_order and row[col].mean is not None}
        if len(means) < 2:
            continue
        ours = sorted(means, key=lambda name: means[name])
        paper = [name for name in paper_order if name in means]
        verdict = "holds" if ours == paper else "does not hold"
        ranked = " < ".join(f"{name} {means[name]:.2f}" for name in ours)
        notes.append(f"{group}: {ranked}. The paper's order ({' < '.join(paper)}) {verdict}.")
    return notes


def _draw_groups(runs: Sequence[Run]) -> list[tuple[str, Callable[[tuple[int, int]], bool]]]:
    """Column groups of the steps table: every draw together, and apart when the runs span several subsets
    (the shared subset 0, and subsets of their own)."""
    subsets = {r.subset for r in runs}
    every = ("all draws", lambda draw: True)
    if len(subsets) < 2:
        return [every]
    return [("subset 0", lambda draw: draw[1] == 0), ("other subsets", lambda draw: draw[1] != 0), every]


def steps_table(runs: Sequence[Run], owner: type[Method], metric: Metric = TOP1) -> Table:
    """The steps of ``owner``'s ablation (AI-KD's Table 4) as paired differences (recipe - reference over the same
    seed and subset), and for each a verdict on the paper's sign from the interval over every draw: confirmed,
    contradicted, or unresolved with the interval's half-width; a step not in the paper is held to the method's
    claim, a negative sign."""
    ablation = owner.ablation
    rows = Rows(runs)
    values: dict[tuple, dict[tuple[int, int], float]] = defaultdict(dict)
    for r in runs:
        if r.metrics.get(metric.key) is not None:
            values[(r.recipe, r.dataset, r.model)][r.draw] = r.metrics[metric.key]
    draws = _draw_groups(runs)
    groups = [(g, d) for g in _group_order(runs) for d in draws]
    table = Table(f"{ablation.table} steps: {metric.title}, method - reference over the same seed and subset, "
                  f"mean [95 % CI], * excludes 0", [f"{_group_name(*g)}, {name}" for g, (name, _) in groups],
                  [metric])
    for method, reference, paper in ablation.steps:
        row, verdicts = [], []
        for (dataset, model), (draw_name, keep) in groups:
            mine = {d: v for d, v in values.get((method, dataset, model), {}).items() if keep(d)}
            ref = {d: v for d, v in values.get((reference, dataset, model), {}).items() if keep(d)}
            diff = paired_difference(mine, ref)
            row.append(Cell("–") if diff is None else Cell(diff.text(metric.digits), mean=diff.mean, n=diff.n,
                                                          mark="significant" if diff.excludes_zero else "",
                                                          interval=(diff.low, diff.high) if diff.n >= 2 else None))
            if draw_name == draws[-1][0] and diff is not None:
                verdicts.append(f"{_group_name(dataset, model)}: {_verdict(diff, paper)}")
        if all(c.text == "–" for c in row):
            continue
        name = f"{rows.label(method)} - {rows.label(reference)}"
        table.row_names.append(name)
        table.cells.append(row)
        paper_text = f"paper {paper:+.2f}" if paper is not None else f"not in the paper; {owner.label}'s claim: < 0"
        table.notes.append(f"{name} ({paper_text}): {'; '.join(verdicts)}.")
    return table


def _verdict(diff, paper: float | None) -> str:
    expected = -1.0 if paper is None else math.copysign(1.0, paper)
    if diff.n < 2:
        return f"unresolved (n = {diff.n})"
    half = (diff.high - diff.low) / 2
    if diff.excludes_zero:
        agrees = (diff.mean < 0) == (expected < 0)
        return f"{'confirmed' if agrees else 'contradicted'} (n = {diff.n}, half-width {half:.2f})"
    return f"unresolved (n = {diff.n}, half-width {half:.2f})"


def paper_tables(runs: Sequence[Run]) -> list[Table]:
    """Tables 2 and 3 of the paper, the ablation tables of the methods that declare one (AI-KD's Table 4), the
    paired differences and the cost, for whatever runs there are (empty tables are left out)."""
    tables = [
        build_table("Table 2: Top-1 error (%) and macro F1", runs, [TOP1, MACRO_F1], lambda r: not r.ablation),
        build_table("Table 3: Top-5 error (%), ECE (%), ECE after temperature scaling, NLL, and the final epoch's "
                    "training accuracy (%, not ranked)", runs, [TOP5, ECE, ECE_TS, NLL, TRAIN_ACC],
                    lambda r: not r.ablation),
    ]
    for owner in _ablation_owners(runs):
        tables += [ablation_table(runs, owner), steps_table(runs, owner)]
    if any(r.recipe == BASELINE for r in runs):
        tables.append(paired_table(runs))
        cost = cost_table(runs)
        if any(cell.n for row in cost.cells for cell in row):  # summaries without wall times: no such table
            tables.append(cost)
    return [t for t in tables if t.row_names]


def _ablation_owners(runs: Sequence[Run]) -> list[type[Method]]:
    """The registered methods of these runs that declare an ablation table (``Method.ablation``), in table order."""
    from aikd.methods import METHODS, table_rank

    names = sorted({r.method for r in runs if r.method in METHODS}, key=table_rank)
    return [cls for cls in map(METHODS.get, names) if cls.ablation is not None]


def ablation_table(runs: Sequence[Run], owner: type[Method]) -> Table:
    """``owner``'s ablation (AI-KD's Table 4): its runs and its reference methods' (CE: every term off), with Top-1
    error, a check column per ablated term, and notes on the paper's order of the rows."""
    ablation = owner.ablation
    rows = Rows(runs)

    def member(run: Run) -> bool:
        return run.terms is not None and (run.method == owner.name or run.method in ablation.references)

    table = build_table(f"{ablation.table}: {owner.label} ablation, Top-1 error (%)", runs, [TOP1], member)
    switches = {rows.label(r.recipe): ablation.switches(r.terms) for r in runs if member(r)}
    table.lead = list(ablation.columns)
    table.lead_cells = [["✓" if on else "" for on in switches[name]] for name in table.row_names]
    table.notes = ablation_order_notes(table, ablation.paper_order)
    return table


# ---------------------------------------------------------------------------- rendering


def render(tables: Sequence[Table], fmt: str) -> str:
    """Markdown, LaTeX (booktabs) or CSV (one tidy row per cell and metric)."""
    renderers = {"md": _markdown, "latex": _latex, "csv": _csv}
    if fmt not in renderers:
        raise AikdError(f"Unknown report format '{fmt}': choose md, csv or latex.")
    return renderers[fmt](tables)


def _markdown(tables: Sequence[Table]) -> str:
    marks = {"best": "**{}**", "second": "<u>{}</u>", "significant": "**{}**", "": "{}"}
    out = []
    for t in tables:
        head = ["Method", *t.lead] + [f"{g}: {m.title}" for g in t.groups for m in t.metrics]
        rows = [[name, *(t.lead_cells[i] if t.lead else []), *(marks[c.mark].format(c.text) for c in t.cells[i])]
                for i, name in enumerate(t.row_names)]
        align = "l" + "c" * len(t.lead) + "r" * (len(head) - 1 - len(t.lead))
        out += [f"### {t.title}", "", *pipe_table(head, rows, align), ""]
        out += [*t.notes, ""] if t.notes else []
    return "\n".join(out)


def _latex(tables: Sequence[Table]) -> str:
    marks = {"best": "\\textbf{{{}}}", "second": "\\underline{{{}}}", "significant": "\\textbf{{{}}}", "": "{}"}

    def tex(text: str) -> str:
        return text.replace("±", "$\\pm$").replace("_", "\\_").replace("✓", "\\checkmark").replace("–", "--")

    out = []
    for t in tables:
        k = len(t.metrics)
        out += ["\\begin{table}[t]", "\\centering", f"\\caption{{{tex(t.title)}}}",
                "\\begin{tabular}{l" + "c" * len(t.lead) + "c" * (k * len(t.groups)) + "}", "\\toprule"]
        first = ["", *[""] * len(t.lead)] + [f"\\multicolumn{{{k}}}{{c}}{{{tex(g)}}}" for g in t.groups]
        second = ["Method", *(tex(x) for x in t.lead)] + [tex(m.title) for _ in t.groups for m in t.metrics]
        out += [" & ".join(first) + " \\\\", " & ".join(second) + " \\\\", "\\midrule"]
        for i, name in enumerate(t.row_names):
            lead = [tex(x) for x in t.lead_cells[i]] if t.lead else []
            cells = [marks[c.mark].format(tex(c.text)) for c in t.cells[i]]
            out.append(" & ".join([tex(name), *lead, *cells]) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}", "\\end{table}", ""]
    return "\n".join(out)


def _csv(tables: Sequence[Table]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["table", "method", "dataset", "model", "metric", "mean", "std", "seeds", "rank",
                     "ci_low", "ci_high"])
    for t in tables:
        for i, name in enumerate(t.row_names):
            for j, cell in enumerate(t.cells[i]):
                if cell.mean is None:
                    continue
                dataset, model = t.groups[j // len(t.metrics)].split(" / ")
                metric = t.metrics[j % len(t.metrics)]
                low, high = (f"{x:.6g}" for x in cell.interval) if cell.interval else ("", "")
                std = "" if cell.std is None else f"{cell.std:.6g}"
                title = t.title.split(":")[0].split(" (")[0]
                writer.writerow([title, name, dataset, model, metric.key, f"{cell.mean:.6g}", std, cell.n,
                                 cell.mark, low, high])
    return buffer.getvalue()


# ---------------------------------------------------------------------------- figures


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
        history = _history(run.folder / "metrics.jsonl")
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
    for g, (dataset, model) in enumerate(_group_order(runs)):
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
    for g, (dataset, model) in enumerate(_group_order(runs)):
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


def _history(path: Path) -> dict[int, dict[str, float]]:
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
