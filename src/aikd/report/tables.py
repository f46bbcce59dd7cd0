"""Building the report's tables from runs: :class:`Table`, its :class:`Cell` s, and one builder per kind.

Every table is rows x column groups x metrics. The recipe tables (:func:`build_table`, :func:`cost_table`,
:func:`paired_table`) share one skeleton, :func:`recipe_table`: a row per recipe, named and ordered by
:class:`Rows`, and per (dataset, model) group the cells of its metrics. Every paired difference, to the
Baseline or between the steps of a method's ablation, is one :func:`paired_cell`.

Each plain cell is the mean ± sample standard deviation over seeds; in every column the best mean is bold and
the second best underlined (lower is better, except macro F1), compared at the printed precision so
equal-looking cells get equal marks. The tables name no method but the Baseline: a method's ablation table comes
from its class's ``ablation`` (src/aikd/methods/base.py, ``LossAblation``). How the tables are written out is
src/aikd/report/render.py; which tables make the paper, src/aikd/report/paper.py.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aikd.report.runs import Run
from aikd.report.stats import PairedDifference, mean_std, paired_difference

if TYPE_CHECKING:  # the report imports the methods (torch) only when it reads runs
    from aikd.methods import Method

DATASET_ORDER = ("cifar100", "tiny-imagenet", "cub200", "stanford-dogs", "mit67", "fgvc-aircraft", "fashion-mnist")


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


Group = tuple[str, str]  # a column group: (dataset, model)
CellKey = tuple[str, str, str]  # (recipe, dataset, model)


def group_name(dataset: str, model: str) -> str:
    return f"{dataset} / {model}"


def group_order(runs: Sequence[Run]) -> list[Group]:
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


def recipe_table(title: str, rows: Rows, recipes: set[str], groups: Sequence[Group], metrics: Sequence[Metric],
                 cells: Callable[[str, str, str], list[Cell]]) -> Table:
    """The skeleton of every recipe table: a row per recipe in ``rows``' order and, per (dataset, model) group,
    the cells ``cells(recipe, dataset, model)`` gives (one per metric)."""
    table = Table(title, [group_name(*g) for g in groups], list(metrics))
    for recipe in rows.order(recipes):
        table.row_names.append(rows.label(recipe))
        table.cells.append([cell for dataset, model in groups for cell in cells(recipe, dataset, model)])
    return table


def by_draw(runs: Sequence[Run], value: Callable[[Run], Any]) -> dict[CellKey, dict[tuple[int, int], Any]]:
    """Each run's ``value`` by (recipe, dataset, model), then by draw (seed, subset); runs whose value is None are
    left out."""
    values: dict[CellKey, dict[tuple[int, int], Any]] = defaultdict(dict)
    for r in runs:
        v = value(r)
        if v is not None:
            values[(r.recipe, r.dataset, r.model)][r.draw] = v
    return values


def paired_cell(diff: PairedDifference | None, metric: Metric) -> Cell:
    """A paired difference as a cell: mean [95 % CI], marked where the interval excludes 0; '–' without one."""
    if diff is None:
        return Cell("–")
    interval = (diff.low, diff.high) if diff.n >= 2 else None
    return Cell(diff.text(metric.digits), mark="significant" if diff.excludes_zero else "", mean=diff.mean,
                n=diff.n, interval=interval)


def build_table(title: str, runs: Sequence[Run], metrics: Sequence[Metric],
                keep: Callable[[Run], bool]) -> Table:
    """Rows = recipes of the kept runs, columns = (dataset, model) x metrics, with ranks marked."""
    rows = Rows(runs)
    runs = [r for r in runs if keep(r)]
    by_cell: dict[CellKey, list[Run]] = defaultdict(list)
    for r in runs:
        by_cell[(r.recipe, r.dataset, r.model)].append(r)

    def cells(recipe: str, dataset: str, model: str) -> list[Cell]:
        members = by_cell.get((recipe, dataset, model), [])
        return [_cell(members, m) for m in metrics]

    table = recipe_table(title, rows, {r.recipe for r in runs}, group_order(runs), metrics, cells)
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
    totals = by_draw(runs, lambda r: r.metrics.get("total_time_s") or None)

    def cells(recipe: str, dataset: str, model: str) -> list[Cell]:
        mine, base = totals.get((recipe, dataset, model), {}), totals.get((BASELINE, dataset, model), {})
        ratios = [mine[s] / base[s] for s in sorted(set(mine) & set(base))]
        if not ratios:
            return [Cell("–")]
        mean, std, n = mean_std(ratios)
        return [Cell(f"{mean:.2f}x" if n == 1 else f"{mean:.2f}x ± {std:.2f}", mean=mean, std=std, n=n)]

    table = recipe_table("Training cost: wall time from nothing to the final model (phase 1 included) over the "
                         "Baseline's, same seed", Rows(runs), {r.recipe for r in runs}, group_order(runs), [COST],
                         cells)
    _note_seed_counts(table)
    table.notes = ["Wall times are as measured, on whatever else the machine ran at the time: compare them "
                   "only within one sweep run under one load."]
    return table


def paired_table(runs: Sequence[Run], metrics: Sequence[Metric] = (TOP1, ECE, NLL, ECE_TS)) -> Table:
    """Every recipe minus the Baseline, seed by seed: mean and 95 % interval of the paired differences.

    A recipe's runs are paired with the Baseline's (``ce``: a CE run or a pipeline's phase-1
    model) of the same seed, dataset and model; seeds without a Baseline run are left out.
    """
    values = {m.key: by_draw(runs, lambda r, key=m.key: r.metrics.get(key)) for m in metrics}

    def cells(recipe: str, dataset: str, model: str) -> list[Cell]:
        return [paired_cell(paired_difference(values[m.key].get((recipe, dataset, model), {}),
                                              values[m.key].get((BASELINE, dataset, model), {})), m)
                for m in metrics]

    title = "Paired difference to Baseline (method - Baseline over the same seeds): mean [95 % CI], * excludes 0"
    return recipe_table(title, Rows(runs), {r.recipe for r in runs} - {BASELINE}, group_order(runs), metrics,
                        cells)


def ablation_table(runs: Sequence[Run], owner: type[Method]) -> Table:
    """``owner``'s ablation (AI-KD's Table 4): its runs and its reference methods' (CE: every term off), with Top-1
    error, a check column per ablated term, and notes on the paper's order of the rows."""
    ablation = owner.ablation
    rows = Rows(runs)

    def member(run: Run) -> bool:
        return run.loss_terms is not None and (run.method == owner.name or run.method in ablation.references)

    table = build_table(f"{ablation.table}: {owner.label} ablation, Top-1 error (%)", runs, [TOP1], member)
    switches = {rows.label(r.recipe): ablation.switches(r.loss_terms) for r in runs if member(r)}
    table.lead = list(ablation.columns)
    table.lead_cells = [["✓" if on else "" for on in switches[name]] for name in table.row_names]
    table.notes = ablation_order_notes(table, ablation.paper_order)
    return table


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


DrawGroup = tuple[str, Callable[[tuple[int, int]], bool]]  # a name and which draws (seed, subset) it keeps


def _draw_groups(runs: Sequence[Run]) -> list[DrawGroup]:
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
    values = by_draw(runs, lambda r: r.metrics.get(metric.key))
    draws = _draw_groups(runs)
    groups = [(g, d) for g in group_order(runs) for d in draws]
    table = Table(f"{ablation.table} steps: {metric.title}, method - reference over the same seed and subset, "
                  f"mean [95 % CI], * excludes 0", [f"{group_name(*g)}, {name}" for g, (name, _) in groups],
                  [metric])
    for method, reference, paper in ablation.steps:
        row, verdicts = [], []
        for (dataset, model), (draw_name, keep) in groups:
            mine = {d: v for d, v in values.get((method, dataset, model), {}).items() if keep(d)}
            ref = {d: v for d, v in values.get((reference, dataset, model), {}).items() if keep(d)}
            diff = paired_difference(mine, ref)
            row.append(paired_cell(diff, metric))
            if draw_name == draws[-1][0] and diff is not None:
                verdicts.append(f"{group_name(dataset, model)}: {_verdict(diff, paper)}")
        if all(c.text == "–" for c in row):
            continue
        name = f"{rows.label(method)} - {rows.label(reference)}"
        table.row_names.append(name)
        table.cells.append(row)
        paper_text = f"paper {paper:+.2f}" if paper is not None else f"not in the paper; {owner.label}'s claim: < 0"
        table.notes.append(f"{name} ({paper_text}): {'; '.join(verdicts)}.")
    return table


def _verdict(diff: PairedDifference, paper: float | None) -> str:
    expected = -1.0 if paper is None else math.copysign(1.0, paper)
    if diff.n < 2:
        return f"unresolved (n = {diff.n})"
    half = (diff.high - diff.low) / 2
    if diff.excludes_zero:
        agrees = (diff.mean < 0) == (expected < 0)
        return f"{'confirmed' if agrees else 'contradicted'} (n = {diff.n}, half-width {half:.2f})"
    return f"unresolved (n = {diff.n}, half-width {half:.2f})"
