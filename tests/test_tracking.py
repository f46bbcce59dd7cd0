"""Experiment tracking with MLflow (tracking.backend=mlflow): real runs into a real SQLite store, read back
with MLflow's own client; the missing extra; tracking never changes a run's identity."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from aikd.config import load_config, save_config
from aikd.engine import Trainer
from aikd.engine.pipeline import _finished, superior_key
from aikd.engine.tracking import MISSING, TRACKING_FILE, config_params, resolve_uri
from aikd.errors import ConfigError, RunInterrupted

TINY = ["data.name=digits", "model.name=small_cnn", "data.batch_size=64", "data.train_limit=256",
        "data.test_limit=64", "device=cpu", "deterministic=true"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating its tables takes seconds); each test has its own experiment."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # creates the tables
    return uri


def tracked(store: str, experiment: str, *extra: str):
    return load_config(None, [*TINY, "tracking.backend=mlflow", f"tracking.uri={store}",
                              f"tracking.experiment={experiment}", *extra])


def only_run(store: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_history(client, run, records: list[dict]) -> None:
    """Every numeric key of metrics.jsonl has one MLflow value per epoch, the same number at step = epoch."""
    keys = {k for r in records for k, v in r.items() if isinstance(v, int | float) and k not in ("epoch", "epochs")}
    assert {"train.loss", "loss.ce", "train.acc", "lr", "test.top1_err"} <= keys
    for key in keys:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == [(r["epoch"], float(r[key])) for r in records if key in r], key


def test_a_tracked_run_holds_the_config_every_epoch_the_summary_and_the_checkpoint(store, tmp_path, one_thread):
    cfg = tracked(store, "whole", "train.epochs=2", "train.lr=0.05")
    out = tmp_path / "run"
    summary = Trainer(cfg, out, quiet=True, recipe="ce_small").fit()
    client, run = only_run(store, "whole")
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "ce_small-small_cnn-seed0"
    assert json.loads((out / TRACKING_FILE).read_text())["run_id"] == run.info.run_id
    assert run.data.tags["aikd.recipe"] == "ce_small" and run.data.tags["aikd.run_dir"] == str(out.resolve())
    # the resolved config, dotted, as config.yaml has it (and no tracking.* key: it is not part of the run)
    params = run.data.params
    assert params == config_params(cfg)
    assert params["train.lr"] == "0.05" and params["train.epochs"] == "2" and params["model.name"] == "small_cnn"
    assert params["data.train_limit"] == "256" and params["train.milestones"] == "[0.5, 0.75]"
    assert params["teacher.checkpoint"] == "null" and params["train.nesterov"] == "true"
    assert not any(k.startswith("tracking.") for k in params)
    # every epoch once, the numbers of metrics.jsonl
    records = jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    check_history(client, run, records)
    # the summary's numbers as final.* metrics
    assert json.loads((out / "summary.json").read_text()) == summary
    finals = {k.removeprefix("final."): v for k, v in run.data.metrics.items() if k.startswith("final.")}
    numbers = {k: float(v) for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    assert finals == numbers and finals["top1_err"] == summary["top1_err"]
    # the final checkpoint and the run's files, byte for byte
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"checkpoints", "summary.json", "config.yaml", "metrics.jsonl"} <= files
    for name in ("checkpoints/last.safetensors", "summary.json", "config.yaml"):
        local = client.download_artifacts(run.info.run_id, name, str(tmp_path))
        assert Path(local).read_bytes() == (out / name).read_bytes(), name


def test_a_stopped_run_resumes_into_the_same_mlflow_run_with_every_epoch_once(store, tmp_path, one_thread):
    cfg = tracked(store, "resumed", "train.epochs=3", "train.keep_last=2")
    out = tmp_path / "run"
    assert Trainer(cfg, out, quiet=True).fit(stop_after=2) is None
    client, run = only_run(store, "resumed")
    assert run.info.status == "KILLED"  # stopped before its last epoch
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train.loss")] == [1, 2]
    # resumed from the older epoch-0001 checkpoint, so epoch 2 trains again: MLflow keeps its first record
    Trainer(cfg, out, quiet=True).fit(resume=out / "checkpoints" / "epoch-0001.safetensors")
    client, again = only_run(store, "resumed")
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    records = jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 2, 3]  # metrics.jsonl appends every epoch trained
    first_of_each = [r for i, r in enumerate(records) if r["epoch"] not in [x["epoch"] for x in records[:i]]]
    check_history(client, again, first_of_each)
    assert again.data.params == config_params(cfg)


def test_tracking_switched_on_at_a_resume_gets_the_earlier_epochs_too(store, tmp_path, one_thread):
    untracked = load_config(None, [*TINY, "train.epochs=3"])
    out = tmp_path / "run"
    assert Trainer(untracked, out, quiet=True).fit(stop_after=2) is None
    assert not (out / TRACKING_FILE).exists()
    Trainer(tracked(store, "switched", "train.epochs=3"), out, quiet=True).fit(resume=True)
    client, run = only_run(store, "switched")
    assert run.info.status == "FINISHED"
    records = jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    check_history(client, run, records)


def test_an_interrupted_run_ends_killed_and_a_failed_one_failed(store, tmp_path, monkeypatch, one_thread):
    import aikd.engine.trainer as trainer_module

    real = trainer_module.train_epoch
    for experiment, error, status in (("killed", RunInterrupted("stopped by SIGTERM", 15), "KILLED"),
                                      ("failed", RuntimeError("boom"), "FAILED")):
        calls = []

        def second_epoch_raises(run, epoch, error=error, calls=calls):
            calls.append(epoch)
            if len(calls) == 2:
                raise error
            return real(run, epoch)

        monkeypatch.setattr(trainer_module, "train_epoch", second_epoch_raises)
        with pytest.raises(type(error)):
            Trainer(tracked(store, experiment, "train.epochs=2"), tmp_path / experiment, quiet=True).fit()
        client, run = only_run(store, experiment)
        assert run.info.status == status
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train.loss")] == [1]


def test_default_experiment_is_the_dataset_and_a_relative_uri_is_made_absolute(store, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    assert resolve_uri("sqlite:///runs/mlflow.db") == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert resolve_uri("mlruns") == (tmp_path / "mlruns").as_uri()
    assert resolve_uri("file:mlruns") == (tmp_path / "mlruns").as_uri()
    for uri in ("http://localhost:5000", "databricks", store, "sqlite:////abs/m.db?timeout=30"):
        assert resolve_uri(uri) == uri
    cfg = load_config(None, [*TINY, "tracking.backend=mlflow"])
    assert cfg.tracking.experiment is None and cfg.tracking.uri is None and cfg.tracking.run_name is None


def test_missing_mlflow_is_named_before_anything_trains(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    with pytest.raises(ConfigError) as info:
        load_config(None, [*TINY, "tracking.backend=mlflow"])
    assert str(info.value) == MISSING == "tracking.backend=mlflow needs MLflow: pip install 'aikd[tracking]'"
    load_config(None, [*TINY, "tracking.backend=none"])  # no tracking needs no MLflow


def test_tracking_keys_are_checked():
    with pytest.raises(ConfigError, match="Did you mean 'backend'"):
        load_config(None, ["tracking.backnd=mlflow"])
    with pytest.raises(ConfigError, match="'none', 'mlflow'"):
        load_config(None, ["tracking.backend=neptune"])


def test_tracking_never_changes_a_runs_identity(tmp_path, monkeypatch):
    """Left out of to_dict: config.yaml, checkpoints, the phase-1 cache key and the reuse/resume checks are the
    same with tracking on or off, so switching it never makes a finished or cached run look changed."""
    import aikd.config

    monkeypatch.setattr(aikd.config, "_check_tracking", lambda cfg: None)  # no MLflow needed for this check
    off = load_config(None, TINY)
    on = load_config(None, [*TINY, "tracking.backend=mlflow", "tracking.uri=sqlite:///x.db",
                            "tracking.experiment=e", "tracking.run_name=r", "tracking.log_checkpoint=false"])
    assert on.tracking.backend == "mlflow" and off.tracking.backend == "none"
    assert on.to_dict() == off.to_dict() and "tracking" not in on.to_dict()
    assert superior_key(on) == superior_key(off)
    save_config(off, tmp_path / "off.yaml")
    save_config(on, tmp_path / "on.yaml")
    assert (tmp_path / "on.yaml").read_bytes() == (tmp_path / "off.yaml").read_bytes()
    run = tmp_path / "finished"
    run.mkdir()
    save_config(off, run / "config.yaml")
    (run / "summary.json").write_text(json.dumps({"top1_err": 1.0}))
    assert _finished(run, on) == {"top1_err": 1.0}  # a finished run without tracking is reused with it on


@pytest.mark.slow  # about 30 s: two processes that each import torch and MLflow
def test_only_rank_zero_tracks_a_data_parallel_run(store, tmp_path):
    """Two ranks (torchrun, gloo on CPU), through the command line: one MLflow run, each epoch once."""
    import os
    import subprocess

    config = tmp_path / "ce.yaml"
    config.write_text("method: ce\n")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "aikd",
               "train", "-q", "-c", str(config), "-o", str(out), *TINY, "train.epochs=2", "tracking.backend=mlflow",
               f"tracking.uri={store}", "tracking.experiment=ranks"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    client, run = only_run(store, "ranks")
    assert run.info.status == "FINISHED" and run.data.tags["aikd.run_dir"] == str(out.resolve())
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    check_history(client, run, jsonl(out / "metrics.jsonl"))
