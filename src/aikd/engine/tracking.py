"""Experiment tracking: a copy of a run's config, epochs and final files in MLflow (``tracking.backend=mlflow``).

The trainer opens a tracker when it takes the run folder (rank 0 only; the other ranks and
``tracking.backend=none`` get :data:`NO_TRACKER`, whose calls do nothing), :class:`RunLogger` hands it
every epoch's record (the line metrics.jsonl gets), and the trainer finishes it with the summary.

* The MLflow run gets the resolved config as dotted parameters (``train.lr``, ``aikd.alpha_g``), each
  epoch's numbers as metrics at step = epoch, the summary's numbers as ``final.*`` metrics, and the final
  checkpoint, summary.json, config.yaml and metrics.jsonl as artifacts; it ends FINISHED, KILLED (stopped
  early: a signal, ``stop_after``, Ctrl-C) or FAILED (an error).
* The run folder's ``tracking.json`` names the MLflow run, so a resumed run (``--resume``, a pipeline run
  again) continues the same MLflow run, where epochs it logged already are not logged again; epochs it
  lacks (trained with tracking off, or reported to another store) come from metrics.jsonl.
* MLflow is an optional extra, imported only here and only when asked for; a missing one is reported
  when the config is validated, before anything trains.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

from aikd.config import RunConfig
from aikd.engine.output import Output, RunIdentity
from aikd.errors import AikdError, RunInterrupted
from aikd.extras import TRACKING, missing, require
from aikd.fileio import atomic_write_bytes

TRACKING_FILE = "tracking.json"  # in the run folder: which MLflow run it reports to (resume continues it)
LAST_EPOCH_TAG = "aikd.last_epoch"  # the last epoch the MLflow run holds metrics for
MISSING = missing(*TRACKING[1:])
FINAL_FILES = ("summary.json", "config.yaml", "metrics.jsonl", "reliability.json", "reliability.png")


def _mlflow() -> Any:
    return require(*TRACKING)


class Tracker:
    """No tracking: every call does nothing (``tracking.backend=none``, and the non-zero ranks)."""

    def log_epoch(self, record: dict[str, Any]) -> None:
        """One epoch's record, as written to metrics.jsonl."""

    def finish(self, summary: dict[str, Any]) -> None:
        """The run's end: its summary (and files); the tracked run ends FINISHED."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        """Leaving the run: a run not finished ends KILLED (stopped early) or FAILED (an error)."""


NO_TRACKER = Tracker()


def open_tracker(cfg: RunConfig, out: Path, *, identity: RunIdentity, output: Output, resumed_at: int | None
                 ) -> Tracker:
    """The tracker ``cfg.tracking`` asks for, started: a new MLflow run, or for a run resumed after epoch
    ``resumed_at`` the folder's own (a new one, given the epochs of metrics.jsonl so far, where it has none)."""
    if cfg.tracking.backend == "mlflow":
        return MlflowTracker.start(cfg, out, identity=identity, output=output, resumed_at=resumed_at)
    return NO_TRACKER


# ---------------------------------------------------------------------------------------------- MLflow


class MlflowTracker(Tracker):
    """One MLflow run, reached through an :class:`mlflow.tracking.MlflowClient` (no global active run, so a
    library user's own ``mlflow.start_run`` is left alone)."""

    def __init__(self, client: Any, run_id: str, out: Path, last_epoch: int, log_checkpoint: bool,
                 quiet: bool) -> None:
        self.client, self.run_id, self.out = client, run_id, out
        self.last_epoch = last_epoch  # epochs up to here are in the run already (a resumed run redoes none)
        self.log_checkpoint, self.quiet = log_checkpoint, quiet
        self.ended = False

    @classmethod
    def start(cls, cfg: RunConfig, out: Path, *, identity: RunIdentity, output: Output, resumed_at: int | None
              ) -> MlflowTracker:
        recipe, quiet = identity.recipe, output.quiet
        mlflow = _mlflow()
        from mlflow.tracking import MlflowClient

        t = cfg.tracking
        uri = resolve_uri(t.uri if t.uri is not None else mlflow.get_tracking_uri())
        try:
            client = MlflowClient(tracking_uri=uri)
            run = _saved_run(client, out, uri, quiet) if resumed_at is not None else None
            if run is None:
                experiment = _experiment(client, t.experiment or cfg.data.name, uri)
                run = client.create_run(experiment, run_name=t.run_name or default_run_name(cfg, recipe),
                                        tags=run_tags(cfg, recipe, out))
                last_epoch = 0
            else:
                client.update_run(run.info.run_id, status="RUNNING")
                last_epoch = int(run.data.tags.get(LAST_EPOCH_TAG, 0))
                _say(quiet, f"aikd: continuing MLflow run {run.info.run_id} (epochs up to {last_epoch} logged)")
            _log_params(client, run, config_params(cfg), quiet)
        except AikdError:
            raise
        except Exception as err:  # any failure of the store, before the first epoch: stop with its message
            raise AikdError(f"tracking.backend=mlflow could not start a run in '{uri}': "
                            f"{type(err).__name__}: {err}") from None
        record = {"backend": "mlflow", "uri": uri, "experiment_id": run.info.experiment_id,
                  "run_id": run.info.run_id}
        atomic_write_bytes(out / TRACKING_FILE, json.dumps(record, indent=2).encode())
        tracker = cls(client, run.info.run_id, out, last_epoch, t.log_checkpoint, quiet)
        # Epochs trained while tracking was off (or reported elsewhere) before the resume: from metrics.jsonl.
        for epoch_record in logged_epochs(out / "metrics.jsonl", resumed_at or 0):
            tracker.log_epoch(epoch_record)  # skips the epochs the MLflow run holds
        return tracker

    def log_epoch(self, record: dict[str, Any]) -> None:
        epoch = int(record["epoch"])
        if epoch <= self.last_epoch:  # resumed from an older checkpoint: the run has this epoch already
            return
        from mlflow.entities import Metric, RunTag

        now = _now_ms()
        metrics = [Metric(k, float(v), now, epoch) for k, v in record.items()
                   if _is_number(v) and k not in ("epoch", "epochs")]
        self._guard(f"log epoch {epoch}", lambda: self.client.log_batch(
            self.run_id, metrics=metrics, tags=[RunTag(LAST_EPOCH_TAG, str(epoch))]))
        self.last_epoch = epoch

    def finish(self, summary: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        def upload() -> None:
            logged = self.client.get_run(self.run_id).data.metrics  # a finished run resumed again: no repeats
            step, now = int(summary.get("epochs", self.last_epoch)), _now_ms()
            finals = [Metric(k, v, now, step) for k, v in final_metrics(summary).items() if k not in logged]
            for start in range(0, len(finals), 1000):  # MLflow takes at most 1000 metrics per batch
                self.client.log_batch(self.run_id, metrics=finals[start:start + 1000])
            checkpoint = self.out / "checkpoints" / "last.safetensors"
            if self.log_checkpoint and checkpoint.is_file():
                self.client.log_artifact(self.run_id, str(checkpoint), "checkpoints")
            for name in FINAL_FILES:
                if (self.out / name).is_file():
                    self.client.log_artifact(self.run_id, str(self.out / name))

        status = "FINISHED" if self._guard("log the final results", upload) else "FAILED"
        self._end(status)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: Any) -> None:
        if not self.ended:
            stopped = kind is None or issubclass(kind, RunInterrupted | KeyboardInterrupt | SystemExit)
            self._end("KILLED" if stopped else "FAILED")

    def _end(self, status: str) -> None:
        self.ended = True
        self._guard(f"end its run as {status}", lambda: self.client.set_terminated(self.run_id, status))

    def _guard(self, what: str, action: Any) -> bool:
        """Run ``action``; a tracker that fails mid-run is reported, and training goes on (metrics.jsonl has it)."""
        try:
            action()
        except Exception as err:
            print(f"aikd: warning: MLflow could not {what} (run {self.run_id}): {type(err).__name__}: {err}. "
                  f"Training goes on; the run folder has every number.", file=sys.stderr, flush=True)
            return False
        return True


def resolve_uri(uri: str) -> str:
    """``uri`` with a local path made absolute, so that a resumed run finds its store from any working folder.

    A plain path (or ``file:`` URI) is a file store, ``sqlite:///relative.db`` a database in the working
    folder; server URIs (``http://``, ``databricks``, ``postgresql://``) pass through.
    """
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path, sep, query = uri[len("sqlite:///"):].partition("?")
        if path and path != ":memory:":
            return f"sqlite:///{Path(path).expanduser().resolve()}{sep}{query}"
        return uri
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return Path(uri[len("file:"):]).expanduser().resolve().as_uri()
    if uri in ("databricks", "databricks-uc", "uc") or (re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri) and
                                                         not re.match(r"^[A-Za-z]:[\\/]", uri)):
        return uri  # a server, a database, or a file: URI that is absolute already
    return Path(uri).expanduser().resolve().as_uri()


def _saved_run(client: Any, out: Path, uri: str, quiet: bool) -> Any | None:
    """The MLflow run named by the folder's tracking.json, when it is in this store and not deleted."""
    try:
        saved = json.loads((out / TRACKING_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("backend") != "mlflow" or not saved.get("run_id"):
        return None
    if saved.get("uri") != uri:
        _say(quiet, f"aikd: this run reported to MLflow at '{saved.get('uri')}'; it now starts a new MLflow run "
                    f"in '{uri}'")
        return None
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(saved["run_id"])
    except MlflowException:
        run = None
    if run is None or run.info.lifecycle_stage != "active":
        _say(quiet, f"aikd: MLflow run {saved['run_id']} is gone from '{uri}'; starting a new one")
        return None
    return run


def _experiment(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created when missing (in a local SQLite store with its artifacts in
    ``mlartifacts/`` beside the database, not in the working folder)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        location = None
        if uri.startswith("sqlite:////"):
            db = Path(uri[len("sqlite:///"):].partition("?")[0])
            location = (db.parent / "mlartifacts" / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)).as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by another run of a sweep
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage != "active":
        raise AikdError(f"MLflow experiment '{name}' in '{uri}' is deleted: restore it (mlflow experiments "
                        f"restore --experiment-id {found.experiment_id}) or choose another tracking.experiment.")
    return found.experiment_id


def logged_epochs(path: Path, upto: int) -> list[dict[str, Any]]:
    """The records of metrics.jsonl for epochs 1..``upto``, one per epoch: the last one written (an epoch trained
    again after a resume from an older checkpoint replaces the earlier record)."""
    records: dict[int, dict[str, Any]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int) and 1 <= record["epoch"] <= upto:
            records[record["epoch"]] = record
    return [records[epoch] for epoch in sorted(records)]


def default_run_name(cfg: RunConfig, recipe: str) -> str:
    return f"{recipe}-{cfg.model.name}-seed{cfg.seed}"


def run_tags(cfg: RunConfig, recipe: str, out: Path) -> dict[str, str]:
    return {"aikd.recipe": recipe, "aikd.method": cfg.method, "aikd.model": cfg.model.name,
            "aikd.dataset": cfg.data.name, "aikd.seed": str(cfg.seed), "aikd.run_dir": str(out.resolve())}


def config_params(cfg: RunConfig) -> dict[str, str]:
    """The resolved config (as config.yaml has it) as dotted MLflow parameters: strings as they are, every other
    value as JSON (``0.1``, ``true``, ``null``, ``[0.5, 0.75]``), cut to MLflow's length limit."""
    try:
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as limit
    except ImportError:
        limit = 500
    return {key: (value if isinstance(value, str) else json.dumps(value))[:limit]
            for key, value in flatten(cfg.to_dict()).items()}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}`` (an empty section adds nothing)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        elif not isinstance(value, dict):
            out[f"{prefix}{key}"] = value
    return out


def final_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The summary's finite numbers as ``final.KEY`` metrics (strings and nulls are the run's tags and params)."""
    return {f"final.{k}": float(v) for k, v in flatten(summary).items() if _is_number(v) and math.isfinite(v)}


def _log_params(client: Any, run: Any, params: dict[str, str], quiet: bool) -> None:
    """Log the parameters the run does not hold yet. An MLflow parameter cannot change once logged: a resumed
    run (same config, checked against its checkpoint) keeps what it has."""
    from mlflow.entities import Param

    held = run.data.params
    changed = [k for k, v in params.items() if k in held and held[k] != v]
    if changed:
        _say(quiet, f"aikd: MLflow run {run.info.run_id} keeps its logged values of {', '.join(changed)}")
    todo = [Param(k, v) for k, v in params.items() if k not in held]
    for start in range(0, len(todo), 100):  # MLflow takes at most 100 parameters per batch
        client.log_batch(run.info.run_id, params=todo[start:start + 100])


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)
