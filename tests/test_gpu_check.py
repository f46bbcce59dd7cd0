"""scripts/gpu_check.sh, the GPU acceptance test: its verdicts fail where they must, and its dry run passes.

The verdict functions of scripts/gpu_check.py are fed the records of real tiny runs (small_cnn on digits, trained
here by the same code the check runs); each failure condition is then made real (another seed for a resume that
differs, a learning rate that diverges) or written into a copy of a real record (a fallback, a non-finite loss),
and the verdict must turn to "fail". The whole dry run, on the CPU, is the slow test.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch

from aikd.bench.syncs import SyncCounter, SyncWarnings

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
CONFIGS = ROOT / "configs" / "fashion_mnist"
TINY = ["data.name=digits", "model.name=small_cnn", "data.train_limit=128", "data.test_limit=96",
        "data.batch_size=32", "train.epochs=2", "train.eval_every=1", "device=cpu", "deterministic=true"]


def _load_helper():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gc = _load_helper()


def fit(folder: Path, config: str, *overrides: str) -> dict:
    """One real run through the check's own in-process runner; its entry (status, records, summary)."""
    entry: dict = {"config": config}
    gc._fit_in_process(CONFIGS / f"{config}.yaml", [*TINY, *overrides], folder, config, entry, lambda: None)
    return entry


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread) -> dict[str, Path]:
    """Real run folders: CE twice with one seed (equal), once with another (different)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, seed in (("straight", 0), ("repeat", 0), ("other-seed", 1)):
        assert fit(root / name, "ce", f"seed={seed}")["status"] == "ok"
        out[name] = root / name
    return out


def resume_record(straight: Path, repeat: Path, stopped: Path) -> dict:
    """The record `gpu_check.py resume` writes, for these folders (a stop that landed as asked)."""
    return {"name": "resume", "nproc": 1, "done": True,
            "runs": {"straight": str(straight), "repeat": str(repeat), "stopped": str(stopped)},
            "rc": {"straight": 0, "repeat": 0, "resumed": 0},
            "stop": {"how": "SIGTERM after batch 2 of epoch 2", "rc": 143, "expected_rc": 143,
                     "epochs_before_resume": 1}}


def test_resume_verdict_passes_equal_runs_and_fails_a_resume_that_differs(runs, tmp_path):
    straight, repeat = runs["straight"], runs["repeat"]
    assert gc.compare_runs(straight, repeat) == []  # deterministic CE on the CPU: equal to the last bit
    same = shutil.copytree(repeat, tmp_path / "resumed-equal")
    assert gc.check_resume(resume_record(straight, repeat, same))["status"] == "pass"

    other = gc.check_resume(resume_record(straight, repeat, runs["other-seed"]))  # really trained differently
    assert other["status"] == "fail" and "the resumed run differs" in other["detail"]

    nudged = shutil.copytree(repeat, tmp_path / "resumed-nudged")  # one number of epoch 2, off by 1e-9
    lines = (nudged / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    record["train.loss"] += 1e-9
    (nudged / "metrics.jsonl").write_text("\n".join([lines[0], json.dumps(record)]) + "\n")
    verdict = gc.check_resume(resume_record(straight, repeat, nudged))
    assert verdict["status"] == "fail" and "epoch 2 train.loss" in verdict["detail"]

    # A repeat that differs: deterministic mode is not, and the check says so.
    verdict = gc.check_resume(resume_record(straight, runs["other-seed"], same))
    assert verdict["status"] == "fail" and "two uninterrupted runs differ" in verdict["detail"]


def test_resume_verdict_fails_when_the_stop_did_not_land_or_a_run_failed(runs):
    record = resume_record(runs["straight"], runs["repeat"], runs["repeat"])
    record["stop"].update(rc=0, epochs_before_resume=2)  # it ran to the end: nothing was resumed
    assert gc.check_resume(record)["status"] == "fail"
    record = resume_record(runs["straight"], runs["repeat"], runs["repeat"])
    record["rc"]["resumed"] = 1
    verdict = gc.check_resume(record)
    assert verdict["status"] == "fail" and "resumed exited 1" in verdict["detail"]
    assert gc.check_resume(None)["status"] == "not run"


def test_methods_verdict_fails_a_crash_a_non_finite_number_and_a_missing_method(runs, tmp_path):
    ok = fit(tmp_path / "ce", "ce")
    record = {"registered": ["ce"], "done": True, "runs": [ok]}
    assert gc.check_methods(record)["status"] == "pass"

    diverged = fit(tmp_path / "diverged", "ce", "train.lr=1e30")  # a real crash: the trainer stops a diverged run
    assert diverged["status"] == "crashed" and "diverged" in diverged["error"]
    verdict = gc.check_methods({**record, "runs": [ok, diverged]})
    assert verdict["status"] == "fail" and "crashed" in verdict["detail"]

    nan = json.loads(json.dumps(ok))
    nan["epochs_records"][1]["train.loss"] = math.nan
    verdict = gc.check_methods({**record, "runs": [nan]})
    assert verdict["status"] == "fail" and "epoch 2 train.loss" in verdict["detail"]

    verdict = gc.check_methods({**record, "registered": ["ce", "pskd"]})
    assert verdict["status"] == "fail" and "pskd" in verdict["detail"]


def test_compile_verdict_fails_a_fallback_to_eager(tmp_path):
    """Records in the form the aikd wrapper writes: a fallback reason, or only the fallback's warning."""
    work = tmp_path / "work"
    (work / "records").mkdir(parents=True)

    def record(**fit_facts) -> list[dict]:
        fact = {"out": str(tmp_path / "run"), "done": True, "method": "ce", "compile": True, **fit_facts}
        (work / "records" / "ce-compiled.json").write_text(json.dumps({"fits": [fact], "compile_warnings":
                                                                      fit_facts.pop("warnings", [])}))
        return gc._rows(work)

    assert gc.check_compile(record())["status"] == "pass"
    verdict = gc.check_compile(record(compile_failed="BackendCompilerFailed: no C++ compiler"))
    assert verdict["status"] == "fail" and "no C++ compiler" in verdict["detail"]
    warned = gc.check_compile(record(warnings=["train.compile: torch.compile failed (X); running in eager mode."]))
    assert warned["status"] == "fail"
    assert gc.check_compile([])["status"] == "not run"


def test_precision_verdict_fails_divergence_and_an_error_far_above_fp32(tmp_path):
    record = {"done": True, "runs": []}
    for amp in ("off", "fp16", "bf16"):
        entry = fit(tmp_path / amp, "ce", f"train.amp={amp}")
        record["runs"].append({**entry, "amp": amp})
    assert gc.check_precision(record)["status"] == "pass", gc.check_precision(record)

    bad = json.loads(json.dumps(record))
    bad["runs"][1]["summary"]["nll"] = math.inf
    verdict = gc.check_precision(bad)
    assert verdict["status"] == "fail" and "ce fp16 not finite: summary nll" in verdict["detail"]

    bad = json.loads(json.dumps(record))
    bad["runs"][2]["summary"]["top1_err"] = bad["runs"][0]["summary"]["top1_err"] + gc.PRECISION_TOLERANCE + 1
    verdict = gc.check_precision(bad)
    assert verdict["status"] == "fail" and "ce bf16: top-1 error" in verdict["detail"]


def test_step_verdict_fails_a_skipped_required_step_but_not_an_optional_one():
    assert gc.check_steps([{"step": "bench", "status": "skipped-optional"}])["status"] == "pass"
    assert gc.check_steps([{"step": "resume", "status": "skipped"}])["status"] == "fail"
    assert gc.check_steps([{"step": "methods", "status": "failed"}])["status"] == "fail"


def test_sync_counter_counts_what_would_sync_on_a_gpu():
    x = torch.randn(64)
    with SyncCounter(cuda=False) as counter:
        y = x * 2 + 1  # no sync
        float(y.sum())  # .item()
        torch.nonzero(y > 0)
        y[y > 0]  # boolean-mask indexing
    assert counter.by_op["_local_scalar_dense"] == 1 and counter.by_op["nonzero"] == 1
    assert counter.total == 3
    assert all(site.startswith("test_gpu_check.py:") for site in counter.sites)
    assert counter.facts(steps=3)["per_step"] == 1.0


def test_cuda_sync_warnings_are_counted_at_the_line_that_synced():
    """What torch.cuda.set_sync_debug_mode("warn") raises (no CUDA here: the warning, raised from this file)."""
    counter, passed_on = SyncCounter(cuda=True), []
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *rest, **more: passed_on.append(str(message))
        with SyncWarnings(counter):
            for _ in range(2):
                warnings.warn(SyncWarnings.MESSAGE, UserWarning, stacklevel=1)
            warnings.warn("something else", UserWarning, stacklevel=1)
    assert counter.by_op == {"cuda sync": 2} and counter.total == 2
    assert list(counter.sites) == [f"test_gpu_check.py:{warnings_line()}"]
    assert passed_on == ["something else"]


def warnings_line() -> int:
    source = Path(__file__).read_text().splitlines()
    return next(i for i, line in enumerate(source, 1) if "SyncWarnings.MESSAGE, UserWarning" in line)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_without_cuda_the_gpu_check_stops_at_once_with_the_reason(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "gpu_check: no CUDA device" in done.stderr and "--dry-run" in done.stderr
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_dry_run_passes_end_to_end(tmp_path):
    """The whole check on the CPU, bench aside: every step runs and every verdict passes (16 min on 2 busy
    cores; the suite's 600 s limit would cut it)."""
    out = tmp_path / "out"
    start = time.monotonic()
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True,
                          timeout=3600, env={**os.environ, "BENCH": "skip"})
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    verdicts = {c["check"]: c["status"] for c in result["checks"]}
    assert set(verdicts.values()) == {"pass"}, verdicts
    assert {r["method"] for r in result["methods"]["runs"]} >= set(result["methods"]["registered"])
    print(f"dry run: {time.monotonic() - start:.0f} s")
