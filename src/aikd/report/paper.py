"""The paper's tables, made only from run summaries on disk (``aikd report``).

* Table 2: methods x (dataset, model), Top-1 error and macro F1;
* Table 3: Top-5 error, ECE, and ECE after temperature scaling;
* a method's own ablation of its loss terms, if it declares one (``Method.ablation``: AI-KD's Table 4,
  which of L_G, L_P, L_A are on) with Top-1 error, and its steps between rows as paired differences;
* paired differences to the Baseline: per-seed differences with a 95 % Student t
  interval (:mod:`aikd.report.stats`), starred where the interval excludes 0;
* the training cost: wall time, phase 1 included, over the Baseline's on the same seed.

This module only chooses and orders those tables; the report's other parts each live in their own module:
reading runs (src/aikd/report/runs.py), building tables (src/aikd/report/tables.py), writing them out
(src/aikd/report/render.py) and the figures (src/aikd/report/figures.py).

Rows are recipes: a config file's name without the model suffix
(``aikd_no_adv_preact_resnet18.yaml`` -> ``aikd_no_adv``), named and ordered as their methods say
(``aikd.methods.TABLE_ORDER``, ``Method.label``, ``recipe_rows``, ``report_row``). Everything the report
shows about a method it reads from the method's registered class; it names no method but the Baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from aikd.report.runs import Run
from aikd.report.tables import (
    BASELINE,
    ECE,
    ECE_TS,
    MACRO_F1,
    NLL,
    TOP1,
    TOP5,
    TRAIN_ACC,
    Table,
    ablation_table,
    build_table,
    cost_table,
    paired_table,
    steps_table,
)

if TYPE_CHECKING:  # the report imports the methods (torch) only when it reads runs
    from aikd.methods import Method


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

