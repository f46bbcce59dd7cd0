"""Guards: the two things that may stop or skip a step, as small objects the loop asks.

* :class:`NonFiniteGuard`: a loss term that is NaN or infinite either stops the
  run naming the term and the step (``train.on_nonfinite=stop``), or skips the
  step (``skip``: no update, the BatchNorm statistics of its forward rolled
  back) until ``train.max_skipped_steps``. Watching costs no host sync per step;
  the run syncs every CHECK_EVERY steps and at each epoch's end.
* :class:`StopSignals`: SIGTERM / SIGINT ask the run to stop at the next step
  boundary (a checkpoint is written there); in a distributed run the ranks
  agree on it every CHECK_EVERY steps so they stop at the same step.
"""

from __future__ import annotations

import math
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from aikd.config import TrainConfig
from aikd.engine.state import RunState
from aikd.errors import RESUME_TRAIN, AikdError, RunInterrupted
from aikd.strategy import Placement, Strategy

CHECK_EVERY = 25  # steps between divergence checks (and progress-bar updates), each a device sync


class NonFiniteWatch:
    """Remembers, on the training device, the first batch of an epoch whose loss terms were not all finite.

    Recording is a few tensor ops with no host sync, so the hot path does not wait on the
    device every step; :meth:`first` syncs and is called every CHECK_EVERY steps and at the
    end of the epoch. The run stops at most CHECK_EVERY - 1 steps after the bad one, before
    any checkpoint of the diverged model is written.
    """

    def __init__(self, device: torch.device, epoch: int, step_before_first_batch: int, batches: int) -> None:
        self.batch = torch.full((), -1, dtype=torch.long, device=device)
        self.values: dict[str, Tensor] = {}  # each term's value at the first bad batch
        self.epoch, self.step0, self.batches = epoch, step_before_first_batch, batches

    def record(self, losses: dict[str, Tensor], number: int) -> None:
        values = {k: v.detach().float() for k, v in losses.items()}
        new = (self.batch < 0) & ~torch.stack(list(values.values())).isfinite().all()
        self.batch = torch.where(new, number, self.batch)
        for key, value in values.items():
            self.values[key] = torch.where(new, value, self.values.get(key, torch.zeros_like(value)))

    def first(self) -> str | None:
        """'in epoch E, batch B of N (optimizer step S): loss term ce = nan, ...' for the first bad batch, or None."""
        batch = int(self.batch)
        if batch < 0:
            return None
        terms = ", ".join(f"{k} = {float(v)}" for k, v in self.values.items() if not math.isfinite(float(v)))
        return (f"in epoch {self.epoch + 1}, batch {batch} of {self.batches} (optimizer step {self.step0 + batch}): "
                f"loss term {terms}")


class NonFiniteGuard:
    """The non-finite policy of one run (``train.on_nonfinite``, ``train.max_skipped_steps``)."""

    def __init__(self, cfg: TrainConfig, placement: Placement, student: nn.Module, state: RunState,
                 last_checkpoint: Path) -> None:
        self.skip = cfg.on_nonfinite == "skip"
        self.max_skipped = cfg.max_skipped_steps
        self.strategy, self.device, self.last_checkpoint = placement.strategy, placement.device, last_checkpoint
        self.state = state  # state.skipped_steps counts the run's skips (checkpointed with it)
        self.watch: NonFiniteWatch | None = None
        # The student's running statistics, rolled back when a step is skipped (collected once: the
        # layers never change during a run, and their tensors are updated in place).
        layers = (m for m in student.modules() if isinstance(m, nn.modules.batchnorm._NormBase))
        self._norm_buffers = [b for layer in layers for b in layer.buffers()]
        self._saved: list[Tensor] | None = None

    def begin_epoch(self, epoch: int, step_before_first_batch: int, batches: int) -> None:
        self.watch = NonFiniteWatch(self.device, epoch, step_before_first_batch, batches)

    def before_forward(self) -> None:
        """With the skip policy, keep the running statistics the forward is about to change."""
        if self.skip:
            self._saved = [b.detach().clone() for b in self._norm_buffers]

    def step_stands(self, losses: dict[str, Tensor], number: int) -> bool:
        """Whether this step is applied. Only the skip policy syncs here (deciding before the update is its
        price); it stops the run after max_skipped_steps skips. A distributed run skips on every rank when
        any rank's loss is not finite."""
        if not self.skip:
            return True
        finite = torch.stack([v.detach().float() for v in losses.values()]).isfinite().all()
        if not self.strategy.agree(~finite, self.device):
            return True
        if self.state.skipped_steps < self.max_skipped:
            self.state.skipped_steps += 1
            with torch.no_grad():  # the skipped forward must not leave its BatchNorm statistics behind
                for buffer, value in zip(self._norm_buffers, self._saved, strict=True):
                    buffer.copy_(value)
            return False
        self.watch.record(losses, number)
        self.check(f"after {self.state.skipped_steps} skipped steps (train.max_skipped_steps)")
        return False  # unreachable: the watch holds this step

    def record(self, losses: dict[str, Tensor], number: int) -> None:
        """Note the step's loss terms on the device (no sync)."""
        self.watch.record(losses, number)

    def check(self, reason: str = "(train.on_nonfinite=stop)") -> None:
        """Raise, naming the first non-finite loss term and its step, if the watch saw one (syncs)."""
        first = self.watch.first()
        if not self.strategy.agree(first is not None, self.device):
            return
        first = first or "on another process of this distributed run"
        kept = (f"the last good checkpoint is '{self.last_checkpoint}'" if self.last_checkpoint.is_file()
                else "no checkpoint was written yet")
        raise AikdError(f"Training diverged {first} {reason}. Lower train.lr or the method's weights, or set "
                        f"train.on_nonfinite=skip to skip such steps; {kept}.")


class StopSignals:
    """SIGTERM and SIGINT, caught for the duration of a ``with`` block (main thread only), ask the run to stop.

    A second signal of the same kind while stopping falls back to the previous handler.
    """

    def __init__(self, strategy: Strategy, device: torch.device) -> None:
        self.strategy, self.device = strategy, device
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._request)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _request(self, signum: int, frame: Any) -> None:
        self.signal = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def requested(self, number: int | None = None) -> bool:
        """Whether a stop was asked here, or on any rank of a distributed run.

        The ranks must stop at the same step, so a distributed run agrees (a collective) at
        epoch ends (``number`` None) and every CHECK_EVERY batches, and ignores it in between.
        """
        if not self.strategy.distributed:
            return self.signal is not None
        if number is not None and number % CHECK_EVERY:
            return False
        stop = self.strategy.agree(self.signal is not None, self.device)
        if stop and self.signal is None:
            self.signal = signal.SIGTERM  # another rank was signalled
        return stop

    def interrupted(self, where: str, checkpoint: Path) -> RunInterrupted:
        name = signal.Signals(self.signal).name
        return RunInterrupted(
            f"Stopped by {name} {where}; the run is saved in '{checkpoint}'. Continue it by running {RESUME_TRAIN}.",
            self.signal)
