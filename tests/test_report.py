"""`aikd report` on hand-made summaries, and `aikd sweep` surviving a kill."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from aikd.engine.sweep import parse_grid
from aikd.errors import AikdError
from aikd.report.figures import learning_curve_data, learning_curve_figures
from aikd.report.paper import paper_tables
from aikd.report.render import render
from aikd.report.runs import collect_runs
from aikd.report.stats import paired_difference


def write_run(root: Path, folder: str, recipe: str | None, method: str, seed: int, top1: float, f1: float,
              dataset: str = "cifar100", model: str = "resnet18", aikd: dict | None = None, **extra) -> None:
    run = root / folder
    run.mkdir(parents=True)
    summary = {"method": method, "dataset": dataset, "model": model, "seed": seed, "top1_err": top1,
               "macro_f1": f1, "top5_err": top1 / 4, "ece": 5.0, "nll": 1.0, **extra}
    if recipe is not None:
        summary["recipe"] = recipe
    (run / "summary.json").write_text(json.dumps(summary))
    if aikd is not None:
        (run / "config.yaml").write_text(yaml.safe_dump({"method": "aikd", "aikd": aikd}))


FULL = {"alpha_g": 0.1, "alpha_p": 0.3, "adv_weight": 0.1}
ONLINE = {**FULL, "superior": "ema"}  # an in-run superior model: no phase 1


@pytest.fixture
def sweep(tmp_path):
    for seed, (ce, aikd, pskd) in enumerate([(10.0, 9.0, 11.0), (12.0, 9.5, 11.0), (14.0, 10.0, 11.0)]):
        write_run(tmp_path, f"superior/run{seed}", "ce", "ce", seed, ce, 0.80 + seed / 100)
        write_run(tmp_path, f"c/aikd/seed{seed}/student", "aikd", "aikd", seed, aikd, 0.70, aikd=FULL)
        write_run(tmp_path, f"c/pskd/seed{seed}/student", "pskd", "pskd", seed, pskd, 0.90)
        write_run(tmp_path, f"c/aikd_no_adv/seed{seed}/student", "aikd_no_adv", "aikd", seed, 9.8, 0.7,
                  aikd={**FULL, "adv_weight": 0.0})
    return tmp_path


def md_row(text: str, table: str, name: str) -> list[str]:
    block = text.split(f"### {table}")[1].split("###")[0]
    row = next(line for line in block.splitlines() if line.startswith(f"| {name} |"))
    return [c.strip() for c in row.strip("|").split("|")]


def test_table2_means_stds_and_ranks(sweep):
    runs, duplicates = collect_runs(sweep)
    assert duplicates == 0 and len(runs) == 12
    text = render(paper_tables(runs), "md")
    # Top-1 error: AI-KD 9.50 ± 0.50 best, PS-KD 11.00 ± 0.00 second, Baseline 12.00 ± 2.00 (sample std).
    assert md_row(text, "Table 2", "AI-KD")[1:3] == ["**9.50 ± 0.50**", "0.7000 ± 0.0000"]
    assert md_row(text, "Table 2", "PS-KD")[1:3] == ["<u>11.00 ± 0.00</u>", "**0.9000 ± 0.0000**"]
    assert md_row(text, "Table 2", "Baseline")[1:3] == ["12.00 ± 2.00", "<u>0.8100 ± 0.0100</u>"]
    assert "No Adv" not in text.split("### Table 3")[0]  # ablations live in Table 4 only


def test_table3_has_ece_after_scaling_when_runs_have_it(tmp_path):
    for seed in range(2):
        write_run(tmp_path, f"a/seed{seed}", "ce", "ce", seed, 10, 0.8, ece_ts=1.0 + seed, train_acc=99.5 + seed / 4,
                  nll=0.4)
        write_run(tmp_path, f"b/seed{seed}", "pskd", "pskd", seed, 10, 0.8, train_acc=98.0, nll=0.3)
    text = render(paper_tables(collect_runs(tmp_path)[0]), "md")
    assert md_row(text, "Table 3", "Baseline")[3] == "1.50 ± 0.71"
    assert md_row(text, "Table 3", "PS-KD")[3] == "–"
    # NLL is ranked; the training accuracy describes the regime and is not.
    assert md_row(text, "Table 3", "PS-KD")[4:6] == ["**0.3000 ± 0.0000**", "98.00 ± 0.00"]
    assert md_row(text, "Table 3", "Baseline")[4:6] == ["<u>0.4000 ± 0.0000</u>", "99.62 ± 0.18"]


def test_table4_switches_come_from_the_saved_configs(sweep):
    text = render(paper_tables(collect_runs(sweep)[0]), "md")
    assert md_row(text, "Table 4", "Baseline")[1:5] == ["", "", "", "12.00 ± 2.00"]
    assert md_row(text, "Table 4", "No Adv")[1:4] == ["✓", "✓", ""]
    assert md_row(text, "Table 4", "AI-KD")[1:5] == ["✓", "✓", "✓", "**9.50 ± 0.50**"]
    assert md_row(text, "Table 4", "No Adv")[4] == "<u>9.80 ± 0.00</u>"
    # The paper's order is AI-KD < No Adv < ... < Baseline: here AI-KD 9.50 < No Adv 9.80 < Baseline 12.00.
    assert ("cifar100 / resnet18: AI-KD 9.50 < No Adv 9.80 < Baseline 12.00. The paper's order "
            "(AI-KD < No Adv < Baseline) holds.") in text


def test_online_and_grid_recipes_are_methods_not_ablations(tmp_path):
    write_run(tmp_path, "ce/seed0", "ce", "ce", 0, 10, 0.8)
    write_run(tmp_path, "online/seed0", "aikd_online_ema", "aikd", 0, 9, 0.8, aikd=ONLINE)
    write_run(tmp_path, "grid/seed0", "aikd[aikd.alpha_p=0.5]", "aikd", 0, 9.5, 0.8, aikd={**FULL, "alpha_p": 0.5})
    write_run(tmp_path, "noadv/seed0", "aikd_no_adv", "aikd", 0, 9.7, 0.8, aikd={**FULL, "adv_weight": 0})
    text = render(paper_tables(collect_runs(tmp_path)[0]), "md")
    table2 = text.split("### Table 3")[0]
    assert "| AI-KD online (EMA) |" in table2 and "| AI-KD [aikd.alpha_p=0.5] |" in table2
    assert "| No Adv |" not in table2 and "| No Adv |" in text.split("### Table 4")[1]


def test_rows_are_named_and_placed_by_the_methods_from_the_runs_settings(tmp_path):
    """A recipe of any name is shown as its method names its settings; two recipes that would share a name are
    told apart by their recipe names, and ablations go to Table 4 whatever their recipe is called."""
    write_run(tmp_path, "ce/seed0", "ce", "ce", 0, 10, 0.8)
    write_run(tmp_path, "mine/seed0", "my_ablation", "aikd", 0, 9.7, 0.8, aikd={**FULL, "adv_weight": 0})
    write_run(tmp_path, "full/seed0", "aikd", "aikd", 0, 9, 0.8, aikd=FULL)
    write_run(tmp_path, "twin/seed0", "aikd_again", "aikd", 0, 9.1, 0.8, aikd=FULL)
    write_run(tmp_path, "kd/seed0", "kd", "kd", 0, 9.9, 0.8)
    text = render(paper_tables(collect_runs(tmp_path)[0]), "md")
    table2, table4 = text.split("### Table 3")[0], text.split("### Table 4")[1].split("### Table 4 steps")[0]
    names = [line.split(" | ")[0].removeprefix("| ") for line in table2.splitlines()[4:] if line.startswith("|")]
    assert names == ["Baseline", "KD", "AI-KD", "AI-KD (aikd_again)"]  # aikd.methods.TABLE_ORDER, then by recipe
    assert "| No Adv |" in table4 and "No Adv" not in table2


def test_table4_order_that_differs_from_the_papers_is_said(tmp_path):
    for name, recipe, err, switches in (("ce", "ce", 10.0, None), ("g", "aikd_only_guide", 9.0, (0.1, 0, 0)),
                                        ("p", "aikd_only_progressive", 11.0, (0, 0.3, 0))):
        aikd = None if switches is None else dict(zip(("alpha_g", "alpha_p", "adv_weight"), switches, strict=True))
        write_run(tmp_path, f"{name}/seed0", recipe, "ce" if aikd is None else "aikd", 0, err, 0.5, aikd=aikd)
    text = render(paper_tables(collect_runs(tmp_path)[0]), "md")
    assert ("Only Guide 9.00 < Baseline 10.00 < Only Progressive 11.00. The paper's order "
            "(Only Progressive < Only Guide < Baseline) does not hold.") in text


def test_latex_and_csv(sweep):
    runs = collect_runs(sweep)[0]
    latex = render(paper_tables(runs), "latex")
    assert "\\textbf{9.50 $\\pm$ 0.50}" in latex and "\\underline{11.00 $\\pm$ 0.00}" in latex
    assert latex.count("\\begin{tabular}") == 5 and "\\checkmark" in latex  # Tables 2-4, its steps, the paired one
    rows = list(csv.DictReader(io.StringIO(render(paper_tables(runs), "csv"))))
    cell = next(r for r in rows if r["table"] == "Table 2" and r["method"] == "Baseline" and r["metric"] == "top1_err")
    assert (float(cell["mean"]), float(cell["std"]), cell["seeds"], cell["dataset"]) == (12.0, 2.0, "3", "cifar100")
    assert next(r for r in rows if r["method"] == "AI-KD" and r["metric"] == "top1_err")["rank"] == "best"


def test_ties_share_a_mark_and_columns_are_ranked_apart(tmp_path):
    for recipe, err in (("kd", 10.001), ("dkd", 9.999), ("pskd", 12.0)):
        write_run(tmp_path, f"{recipe}/seed0", recipe, recipe, 0, err, 0.5)
        write_run(tmp_path, f"{recipe}/seed0b", recipe, recipe, 0, err, 0.5, model="densenet121")
    text = render(paper_tables(collect_runs(tmp_path)[0]), "md")
    assert md_row(text, "Table 2", "KD")[1] == md_row(text, "Table 2", "DKD")[1] == "**10.00**"
    assert md_row(text, "Table 2", "PS-KD")[1] == "<u>12.00</u>"
    assert md_row(text, "Table 2", "PS-KD")[3] == "<u>12.00</u>"  # the densenet121 column, ranked alone


def test_a_repeated_run_is_counted_once_and_missing_seeds_are_noted(tmp_path):
    write_run(tmp_path, "aikd_only_guide/seed0/student", "aikd_only_guide", "aikd", 0, 9, 0.5,
              aikd={**FULL, "alpha_p": 0, "adv_weight": 0})
    write_run(tmp_path, "aikd/seed0/student", "aikd", "aikd", 0, 9, 0.5, aikd=FULL)
    write_run(tmp_path, "aikd/seed1/student", "aikd", "aikd", 1, 10, 0.5, aikd=FULL)
    write_run(tmp_path, "dup/aikd/seed1/student", "aikd", "aikd", 1, 50, 0.5, aikd=FULL)
    runs, duplicates = collect_runs(tmp_path)
    assert duplicates == 1 and sorted(r.recipe for r in runs) == ["aikd", "aikd", "aikd_only_guide"]
    text = render(paper_tables(runs), "md")
    assert md_row(text, "Table 4", "Only Guide")[1:5] == ["✓", "", "", "**9.00 (n=1)**"]


def test_empty_or_foreign_folders_are_clear_errors(tmp_path):
    with pytest.raises(AikdError, match="No finished runs"):
        collect_runs(tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "x/summary.json").write_text("{not json")
    with pytest.raises(AikdError, match=r"x/summary.json' is not a run summary"):
        collect_runs(tmp_path)


# ---------------------------------------------------------------------- paired statistics


def test_paired_difference_by_hand():
    # d = method - baseline = (-1, -2.5, -4): mean -2.5, sd 1.5, t(0.975, 2) = 4.302653,
    # half-width 4.302653 * 1.5 / sqrt(3) = 3.726207; seed 3 has no baseline and is left out.
    diff = paired_difference({0: 9.0, 1: 9.5, 2: 10.0, 3: 1.0}, {0: 10.0, 1: 12.0, 2: 14.0})
    assert diff.n == 3 and diff.mean == pytest.approx(-2.5)
    assert (diff.low, diff.high) == (pytest.approx(-6.226207, abs=1e-6), pytest.approx(1.226207, abs=1e-6))
    assert not diff.excludes_zero and diff.text() == "-2.50 [-6.23, +1.23]"
    # d = (-1, -1.2, -0.8, -1.1, -0.9): mean -1, sd 0.158114, t(0.975, 4) = 2.776445, half-width 0.196324.
    diffs = [-1, -1.2, -0.8, -1.1, -0.9]
    tight = paired_difference({s: 10 + d for s, d in enumerate(diffs)}, dict.fromkeys(range(5), 10.0))
    assert (tight.low, tight.high) == (pytest.approx(-1.196324, abs=1e-6), pytest.approx(-0.803676, abs=1e-6))
    assert tight.excludes_zero and tight.text() == "-1.00 [-1.20, -0.80]*"
    assert paired_difference({0: 2.0}, {1: 1.0}) is None
    single = paired_difference({0: 2.0}, {0: 1.5})
    assert single.n == 1 and not single.excludes_zero and single.text() == "+0.50 (n=1)"


def test_paired_difference_equals_scipys_paired_t_interval():
    from scipy import stats

    rng = __import__("random").Random(4)
    for n in (2, 3, 5, 8):
        method = {s: rng.uniform(8, 12) for s in range(n)}
        base = {s: rng.uniform(8, 12) for s in range(n)}
        ours = paired_difference(method, base, confidence=0.9)
        ci = stats.ttest_rel([method[s] for s in range(n)], [base[s] for s in range(n)]).confidence_interval(0.9)
        assert (ours.low, ours.high) == (pytest.approx(ci.low), pytest.approx(ci.high))


def test_paired_table_pairs_seeds_and_stars_intervals_that_exclude_zero(tmp_path):
    for seed, (ce, aikd, pskd) in enumerate([(10.0, 9.0, 11.0), (12.0, 9.5, 11.0), (14.0, 10.0, 11.0)]):
        write_run(tmp_path, f"superior/run{seed}", "ce", "ce", seed, ce, 0.8, ece=5.0 + seed, nll=0.5)
        write_run(tmp_path, f"aikd/seed{seed}", "aikd", "aikd", seed, aikd, 0.8, aikd=FULL, ece=[3.0, 3.9, 5.2][seed],
                  nll=0.4)
        write_run(tmp_path, f"pskd/seed{seed}", "pskd", "pskd", seed, pskd, 0.8, ece=5.0 + seed, nll=0.5)
    write_run(tmp_path, "pskd/seed7", "pskd", "pskd", 7, 0.0, 0.8)  # no Baseline of seed 7: not paired
    runs = collect_runs(tmp_path)[0]
    text = render(paper_tables(runs), "md")
    table = "Paired difference to Baseline"
    # Top-1: AI-KD (-1, -2.5, -4); ECE (-2, -2.1, -1.8): mean -1.9667, sd 0.152753, half 0.379458.
    assert md_row(text, table, "AI-KD")[1:3] == ["-2.50 [-6.23, +1.23]", "**-1.97 [-2.35, -1.59]***"]
    assert md_row(text, table, "AI-KD")[3] == "**-0.1000 [-0.1000, -0.1000]***"  # NLL -0.1 on every seed
    # PS-KD (+1, -1, -3): mean -1, sd 2, half 4.968275.
    assert md_row(text, table, "PS-KD")[1] == "-1.00 [-5.97, +3.97]"
    assert md_row(text, table, "PS-KD")[2] == "+0.00 [+0.00, +0.00]"  # no difference at all: no star
    assert "| Baseline |" not in text.split(f"### {table}")[1]
    rows = list(csv.DictReader(io.StringIO(render(paper_tables(runs), "csv"))))
    cell = next(r for r in rows if r["table"] == table and r["method"] == "AI-KD" and r["metric"] == "ece")
    assert float(cell["ci_low"]) == pytest.approx(-2.346125, abs=1e-5) and cell["rank"] == "significant"
    assert cell["seeds"] == "3"


def write_history(folder: Path, rows: list[dict]) -> None:
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_learning_curves_average_the_seeds_at_the_epochs_all_evaluated(tmp_path):
    for seed, offset in enumerate((0.0, 2.0)):
        write_run(tmp_path, f"superior/run{seed}", "ce", "ce", seed, 10, 0.8)
        write_history(tmp_path / f"superior/run{seed}", [
            {"epoch": 1, "test.top1_err": 30 + offset, "test.ece": 5.0},
            {"epoch": 2, "train.loss": 1.0},  # not evaluated this epoch
            {"epoch": 3, "test.top1_err": 20 + offset, "test.ece": 4.0 + offset},
        ])
        write_run(tmp_path, f"aikd/seed{seed}", "aikd", "aikd", seed, 9, 0.8, aikd=FULL)
        write_history(tmp_path / f"aikd/seed{seed}", [{"epoch": e, "test.top1_err": 25 - e + seed,
                                                       "test.ece": 1.0} for e in range(1, 4 - seed)])
    (tmp_path / "aikd/seed1/metrics.jsonl").open("a").write('{"epoch": 3, "test.top1_')  # cut by a crash
    runs = collect_runs(tmp_path)[0]
    curves = learning_curve_data(runs)[("cifar100", "resnet18")]
    epochs, mean, std = curves["Top-1 error (%)"]["Baseline"]
    assert epochs.tolist() == [1, 3] and mean.tolist() == [31.0, 21.0] and std.tolist() == [1.0, 1.0]
    assert curves["ECE (%)"]["Baseline"][1].tolist() == [5.0, 5.0]
    epochs, mean, _ = curves["Top-1 error (%)"]["AI-KD"]  # seed 1 stopped after epoch 2
    assert epochs.tolist() == [1, 2] and mean.tolist() == [24.5, 23.5]
    [path] = learning_curve_figures(runs, tmp_path / "figures")
    assert path.name == "curves_cifar100_resnet18.png"
    from PIL import Image

    with Image.open(path) as image:
        assert image.size[0] > 600 and image.size[1] > 300


# ---------------------------------------------------------------------- aikd sweep --grid


def test_parse_grid_makes_every_combination():
    points = parse_grid(["aikd.alpha_p=0.1,0.3", "train.milestones=[0.5,0.75],[0.3, 0.6]"])
    assert [p.overrides for p in points] == [
        ["aikd.alpha_p=0.1", "train.milestones=[0.5,0.75]"], ["aikd.alpha_p=0.1", "train.milestones=[0.3, 0.6]"],
        ["aikd.alpha_p=0.3", "train.milestones=[0.5,0.75]"], ["aikd.alpha_p=0.3", "train.milestones=[0.3, 0.6]"]]
    assert points[1].name == "aikd.alpha_p=0.1,train.milestones=[0.3, 0.6]"
    assert parse_grid([]) == [()] and parse_grid([])[0].name == ""
    for bad in (["aikd.alpha_p"], ["=1,2"], ["aikd.alpha_p=1,"], ["a=1", "a=2"], ["a=1,1"]):
        with pytest.raises(AikdError, match="--grid"):
            parse_grid(bad)


def test_sweep_grid_runs_every_point_into_its_own_folder_and_row(tmp_path):
    config = tmp_path / "ce.yaml"
    config.write_text(yaml.safe_dump({**DIGITS, "method": "ce", "train": {"epochs": 1}}))
    out = tmp_path / "sweep"
    done = subprocess.run([sys.executable, "-m", "aikd", "sweep", "-c", str(config), "--seeds", "3", "-o",
                           str(out), "-q", "--grid", "train.lr=0.05,0.2", "--grid", "data.flip=false"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    for lr in ("0.05", "0.2"):
        folder = out / f"{tmp_path.name}/ce/train.lr={lr},data.flip=false/seed3/student"
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        assert saved["train"]["lr"] == float(lr) and saved["data"]["flip"] is False and saved["seed"] == 3
        assert json.loads((folder / "summary.json").read_text())["recipe"] == f"ce[train.lr={lr},data.flip=false]"
    report = subprocess.run([sys.executable, "-m", "aikd", "report", str(out)], capture_output=True, text=True)
    assert "| Baseline [train.lr=0.05,data.flip=false] |" in report.stdout
    assert "| Baseline [train.lr=0.2,data.flip=false] |" in report.stdout
    bad = subprocess.run([sys.executable, "-m", "aikd", "sweep", "-c", str(config), "-o", str(tmp_path / "x"),
                          "--grid", "data.crop_padding=1,-1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "data.crop_padding" in bad.stderr and not (tmp_path / "x").exists()


# ---------------------------------------------------------------------- aikd sweep, killed and resumed

DIGITS = {"data": {"name": "digits", "train_limit": 384, "test_limit": 200, "batch_size": 64},
          "model": {"name": "small_cnn"}, "deterministic": True}


def aikd_cli(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "aikd", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def test_sweep_killed_after_one_run_resumes_without_rerunning_it(tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "ce.yaml").write_text(yaml.safe_dump({**DIGITS, "method": "ce", "train": {"epochs": 1}}))
    (configs / "tfkd_self.yaml").write_text(yaml.safe_dump({**DIGITS, "method": "tfkd_self",
                                                           "train": {"epochs": 25}}))
    out = tmp_path / "sweep"
    command = ["sweep", "-c", str(configs / "ce.yaml"), str(configs / "tfkd_self.yaml"), "--seeds", "0", "-o",
               str(out), "-q"]
    first = out / "configs/ce/seed0/student/summary.json"
    proc = aikd_cli(*command)
    deadline = time.time() + 120
    while not first.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.is_file(), proc.stdout.read()
    assert not (out / "configs/tfkd_self/seed0/student/summary.json").is_file()  # killed mid-sweep
    stamp = first.stat().st_mtime_ns
    done = subprocess.run([sys.executable, "-m", "aikd", *command[:-1]], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert first.stat().st_mtime_ns == stamp  # the finished run was not trained again
    assert f"reusing the finished run in {first.parent.resolve()}" in done.stderr.replace(str(out), str(out.resolve()))
    student = json.loads((out / "configs/tfkd_self/seed0/student/summary.json").read_text())
    assert student["recipe"] == "tfkd_self" and student["epochs"] == 25
    # Two phase-1 models: the 1-epoch Baseline (the CE row is its own phase-1 model) and TF-KD's 25-epoch teacher.
    assert len(list((out / "superior").iterdir())) == 2
    assert [e["config"] for e in json.loads((out / "sweep.json").read_text())] == [
        str(configs / "ce.yaml"), str(configs / "tfkd_self.yaml")]
    report = subprocess.run([sys.executable, "-m", "aikd", "report", str(out)], capture_output=True, text=True)
    assert report.returncode == 0 and "| TF-KD (self) |" in report.stdout and "| Baseline |" in report.stdout


def test_sweep_trains_the_baseline_once_as_the_ce_row_and_the_phase1_model(tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "ce.yaml").write_text(yaml.safe_dump({**DIGITS, "method": "ce", "train": {"epochs": 2}}))
    (configs / "tfkd_self.yaml").write_text(yaml.safe_dump({**DIGITS, "method": "tfkd_self", "train": {"epochs": 2}}))
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "aikd", "sweep", "-c", str(configs / "ce.yaml"), str(configs / "tfkd_self.yaml"),
               "--seeds", "0", "1", "-o", str(out), "-q"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=600)
    assert done.returncode == 0, done.stderr
    # Four pipelines, four trainings: per seed one CE model (the Baseline row and TF-KD's teacher) and one student.
    trained = sorted(p.parent for p in out.rglob("metrics.jsonl"))  # rglob does not follow the links
    assert len(trained) == 4, trained
    assert [json.loads((p / "summary.json").read_text())["method"] for p in trained].count("ce") == 2
    for seed in (0, 1):
        student = out / f"configs/ce/seed{seed}/student"
        assert student.is_symlink() and student.resolve().parent == (out / "superior").resolve()
        tfkd = out / f"configs/tfkd_self/seed{seed}/student"
        teacher = json.loads((tfkd / "summary.json").read_text())["teacher"]  # relative to the run folder
        assert (tfkd / teacher).parent.parent.resolve() == student.resolve()  # the CE row is TF-KD's teacher
    again = subprocess.run(command[:-1], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                           timeout=600)  # without -q: its messages say what it reuses
    # Per seed: the Baseline, TF-KD's phase 1 (the same entry) and TF-KD's student; nothing trains again.
    assert again.returncode == 0 and again.stderr.count("reusing the finished run") == 6, again.stderr
    assert sorted(p.parent for p in out.rglob("metrics.jsonl")) == trained
    runs, duplicates = collect_runs(out)
    assert sorted((r.recipe, r.seed) for r in runs) == [("ce", 0), ("ce", 1), ("tfkd_self", 0), ("tfkd_self", 1)]
    assert duplicates == 0
    report = subprocess.run([sys.executable, "-m", "aikd", "report", str(out / "configs")], capture_output=True,
                            text=True)  # the cache is outside this folder: the links lead to the Baseline
    assert report.returncode == 0 and "| Baseline |" in report.stdout and "| TF-KD (self) |" in report.stdout


def test_sweep_checks_every_config_before_training(tmp_path):
    good = tmp_path / "ce.yaml"
    good.write_text(yaml.safe_dump({**DIGITS, "method": "ce"}))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**DIGITS, "method": "pskd", "pskd": {"alpha_t": 0.8}}))
    done = subprocess.run([sys.executable, "-m", "aikd", "sweep", "-c", str(good), str(bad), "-o",
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2 and "pskd.alpha_t" in done.stderr
    assert not (tmp_path / "out/tmp").exists() and not any((tmp_path / "out").rglob("summary.json"))


def test_cost_table_adds_phase_one_to_two_phase_runs_and_divides_by_the_baselines_time(tmp_path):
    for seed, base in enumerate([100.0, 200.0]):
        write_run(tmp_path, f"superior/run{seed}", "ce", "ce", seed, 10.0, 0.8, train_time_s=base)
        # Phase 1 from the pipeline's record beside the run: (130 + 100) / 100, (250 + 200) / 200.
        write_run(tmp_path, f"aikd/seed{seed}/student", "aikd", "aikd", seed, 9.0, 0.8, aikd=FULL,
                  train_time_s=[130.0, 250.0][seed], teacher=f"/elsewhere/entry{seed}/checkpoints/last.safetensors")
        (tmp_path / f"aikd/seed{seed}/pipeline.json").write_text(json.dumps({"superior": {"train_time_s": base}}))
        # No phase 1: its own time only, (140, 300) / base.
        write_run(tmp_path, f"online/seed{seed}", "aikd_online_ema", "aikd", seed, 9.5, 0.8, aikd=ONLINE,
                  train_time_s=[140.0, 300.0][seed])
    # Phase 1 found through the teacher checkpoint's entry (no pipeline.json): (50 + 100) / 100.
    write_run(tmp_path, "kd/seed0/student", "kd", "kd", 0, 9.0, 0.8, train_time_s=50.0,
              teacher=str(tmp_path / "superior/run0/checkpoints/last.safetensors"))
    # A teacher whose time is nowhere to be found: no cost rather than an understated one.
    write_run(tmp_path, "dkd/seed0/student", "dkd", "dkd", 0, 9.0, 0.8, train_time_s=50.0,
              teacher="/nowhere/checkpoints/last.safetensors")
    text = render(paper_tables(collect_runs(tmp_path)[0]), "md")
    table = "Training cost"
    assert md_row(text, table, "Baseline")[1] == "1.00x ± 0.00"
    assert md_row(text, table, "AI-KD")[1] == "2.27x ± 0.04"  # 2.30, 2.25
    assert md_row(text, table, "AI-KD online (EMA)")[1] == "1.45x ± 0.07"  # 1.40, 1.50
    assert md_row(text, table, "KD")[1] == "1.50x (n=1)"
    assert md_row(text, table, "DKD")[1] == "–"


def test_forest_plot_draws_the_paired_tables_intervals(sweep, tmp_path):
    import re

    import matplotlib.pyplot as plt

    from aikd.report.figures import forest_data, forest_figures
    from aikd.report.plots import forest_figure

    runs, _ = collect_runs(sweep)
    text = render(paper_tables(runs), "md")
    panels = forest_data(runs)[("cifar100", "resnet18")]
    fig = forest_figure(panels)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["Top-1 err", "ECE", "NLL"]
    names = [t.get_text() for t in axes[0].get_yticklabels()]
    assert names == ["PS-KD", "No Adv", "AI-KD"]  # the table's order, top to bottom
    block = text.split("### Paired difference")[1].split("###")[0]
    for ax, column in zip(axes, (1, 2, 3), strict=True):
        segments = {round(seg[0][1]): (seg[0][0], seg[1][0]) for coll in ax.collections for seg in coll.get_segments()}
        dots = {round(line.get_ydata()[0]): line.get_xdata()[0] for line in ax.get_lines() if line.get_marker() == "o"}
        for y, name in enumerate(names):
            cell = _paired_md(block, name)[column - 1]
            mean, low, high = (float(v) for v in re.findall(r"[-+]?\d+\.\d+", cell)[:3])
            assert dots[y] == pytest.approx(mean, abs=0.006)
            if name == "PS-KD" and ax.get_title() != "Top-1 err":  # a difference of 0 on every seed: no spread
                continue
            assert segments[y] == pytest.approx((low, high), abs=0.006), (ax.get_title(), name)
    # AI-KD's Top-1 error by hand: differences -1, -2.5, -4; mean -2.5, sd 1.5, t(0.975, 2) = 4.303.
    half = 4.302653 * 1.5 / 3 ** 0.5
    assert segments_of(axes[0], 2) == pytest.approx((-2.5 - half, -2.5 + half), rel=1e-4)
    plt.close(fig)
    assert [p.name for p in forest_figures(runs, tmp_path / "figs")] == ["forest_cifar100_resnet18.png"]


def _paired_md(block: str, name: str) -> list[str]:
    row = next(line for line in block.splitlines() if line.startswith(f"| {name} |"))
    return [c.strip() for c in row.strip("|").split("|")][1:]


def segments_of(ax, y: int) -> tuple[float, float]:
    seg = next(seg for coll in ax.collections for seg in coll.get_segments() if round(seg[0][1]) == y)
    return seg[0][0], seg[1][0]


def test_demo_prints_what_two_phase_aikd_costs_over_one_ce_run():
    from aikd.cli import demo_cost

    line = demo_cost({"train_time_s": 100.0}, {"train_time_s": 150.0})
    assert "Baseline 100 s, AI-KD student 150 s" in line and "costs 2.50x one CE run" in line
    assert demo_cost({"train_time_s": None}, {"train_time_s": 150.0}) is None


def _run_on_subset(root: Path, recipe: str, method: str, seed: int, subset: int, top1: float) -> None:
    run = root / f"{recipe}/s{subset}/seed{seed}"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"method": method, "dataset": "d", "model": "m", "seed": seed,
                                                  "recipe": recipe, "top1_err": top1, "ece": 1.0, "nll": 1.0}))
    section = {"alpha_g": 0.1, "alpha_p": 0.3, "adv_weight": 0.1 if recipe == "aikd" else 0.0}
    (run / "config.yaml").write_text(yaml.safe_dump({"method": method, "data": {"subset_seed": subset},
                                                     "aikd": section}))


def test_table4_steps_pair_by_seed_and_subset_and_give_the_papers_verdict(tmp_path):
    from aikd.methods import METHODS
    from aikd.report.tables import steps_table

    aikd = METHODS.get("aikd")  # the steps are AI-KD's (AIKD.ablation), the report's for any method declaring some
    # Seeds 0-2 on subset 0, seeds 5-6 each on its own subset; seed 0 also on subset 9 (a different draw).
    no_adv = {(0, 0): 10.0, (1, 0): 11.0, (2, 0): 12.0, (5, 5): 10.0, (6, 6): 13.0, (0, 9): 50.0}
    gains = {(0, 0): -0.5, (1, 0): -0.7, (2, 0): -0.6, (5, 5): -0.4, (6, 6): -0.8, (0, 9): +9.0}
    for (seed, subset), err in no_adv.items():
        _run_on_subset(tmp_path, "aikd_no_adv", "aikd", seed, subset, err)
        _run_on_subset(tmp_path, "ce", "ce", seed, subset, err + 1.0)  # No Adv - Baseline: -1 on every draw
    for (seed, subset), gain in gains.items():
        if (seed, subset) != (0, 9):  # AI-KD lacks that draw: it must not be paired with subset 0's seed 0
            _run_on_subset(tmp_path, "aikd", "aikd", seed, subset, no_adv[(seed, subset)] + gain)
    runs, duplicates = collect_runs(tmp_path)
    assert duplicates == 0 and len(runs) == 17  # seed 0 on two subsets: two runs, not a duplicate
    table = steps_table(runs, aikd)
    assert table.groups == ["d / m, subset 0", "d / m, other subsets", "d / m, all draws"]
    row = table.cells[table.row_names.index("AI-KD - No Adv")]
    # Subset 0: -0.5, -0.7, -0.6 -> mean -0.6, sd 0.1, t(0.975, 2) = 4.303: half-width 0.248.
    assert row[0].mean == pytest.approx(-0.6) and row[0].interval == pytest.approx((-0.6 - 0.2484, -0.6 + 0.2484),
                                                                                   abs=1e-4)
    assert row[1].mean == pytest.approx(-0.6) and row[1].n == 2
    assert row[2].n == 5 and row[2].mean == pytest.approx(-0.6)
    notes = "\n".join(table.notes)
    # All five draws: sd 0.158, t(0.975, 4) = 2.776: half-width 0.196, excluding 0 with the paper's sign.
    assert "AI-KD - No Adv (paper -0.47): d / m: confirmed (n = 5, half-width 0.20)" in notes
    assert "No Adv - Only Progressive" not in notes  # no Only Progressive runs: no row
    # Only Guide is absent too; Baseline pairs with No Adv only through the steps that name it.
    assert table.row_names == ["AI-KD - No Adv"]
    flipped = [r for r in runs if r.recipe != "aikd"] + [
        replace(r, metrics={**r.metrics, "top1_err": 2 * no_adv[r.draw] - r.metrics["top1_err"]})
        for r in runs if r.recipe == "aikd"]
    assert "contradicted (n = 5, half-width 0.20)" in "\n".join(steps_table(flipped, aikd).notes)


@pytest.mark.parametrize(("value", "why"), [("12.5", "not a number"), (float("nan"), "not a finite number"),
                                            (float("inf"), "not a finite number"), (True, "not a number")])
def test_report_refuses_a_summary_with_a_bad_metric_naming_the_file(tmp_path, value, why):
    write_run(tmp_path, "ok/seed0", "ce", "ce", 0, 10.0, 0.8)
    write_run(tmp_path, "bad/seed1", "ce", "ce", 1, 10.0, 0.8)
    bad = tmp_path / "bad/seed1/summary.json"
    summary = json.loads(bad.read_text())
    summary["ece"] = value
    bad.write_text(json.dumps(summary))  # json writes nan and inf as NaN and Infinity, as Python reads them back
    with pytest.raises(AikdError) as info:
        collect_runs(tmp_path)
    assert f"'{bad}': metric 'ece'" in str(info.value) and why in str(info.value)


def test_one_seed_shows_its_value_without_a_spread(tmp_path):
    write_run(tmp_path, "a/seed0", "ce", "ce", 0, 10.0, 0.8)
    write_run(tmp_path, "b/seed0", "pskd", "pskd", 0, 9.0, 0.9)
    write_run(tmp_path, "b/seed1", "pskd", "pskd", 1, 12.0, 0.7)
    text = render(paper_tables(collect_runs(tmp_path)[0]), "md")
    assert md_row(text, "Table 2", "Baseline")[1] == "**10.00 (n=1)**"  # one seed where PS-KD has two: noted
    assert md_row(text, "Table 2", "PS-KD")[1] == "<u>10.50 ± 2.12</u>"
    assert "± 0.00" not in md_row(text, "Table 2", "Baseline")[1]


def test_report_of_several_folders_pairs_their_seeds(tmp_path):
    for root, seed, subset in (("first", 0, 0), ("second", 5, 5)):
        _run_on_subset(tmp_path / root, "ce", "ce", seed, subset, 10.0 + seed)
        _run_on_subset(tmp_path / root, "aikd_no_adv", "aikd", seed, subset, 9.0 + seed)
    runs, _ = collect_runs(tmp_path / "first", tmp_path / "second")
    assert sorted(r.draw for r in runs if r.recipe == "ce") == [(0, 0), (5, 5)]
    done = subprocess.run([sys.executable, "-m", "aikd", "report", str(tmp_path / "first"), str(tmp_path / "second")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert md_row(done.stdout, "Paired difference", "No Adv")[1] == "**-1.00 [-1.00, -1.00]***"


def test_tradeoff_map_places_each_method_at_its_paired_error_ece_and_cost(sweep, tmp_path):
    """Each point of the error-calibration map sits at the paired table's mean differences, spans its intervals,
    and is labelled with the cost table's ratio; checked against the rendered report's numbers."""
    import re

    import matplotlib.pyplot as plt

    from aikd.report.figures import tradeoff_data, tradeoff_figures
    from aikd.report.plots import tradeoff_figure

    # ECE and wall time vary by seed so that the intervals and the costs are not all the same.
    for seed, (ece_ce, ece_pskd, t_ce, t_pskd) in enumerate([(5.0, 3.0, 100, 110), (6.0, 3.5, 100, 130),
                                                             (7.0, 3.0, 200, 240)]):
        for folder, ece, total in ((f"superior/run{seed}", ece_ce, t_ce), (f"c/pskd/seed{seed}/student", ece_pskd,
                                                                            t_pskd)):
            path = sweep / folder / "summary.json"
            summary = json.loads(path.read_text())
            path.write_text(json.dumps({**summary, "ece": ece, "train_time_s": total}))
    runs, _ = collect_runs(sweep)
    text = render(paper_tables(runs), "md")
    points = tradeoff_data(runs)[("cifar100", "resnet18")]
    assert [p.name for p in points] == ["PS-KD", "No Adv", "AI-KD"]
    fig = tradeoff_figure(points)
    ax = fig.axes[0]
    paired = text.split("### Paired difference")[1].split("###")[0]
    for name in ("PS-KD", "AI-KD"):
        error_cell, ece_cell = _paired_md(paired, name)[:2]
        error, error_low, error_high = (float(v) for v in re.findall(r"[-+]?\d+\.\d+", error_cell)[:3])
        ece, ece_low, ece_high = (float(v) for v in re.findall(r"[-+]?\d+\.\d+", ece_cell)[:3])
        dot = next(line for line in ax.get_lines() if line.get_gid() == name and line.get_marker() == "o")
        assert (dot.get_xdata()[0], dot.get_ydata()[0]) == (pytest.approx(error, abs=0.006),
                                                            pytest.approx(ece, abs=0.006))
        spans = [coll.get_segments()[0] for coll in ax.collections if coll.get_gid() == name]
        if name == "PS-KD":  # Top-1 error differs by -1, -1, -3: an interval on both axes
            (x0, y0), (x1, y1) = spans[0]
            assert (x0, x1) == (pytest.approx(error_low, abs=0.006), pytest.approx(error_high, abs=0.006))
            assert y0 == y1 == pytest.approx(ece, abs=0.006)
            (x0, y0), (x1, y1) = spans[1]
            assert (y0, y1) == (pytest.approx(ece_low, abs=0.006), pytest.approx(ece_high, abs=0.006))
    # PS-KD's cost by hand: 110/100, 130/100, 240/200 = 1.1, 1.3, 1.2 -> mean 1.20; label and cost table agree.
    label = next(t.get_text() for t in ax.texts if t.get_gid() == "PS-KD")
    assert label == "PS-KD (1.20x)" and md_row(text, "Training cost", "PS-KD")[1].startswith("1.20x")
    pskd_dot = next(line for line in ax.get_lines() if line.get_gid() == "PS-KD")
    aikd_dot = next(line for line in ax.get_lines() if line.get_gid() == "AI-KD")
    assert pskd_dot.get_markersize() == pytest.approx(7.0 * 1.2 ** 0.5)  # area proportional to the cost
    assert aikd_dot.get_markersize() == 5.0  # no recorded time: the plain marker, and no cost in its label
    assert next(t.get_text() for t in ax.texts if t.get_gid() == "AI-KD") == "AI-KD"
    plt.close(fig)
    assert [p.name for p in tradeoff_figures(runs, tmp_path / "figs")] == ["tradeoff_cifar100_resnet18.png"]
