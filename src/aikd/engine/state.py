"""Run state: where a run stands, and its checkpoints (save, resume, find one to resume, keep the last few).

:class:`RunState` is everything that changes while a run trains besides the
weights (epochs and steps done, the best error, timings, skipped steps, the
position inside an interrupted epoch). :class:`RunCheckpoints` writes it with
the model, optimizer, schedule, scaler, method state and RNG streams into one
safetensors file, and reads it back so that a resumed run continues exactly.
"""

from __future__ import annotations

import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aikd.config import normalized, same_teacher
from aikd.engine.checkpoint import (
    StoredRows,
    abandon_checkpoint,
    load_checkpoint,
    read_header,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from aikd.engine.optim import load_optimizer_state
from aikd.errors import RESUME_TRAIN, CheckpointError, ConfigError, DiskFullError
from aikd.methods.base import Method
from aikd.shards import row_shards_of
from aikd.strategy import Placement, Strategy

LAST, BEST = "last.safetensors", "best.safetensors"


@dataclass
class RunState:
    """Counters and records of a run; saved in every full checkpoint."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken (skipped steps included: the schedule moves on)
    best: dict[str, Any] = field(default_factory=lambda: {"top1_err": math.inf, "epoch": 0})
    train_times: list[float] = field(default_factory=list)
    train_acc: float | None = None  # the last epoch's training accuracy (%), on its augmented views
    skipped_steps: int = 0
    position: dict[str, Any] | None = None  # where a mid-epoch checkpoint stopped (consumed by the next epoch)

    def to_checkpoint(self) -> dict[str, Any]:
        return {"best": self.best, "train_times": self.train_times, "train_acc": self.train_acc,
                "skipped_steps": self.skipped_steps}

    def load(self, saved: dict[str, Any], meta: dict[str, Any]) -> None:
        self.best = saved["best"]
        self.train_times = list(saved["train_times"])
        self.train_acc = saved.get("train_acc")
        self.skipped_steps = int(saved.get("skipped_steps", 0))
        self.position = saved.get("position")
        self.epoch, self.step = int(meta["epoch"]), int(meta["step"])


@dataclass
class Trained:
    """What a full checkpoint saves besides the run state: the student and everything that trains it."""

    model: nn.Module  # the bare student
    describe: dict[str, Any]  # its description saved with its weights (architecture, classes)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    method: Method  # its state_dict(), extra state included


@dataclass(frozen=True)
class RankStreams:
    """The global RNG streams of every rank: gathered to rank 0 for a checkpoint, each rank's own restored.

    Ranks draw different amounts from their streams (the critic's interpolation weights and BSS's draws
    follow each rank's share of a batch), so rank 0's streams are not the others'; each rank keeps the
    stream of its own GPU only (:func:`aikd.engine.checkpoint.rng_state`).
    """

    strategy: Strategy
    device: torch.device

    def gather(self) -> list[dict[str, Any]]:
        """Every rank's streams in rank order (a collective: every rank calls it)."""
        return self.strategy.gather_objects(rng_state(self.device))

    def restore(self, saved: list[dict[str, Any]] | dict[str, Any]) -> None:
        """Restore this rank's streams; a checkpoint of another world size or device type warns and continues."""
        states = saved if isinstance(saved, list) else [saved]  # older checkpoints: rank 0's streams alone
        rank, world = self.strategy.rank, self.strategy.world_size
        problems = [] if len(states) == world else [
            f"the checkpoint holds the random streams of {len(states)} processes and this run has {world}"]
        if rank < len(states):
            problem = set_rng_state(states[rank], self.device)
            problems += [problem] if problem else []
        if problems and self.strategy.is_main:
            warnings.warn(f"Resuming with other random streams: {'; '.join(problems)}. The run continues, but its "
                          f"random draws (augmentations, a method's sampling) differ from the interrupted run's.",
                          stacklevel=3)


class RunCheckpoints:
    """The checkpoints of one run folder: OUT/checkpoints/{last,best,epoch-NNNN}.safetensors.

    ``trained.describe`` is the model's description (architecture, classes: what loading the weights alone
    needs) and ``config`` the run's config as saved, which a resumed run must match; only rank 0 writes, but every rank
    calls :meth:`save` (its random streams travel to rank 0).
    """

    def __init__(self, out: Path, trained: Trained, state: RunState, config: dict[str, Any], keep_last: int = 1,
                 placement: Placement | None = None) -> None:
        placement = placement or Placement()
        self.folder = out / "checkpoints"
        self.trained, self.state = trained, state
        self.config, self.keep_last, self.is_main = config, keep_last, placement.strategy.is_main
        self.streams = RankStreams(placement.strategy, placement.device)
        self.last_epoch_end: int | None = None  # epoch of last.safetensors when it was saved at an epoch's end

    @property
    def last(self) -> Path:
        return self.folder / LAST

    def meta(self) -> dict[str, Any]:
        return {**self.trained.describe, "config": self.config, "epoch": self.state.epoch, "step": self.state.step}

    def save(self, name: str, full: bool = True, position: dict[str, Any] | None = None) -> Path:
        """Write a checkpoint (rank 0 writes; the other ranks hold the same state but their own random streams,
        which a full checkpoint gathers, and their own rows of a sharded buffer, which they send to rank 0 as
        it writes them); ``position`` marks a mid-epoch one (where in the epoch it stopped)."""
        t = self.trained
        state = None
        if full:
            state = {
                "optimizer": t.optimizer.state_dict(),
                "scheduler": t.scheduler.state_dict(),
                "scaler": t.scaler.state_dict(),
                # its extra state included (get_extra_state); a buffer split over the ranks as its blocks
                "method": {**t.method.state_dict(), **row_shards_of(t.method)},
                "rng": self.streams.gather(),  # one per rank
                **self.state.to_checkpoint(),
            }
            if position is not None:
                state["position"] = position
        path = self.folder / name
        if not self.is_main:
            if state is not None:
                save_checkpoint(path, {}, {}, state, writer=False)  # sends this rank's blocks
            return path
        if name == LAST:
            try:
                self._keep_previous_last()
            except BaseException:
                abandon_checkpoint(state)  # the other ranks are sending their blocks of the buffer
                raise
        try:
            save_checkpoint(path, t.model.state_dict(), self.meta(), state)
        except DiskFullError as err:
            kept = (f"The last checkpoint '{self.last}' is intact: free space, then continue by running {RESUME_TRAIN}."
                    if self.last.is_file() else "No checkpoint was written yet: free space, then run the command "
                    "again.")
            raise DiskFullError(f"{err} {kept}") from None
        if name == LAST:
            self.last_epoch_end = None if position is not None else self.state.epoch
        return path

    def _own_rows(self, saved: dict[str, Any], path: Path) -> dict[str, Any]:
        """The method's saved state with each tensor split by rows (the buffer) cut to the rows this rank owns,
        read from the file alone; a split tensor this run holds whole is read whole. The file holds every row
        whichever number of ranks wrote it, so a run resumes with any number."""
        shards = row_shards_of(self.trained.method)
        own = {}
        for key, value in saved.items():
            if isinstance(value, StoredRows):
                shard = shards.get(key)
                if shard is not None and value.shape != shard.shape:
                    raise CheckpointError(f"Checkpoint '{path}' does not fit this run: '{key}' holds "
                                          f"{value.shape}, this run's {shard.shape}.")
                value = value.rows(*shard.bounds) if shard is not None else value.load()
            own[key] = value
        return own

    def _keep_previous_last(self) -> None:
        """With train.keep_last > 1, keep the checkpoint about to be replaced as epoch-NNNN.safetensors.

        A hard link (a copy where links are not supported) made before the atomic
        replace, so at every moment last.safetensors is whole.
        """
        keep, last = self.keep_last, self.last
        if keep <= 1 or not last.is_file() or not self.last_epoch_end:
            return  # nothing to keep, or a mid-epoch checkpoint (it only matters until the epoch ends)
        kept = self.folder / f"epoch-{self.last_epoch_end:04d}.safetensors"
        if not kept.exists():
            try:
                os.link(last, kept)
            except OSError:
                shutil.copyfile(last, kept)
        for old in sorted(self.folder.glob("epoch-*.safetensors"))[: -(keep - 1)]:
            old.unlink(missing_ok=True)

    def resume(self, path: str | Path | None = None) -> None:
        """Continue from a full checkpoint (by default OUT/checkpoints/last.safetensors)."""
        path = Path(path) if path else self.last
        if not path.is_file():
            raise CheckpointError(f"Cannot resume: '{path}' does not exist. Start without --resume.")
        ckpt = load_checkpoint(path, lazy_rows=True)
        if not ckpt.state:
            raise CheckpointError(f"'{path}' holds only weights; resume needs a full checkpoint "
                                  f"such as checkpoints/{LAST}.")
        t = self.trained
        saved = ckpt.meta.get("config", {})
        differ = config_diff(normalized(saved) or saved, self.config)
        if differ:
            raise ConfigError(
                f"Cannot resume from '{path}': the config differs from the checkpoint's in "
                f"{', '.join(differ)}. Resume with the original config, or start a new output folder."
            )
        try:
            t.model.load_state_dict(ckpt.model)
            load_optimizer_state(t.optimizer, ckpt.state["optimizer"])
            t.scheduler.load_state_dict(ckpt.state["scheduler"])
            t.scaler.load_state_dict(ckpt.state["scaler"])
            method_state = self._own_rows(ckpt.state["method"], path)
            if "method_extra" in ckpt.state:  # written before issue 34: the extra state apart
                method_state = t.method.upgrade_state_dict(method_state, ckpt.state["method_extra"])
            t.method.load_state_dict(method_state)
            self.streams.restore(ckpt.state["rng"])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise CheckpointError(f"Checkpoint '{path}' does not fit this run: {err}") from None
        self.state.load(ckpt.state, ckpt.meta)
        self.last_epoch_end = self.state.epoch if self.state.position is None and path.name == LAST else None


def find_resume_checkpoint(out: Path, which: bool | str | Path) -> Path | None:
    """The checkpoint to resume from: last.safetensors (True / "last"), the newest valid one ("auto"), or a path.

    "auto" skips damaged files (a kill during a write on a filesystem without
    atomic rename, a truncated copy) and returns None when the folder holds no
    checkpoint at all, so a preemptible job can always pass --resume auto. It
    chooses from the files' headers alone (:func:`~aikd.engine.checkpoint.read_header`,
    which checks that a file is as long as its header says), never loading a
    candidate's tensors.
    """
    folder = out / "checkpoints"
    if which is True or which == "last":
        return folder / LAST
    if which != "auto":
        return Path(which)
    candidates = [p for p in (folder / LAST, *folder.glob("epoch-*.safetensors")) if p.is_file()]
    if not candidates:
        return None
    ranked, broken = [], []
    for path in candidates:
        try:
            header = read_header(path)  # the file's length is checked against its header; no tensor is read
        except CheckpointError as err:
            broken.append(f"{path.name} ({err})")
            continue
        state = header.outline()
        if state:
            position = state.get("position") or {}
            ranked.append(((int(header.meta.get("step", 0)), position.get("batch", 0), path.name == LAST), path))
    if not ranked:
        raise CheckpointError(f"No usable checkpoint in '{folder}' to resume from: {'; '.join(broken)}.")
    return max(ranked)[1]


def config_diff(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two config dicts, with both values. The teacher's path and hash
    count as one: they differ only if the teacher does (:func:`aikd.config.same_teacher`)."""
    if prefix == "teacher." and same_teacher(saved, current):
        saved, current = ({k: v for k, v in d.items() if k not in ("checkpoint", "sha256")} for d in (saved, current))
    keys = sorted(set(saved) | set(current))
    out = []
    for key in keys:
        a, b = saved.get(key), current.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, path + ".")
        elif a != b:
            out.append(f"{path} ({a!r} -> {b!r})")
    return out
