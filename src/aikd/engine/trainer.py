"""The trainer: one run from start to summary, by orchestrating the engine's parts.

* :mod:`.setup` builds the run's parts from the config (data, student, teacher,
  method, loaders, optimizer, the distribution strategy);
* :mod:`.loop` trains one epoch;
* :mod:`.guards` decide whether a step stands and whether to stop;
* :mod:`.state` holds where the run stands and writes and reads checkpoints.

:class:`Trainer` prepares the output folder, resumes, runs the epochs (train,
evaluate, checkpoint, log), and at the end computes the summary and writes the
run's files.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from aikd.config import RunConfig, save_config, with_teacher_hash
from aikd.data import DataBundle
from aikd.engine.checkpoint import atomic_write_bytes
from aikd.engine.evaluator import Evaluator
from aikd.engine.guards import NonFiniteGuard, StopSignals
from aikd.engine.locks import run_folder_lock
from aikd.engine.logger import RunLogger
from aikd.engine.loop import Epoch, train_epoch
from aikd.engine.output import SILENT, Output, RunIdentity
from aikd.engine.runtime import nondeterministic_ops_explained
from aikd.engine.setup import RunParts, build_parts
from aikd.engine.state import BEST, LAST, RunCheckpoints, RunState, find_resume_checkpoint
from aikd.engine.tracking import NO_TRACKER, TRACKING_FILE, Tracker, open_tracker
from aikd.errors import AikdError
from aikd.fileio import check_output_folder
from aikd.metrics.calibration import ReliabilityBins
from aikd.metrics.reliability import write_reliability
from aikd.run_files import teacher_record

__all__ = ["BEST", "LAST", "Trainer", "find_resume_checkpoint", "train"]


class Trainer:
    """Trains one model with one method; :meth:`fit` returns the run's summary.

    ``output`` says where the run's words go (``quiet=True`` is the short form of ``output=Output(quiet=True)``);
    ``recipe`` names the run in reports (by default the method).
    """

    def __init__(self, cfg: RunConfig, out_dir: str | Path, *, output: Output | None = None,
                 quiet: bool | None = None, data: DataBundle | None = None, recipe: str | None = None) -> None:
        self.cfg = cfg
        self.out = Path(out_dir)
        check_output_folder(self.out, "run folder", ("checkpoints",))  # before the data and the model are built
        self.identity = RunIdentity.of(cfg, recipe)
        self.parts: RunParts = build_parts(cfg, data)
        p = self.parts
        # One voice (progress bars, epoch lines) per run: rank 0's.
        self.output = (output or Output()).with_(quiet=quiet).for_rank(p.strategy.is_main)
        self.state = RunState()
        self.checkpoints = RunCheckpoints(self.out, p.trained(), self.state, cfg.to_dict(), cfg.train.keep_last,
                                          p.placement)
        self.guard = NonFiniteGuard(cfg.train, p.placement, p.model, self.state, self.checkpoints.last)
        # Test metrics and temperature scaling, each computed once per epoch of the model (shared with aikd eval).
        self.evaluator = Evaluator(p.model, p.data, p.placement, self.output)

    # The parts and counters tests, benchmarks and users reach for.
    data = property(lambda self: self.parts.data)
    model = property(lambda self: self.parts.model)
    method = property(lambda self: self.parts.method)
    train_model = property(lambda self: self.parts.train_model)
    train_loader = property(lambda self: self.parts.train_loader)
    optimizer = property(lambda self: self.parts.optimizer)
    step = property(lambda self: self.state.step)
    epoch = property(lambda self: self.state.epoch)
    recipe = property(lambda self: self.identity.recipe)

    def resume(self, path: str | Path | None = None) -> None:
        """Continue from a full checkpoint (by default OUT/checkpoints/last.safetensors)."""
        self.checkpoints.resume(path)

    def fit(self, resume: bool | str | Path = False, overwrite: bool = False,
            stop_after: int | None = None) -> dict[str, Any] | None:
        """Train for ``train.epochs`` epochs, evaluate, write summary.json; return the summary.

        ``resume``: True or "last" continues from checkpoints/last.safetensors,
        "auto" from the newest valid checkpoint in the run folder (or starts
        fresh when there is none), a path from that checkpoint.
        ``stop_after=N`` ends the call after epoch N (checkpointed, no summary,
        returns None): a long run can be split into jobs that each ``resume``.
        SIGTERM and SIGINT stop the run at the next step boundary with a
        checkpoint there, and raise :class:`RunInterrupted`.
        """
        with contextlib.ExitStack() as held:  # the folder's lock and the tracked run, released at the end
            logger = self._open(held, resume, overwrite)
            try:
                self._run_epochs(logger, stop_after)
            finally:
                logger.close()
            return self._finish(logger.tracker) if self.state.epoch >= self.cfg.train.epochs else None

    def _open(self, held: contextlib.ExitStack, resume: bool | str | Path, overwrite: bool) -> RunLogger:
        """Take the run folder, resume, start tracking, save the config; the run's logger, which said so."""
        p, state = self.parts, self.state
        source = find_resume_checkpoint(self.out, resume) if resume else None
        # Rank 0 locks the folder for the whole run, then checks and prepares it; a refusal there stops every
        # rank with rank 0's message.
        p.strategy.main_then_share(lambda: self._take_folder(held, source is not None, overwrite))
        if source is not None:
            self.resume(source)
        tracker = self._start_tracking(held, resumed_at=None if source is None else state.epoch)
        if p.strategy.is_main:
            save_config(self.cfg, self.out / "config.yaml")
        logger = RunLogger(self.out, self.output, tracker=tracker) if p.strategy.is_main else RunLogger.silent()
        logger.info(self._banner())
        if source is not None:
            logger.info(f"aikd: resuming from '{source}' (epoch {state.epoch}"
                        f"{', batch ' + str(state.position['batch']) if state.position else ''})")
        return logger

    def _take_folder(self, held: contextlib.ExitStack, resume: bool, overwrite: bool) -> None:
        held.enter_context(run_folder_lock(self.out))
        self._prepare_out_dir(resume, overwrite)

    def _start_tracking(self, held: contextlib.ExitStack, resumed_at: int | None) -> Tracker:
        """Rank 0's tracked run with tracking.backend=mlflow (it ends with ``held``); started after a resume was
        accepted, so a refused one leaves the tracked run as it was."""
        tracker: list[Tracker] = [NO_TRACKER]  # the other ranks and tracking.backend=none track nothing

        def start() -> None:
            tracker[0] = held.enter_context(open_tracker(self.cfg, self.out, identity=self.identity,
                                                         output=self.output, resumed_at=resumed_at))

        if self.cfg.tracking.backend != "none":
            self.parts.strategy.main_then_share(start)
        return tracker[0]

    def _run_epochs(self, logger: RunLogger, stop_after: int | None) -> None:
        """The epochs up to ``train.epochs`` (or ``stop_after``), each logged; a stop signal ends the run at the
        end of an epoch, after its checkpoint."""
        p, state, epochs = self.parts, self.state, self.cfg.train.epochs
        with StopSignals(p.strategy, p.device) as signals, nondeterministic_ops_explained():
            run = Epoch(p, state, self.guard, signals, self.checkpoints, self.output)
            while state.epoch < min(epochs, stop_after or epochs):
                logger.log_epoch(self._epoch(run))
                if signals.requested():
                    raise signals.interrupted(f"at the end of epoch {state.epoch}", self.checkpoints.last)

    def _epoch(self, run: Epoch) -> dict[str, Any]:
        """One epoch: train, evaluate (every ``train.eval_every`` epochs and after the last), checkpoint; its
        record."""
        state, epochs = self.state, self.cfg.train.epochs
        record = train_epoch(run, state.epoch)
        state.epoch += 1
        if state.epoch % self.cfg.train.eval_every == 0 or state.epoch == epochs:
            record.update({f"test.{k}": v for k, v in self._evaluate_now().items()})
        self.checkpoints.save(LAST)
        return record

    def _finish(self, tracker: Tracker) -> dict[str, Any]:
        """The finished run's summary; rank 0 writes it with the reliability files and hands it to the tracker."""
        p = self.parts
        summary, bins = self.summary(), self.reliability()
        if p.strategy.is_main:
            atomic_write_bytes(self.out / "summary.json", json.dumps(summary, indent=2).encode())
            if bins is not None:
                write_reliability(bins, summary["temperature"], f"{self.identity.recipe} - {self.cfg.data.name}",
                                  self.out / "reliability.png", self.out / "reliability.json")
            tracker.finish(summary)
        p.strategy.barrier()  # every file of the run is written before any rank moves on (pipeline phase 2)
        return summary

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One training epoch on its own (benchmarks time it); :meth:`fit` runs the whole schedule."""
        with StopSignals(self.parts.strategy, self.parts.device) as signals:
            return train_epoch(Epoch(self.parts, self.state, self.guard, signals, self.checkpoints, SILENT), epoch)

    def _evaluate_now(self) -> dict[str, float]:
        """Test metrics after this epoch; a new best error also writes best.safetensors (weights only)."""
        state = self.state
        metrics = self.evaluate()
        if metrics["top1_err"] < state.best["top1_err"]:
            state.best = {"top1_err": metrics["top1_err"], "epoch": state.epoch}
            self.checkpoints.save(BEST, full=False)
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Metrics of the current model on the whole test split (the validation images with data.val_size)."""
        return self.evaluator.metrics(self.state.epoch)

    def reliability(self) -> dict[str, ReliabilityBins] | None:
        """The test set's reliability bins before and after temperature scaling (None without a holdout)."""
        calibration = self.evaluator.calibration(self.state.epoch)
        return None if calibration is None else calibration[1]

    # ------------------------------------------------------------------ bookkeeping

    def summary(self) -> dict[str, Any]:
        """The final model's test metrics plus what identifies the run (computed; fit() writes it)."""
        p, state = self.parts, self.state
        calibration = self.evaluator.calibration(state.epoch)
        return {
            **self.evaluate(),
            **(calibration[0] if calibration else {}),
            "recipe": self.identity.recipe,
            "method": self.cfg.method,
            "model": self.cfg.model.name,
            "dataset": self.cfg.data.name,
            "seed": self.identity.seed,
            "epochs": state.epoch,
            "best_top1_err": state.best["top1_err"],
            "best_epoch": state.best["epoch"],
            "num_train": len(p.data.train),
            "num_test": len(p.data.test),
            "eval_split": p.data.eval_split,
            "num_params": sum(t.numel() for t in p.model.parameters()),
            "train_acc": state.train_acc,
            "time_per_epoch_s": sum(state.train_times) / max(len(state.train_times), 1),
            "train_time_s": sum(state.train_times),
            "device": str(p.device),
            "world_size": p.strategy.world_size,
            **teacher_record(self.cfg.teacher, self.out),
            "skipped_steps": state.skipped_steps,
            **({"skipped_files": p.data.skipped_files} if p.data.skipped_files else {}),
            **_peak_gpu_memory(p.device),
            **p.method.run_facts(),
        }

    def _banner(self) -> str:
        p, d = self.parts, self.parts.data
        return (f"aikd: {self.cfg.method} | {self.cfg.model.name} on {d.name} "
                f"({len(d.train)} train / {len(d.test)} {d.eval_split}, {d.num_classes} classes) | "
                f"{self.cfg.train.epochs} epochs | device {p.device}"
                f"{f' x {p.strategy.world_size} processes' if p.strategy.distributed else ''} | out {self.out}")

    def _prepare_out_dir(self, resume: bool, overwrite: bool) -> None:
        existing = self.checkpoints.last.exists() or (self.out / "summary.json").exists()
        if existing and not resume:
            if not overwrite:
                raise AikdError(
                    f"Output folder '{self.out}' already holds a run. Continue it with --resume, "
                    f"or choose another -o OUTDIR."
                )
            for name in ("checkpoints", "tensorboard"):
                shutil.rmtree(self.out / name, ignore_errors=True)
            for name in ("metrics.jsonl", "summary.json", "config.yaml", "reliability.json", "reliability.png",
                         TRACKING_FILE):
                (self.out / name).unlink(missing_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)


def train(cfg: RunConfig, out_dir: str | Path, *, resume: bool | str | Path = False, overwrite: bool = False,
          quiet: bool | None = None, recipe: str | None = None, stop_after: int | None = None,
          output: Output | None = None) -> dict[str, Any] | None:
    """Library entry point: train one run and return its summary (None when ``stop_after`` ended it early).

    ``recipe`` names the run in reports (``aikd report``); by default the method. ``output`` (or its short form
    ``quiet``) says where the run's words go.
    """
    cfg = with_teacher_hash(cfg)  # the teacher is known by its weights in config.yaml and the checkpoints
    return Trainer(cfg, out_dir, output=output, quiet=quiet, recipe=recipe).fit(resume=resume, overwrite=overwrite,
                                                                                stop_after=stop_after)


def _peak_gpu_memory(device: torch.device) -> dict[str, float]:
    """On CUDA: the most memory this process's tensors held (MiB; a resumed run counts since its resume)."""
    if device.type != "cuda":
        return {}
    return {"peak_gpu_mem_mib": torch.cuda.max_memory_allocated(device) / 2**20}
