"""A new method as README's "Adding a method" describes it, defined here alone: one registered class, no file of
the package edited. It trains and logs the loss terms it declares, and ``aikd report`` names and places its row
from the class alone: after the shipped methods, and not in AI-KD's ablation table, although its only loss term
is named as CE's (the default ``loss_terms``, which once made any such method a Table 4 row).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch.nn.functional as F
import yaml
from torch import nn

from aikd.config import load_config
from aikd.engine import Trainer
from aikd.methods import METHODS, TABLE_ORDER, Batch, Method, StepOutput, register_method, table_rank
from aikd.methods.base import weight
from aikd.report.paper import paper_tables
from aikd.report.runs import collect_runs
from helpers import check_loss_records

NAME = "smoothing_test"
DIGITS = ["data.name=digits", "model.name=small_cnn", "data.batch_size=64", "data.train_limit=256",
          "data.test_limit=128", "deterministic=true", "device=cpu", "train.epochs=1", f"method={NAME}"]
FULL = {"alpha_g": 0.1, "alpha_p": 0.3, "adv_weight": 0.1}


@dataclass
class SmoothingConfig:
    smoothing: float = 0.1  # of the label's mass, spread over all classes

    def __post_init__(self) -> None:
        weight(f"{NAME}.smoothing", self.smoothing)


class LabelSmoothing(Method):
    """Cross-entropy with label smoothing: one term, named ``ce`` as the default ``loss_terms`` says."""

    label = "Label smoothing"

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        logits = model(batch.images)
        loss = F.cross_entropy(logits, batch.targets, label_smoothing=self.hparams.smoothing)
        return StepOutput(logits, {"ce": loss})


@pytest.fixture
def smoothing_method():
    register_method(NAME, SmoothingConfig)(LabelSmoothing)
    yield
    METHODS.remove(NAME)  # keep the registry-driven tests of other files to the shipped methods


def write_run(root: Path, recipe: str, method: str, top1: float, aikd: dict | None = None) -> None:
    """A finished run's summary (and AI-KD's saved settings) on the trained run's data and model."""
    run = root / recipe / "seed0"
    run.mkdir(parents=True)
    summary = {"method": method, "recipe": recipe, "dataset": "digits", "model": "small_cnn", "seed": 0,
               "top1_err": top1, "macro_f1": 0.9, "top5_err": 1.0, "ece": 2.0, "nll": 0.5}
    (run / "summary.json").write_text(json.dumps(summary))
    if aikd is not None:
        (run / "config.yaml").write_text(yaml.safe_dump({"method": "aikd", "aikd": aikd}))


def test_a_method_defined_outside_the_package_trains_and_is_reported(tmp_path, smoothing_method, one_thread):
    runs_dir = tmp_path / "runs"
    summary = Trainer(load_config(None, DIGITS), runs_dir / NAME / "seed0", quiet=True).fit()
    assert summary["method"] == NAME and summary["recipe"] == NAME
    check_loss_records(runs_dir / NAME / "seed0" / "metrics.jsonl", LabelSmoothing.loss_terms(SmoothingConfig()),
                       epochs=1)
    write_run(runs_dir, "ce", "ce", summary["top1_err"] + 1)
    write_run(runs_dir, "aikd", "aikd", summary["top1_err"] - 1, FULL)
    write_run(runs_dir, "aikd_no_adv", "aikd", summary["top1_err"], {**FULL, "adv_weight": 0.0})
    tables = {t.title.split(":")[0]: t for t in paper_tables(collect_runs(runs_dir)[0])}
    # Named by its label, placed after the shipped methods of TABLE_ORDER; No Adv is an ablation (Table 4 only).
    assert tables["Table 2"].row_names == ["Baseline", "AI-KD", "Label smoothing"]
    assert tables["Table 4"].row_names == ["Baseline", "No Adv", "AI-KD"]  # AI-KD's ablation: its runs and CE's
    assert tables["Table 4"].lead == ["L_G", "L_P", "L_A"]
    paired = next(t for name, t in tables.items() if name.startswith("Paired"))
    assert paired.row_names == ["No Adv", "AI-KD", "Label smoothing"]  # AI-KD's rows in its report_row order


def test_methods_not_in_the_table_order_follow_it_by_name():
    assert [table_rank(name) for name in TABLE_ORDER] == sorted(table_rank(name) for name in TABLE_ORDER)
    assert table_rank("aikd") < table_rank("a_new_method") < table_rank("b_new_method")
    assert set(TABLE_ORDER) <= set(METHODS.names())  # no stale names: every listed method is shipped
