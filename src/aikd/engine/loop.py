"""The loop: one training epoch, read top to bottom.

For every batch: augment and mix it, let the method turn it into named loss
terms, ask the guard whether the step stands, let the method update its own
models (AI-KD's critic), step the student's optimizer on the sum of the terms,
and let the method see the result (buffers, EMA copies). Everything else is in
the small objects this module calls: the parts of the run (:mod:`.setup`), the
distribution strategy (:mod:`aikd.distributed`), the guards (:mod:`.guards`)
and the run state and checkpoints (:mod:`.state`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from aikd.engine.guards import CHECK_EVERY, NonFiniteGuard, StopSignals
from aikd.engine.output import Output
from aikd.engine.runtime import epoch_generator
from aikd.engine.setup import RunParts
from aikd.engine.state import LAST, RunCheckpoints, RunState
from aikd.errors import AikdError
from aikd.methods import Batch, StepOutput
from aikd.methods.base import hard_labels
from aikd.strategy import Strategy, norm_statistics


@dataclass
class Epoch:
    """What one epoch needs besides the parts: the run's state, guards and checkpoints, and its voice."""

    parts: RunParts
    state: RunState
    guard: NonFiniteGuard
    signals: StopSignals
    checkpoints: RunCheckpoints
    output: Output


def train_epoch(run: Epoch, epoch: int) -> dict[str, Any]:
    """One pass over the training data; returns the epoch's record (averaged loss terms, lr, time).

    After a mid-epoch checkpoint the epoch continues at the batch where it stopped,
    with the augmentation generator and running sums it had there.
    """
    p, state = run.parts, run.state
    start = time.perf_counter()
    p.train_model.train()
    generator = epoch_generator(p.seed, epoch, p.device, p.strategy.rank)
    sums, first, earlier = EpochSums.resume(state.position, epoch, p, generator)
    state.position = None
    p.train_loader.set_epoch(epoch, first)
    p.method.on_epoch_start(epoch, p.model)
    skipped_before = state.skipped_steps
    run.guard.begin_epoch(epoch, state.step - first, len(p.train_loader))
    bar = run.output.bar(len(p.train_loader), f"epoch {epoch + 1}/{p.epochs}")
    bar.update(first)
    for number, (images, labels, indices) in enumerate(p.train_loader, start=first + 1):
        batch = p.to_batch(images, labels, indices, epoch, state.step, generator)
        run.guard.before_forward()
        with p.autocast():
            out = p.method.training_step(p.train_model, batch)
        if run.guard.step_stands(out.losses, number):
            with p.autocast():
                p.method.update_auxiliary(batch, out)
            loss = sum(out.losses.values())
            run.guard.record(out.losses, number)  # on the device: no sync in the hot path
            optimize(p, loss)
            p.method.on_step_end(p.model, batch, out)
            sums.add(out, loss, batch)
        else:  # skipped: no update, no buffer write; the schedule moves on as if the step ran
            skip_step(p)
        state.step += 1
        bar.update(1)
        if number % CHECK_EVERY == 0:  # a sync point anyway, for the progress bar
            run.guard.check()
            if not bar.disable and sums.seen:
                bar.set_postfix(loss=f"{float(sums.values['train.loss']) / sums.seen:.4f}")
        if number < len(p.train_loader) and run.signals.requested(number):
            bar.close()
            run.guard.check()  # never checkpoint a diverged model
            stop_mid_epoch(run, epoch, number, generator, sums, earlier + time.perf_counter() - start)
    bar.close()
    run.guard.check()
    p.strategy.average_norm_statistics([p.model, p.method])
    p.method.on_epoch_end(epoch, p.model)
    return end_epoch(run, epoch, sums, earlier + time.perf_counter() - start, state.skipped_steps - skipped_before)


def optimize(p: RunParts, loss: Tensor) -> None:
    """Backward and one optimizer and schedule step on the student (and a method's own trained head)."""
    p.optimizer.zero_grad(set_to_none=True)
    p.scaler.scale(loss).backward()
    p.strategy.average_gradients(p.method.student_parameters())  # DDP averages the student's own
    p.scaler.step(p.optimizer)
    p.scaler.update()
    p.scheduler.step()


def skip_step(p: RunParts) -> None:
    p.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # "scheduler stepped before optimizer": intended here
        warnings.simplefilter("ignore", UserWarning)
        p.scheduler.step()


class EpochSums:
    """The epoch's loss terms, statistics and accuracy, summed on the device and weighted by samples."""

    def __init__(self, device: torch.device) -> None:
        self.values: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), device=device))
        self.seen = 0

    @classmethod
    def resume(cls, position: dict[str, Any] | None, epoch: int, p: RunParts, generator: torch.Generator
               ) -> tuple[EpochSums, int, float]:
        """(sums, first batch, time already spent): empty for a new epoch, the interrupted run's after a
        mid-epoch checkpoint, with this rank's augmentation generator restored."""
        sums = cls(p.device)
        if position is None or position["epoch"] != epoch:
            return sums, 0, 0.0
        restore_generator(position, generator, p.strategy)
        restore_norm_statistics(position, p)
        rank_sums = position.get("rank_sums")
        if rank_sums is not None and len(rank_sums) == p.strategy.world_size:  # each rank's own
            own = rank_sums[p.strategy.rank]
        else:  # older checkpoints, or another world size: the sums over the ranks, on rank 0
            own = {"values": position["sums"], "seen": position["seen"]} if p.strategy.is_main else None
        if own is not None:
            sums.values.update({k: v.to(p.device) for k, v in own["values"].items()})
            sums.seen = own["seen"]
        return sums, position["batch"], position["elapsed"]

    def add(self, out: StepOutput, loss: Tensor, batch: Batch) -> None:
        n = len(out.logits)  # CS-KD's partners are not counted: its logits cover the anchors only
        self.seen += n
        values = self.values
        with torch.no_grad():
            values["train.loss"] += loss.detach().float() * n
            for key, value in out.losses.items():
                values[f"loss.{key}"] += value.detach().float() * n
            for key, value in out.stats.items():
                values[f"stat.{key}"] += value.detach().float() * n
            values["train.acc"] += (out.logits.argmax(1) == hard_labels(batch.targets)[:n]).sum() * 100.0

    def over_ranks(self, p: RunParts) -> None:
        """Turn this rank's sums into the run's (in place).

        A method may add a term or statistic on some ranks only (BSS and AMKD where their attack ran), so the
        ranks first agree on the names (one small gather at an epoch's end or a stop, never in a step); a name
        this rank never saw sums to zero here, and every rank reduces the same entries in the same order.
        """
        keys = sorted(set().union(*p.strategy.gather_objects(sorted(self.values))))
        total = torch.stack([self.values[k] for k in keys] + [torch.tensor(float(self.seen), device=p.device)])
        p.strategy.sum_(total)
        for key, value in zip(keys, total[:-1], strict=True):
            self.values[key] = value
        self.seen = int(total[-1])


def restore_generator(position: dict[str, Any], generator: torch.Generator, strategy: Strategy) -> None:
    """Give this rank's augmentation generator the state it had at a mid-epoch stop.

    A checkpoint of another world size, or of another device type (a CPU generator's state does not fit a
    CUDA one, and cannot be converted), warns and keeps the fresh generator: the rest of the epoch draws
    other augmentations than the interrupted run would have.
    """
    states = position["generators"]  # one per rank
    saved_device = position.get("generator_device", generator.device.type)  # older checkpoints: not recorded
    problem = None
    if len(states) != strategy.world_size:
        problem = f"the checkpoint was written by {len(states)} processes and this run has {strategy.world_size}"
    elif saved_device != generator.device.type:
        problem = (f"the checkpoint's augmentation generator ran on {saved_device} and this run's runs on "
                   f"{generator.device.type}")
    else:
        try:
            generator.set_state(states[strategy.rank])
        except RuntimeError as err:  # a state of another size: an older checkpoint of another device type
            problem = f"the checkpoint's augmentation generator state does not fit this run's ({err})"
    if problem and strategy.is_main:
        warnings.warn(f"Resuming mid-epoch: {problem}; the rest of this epoch draws other augmentations than "
                      f"the interrupted run would have.", stacklevel=3)


def restore_norm_statistics(position: dict[str, Any], p: RunParts) -> None:
    """Give this rank the BatchNorm running statistics it had at a mid-epoch stop.

    Between two epoch ends each rank's statistics follow its own slice of the batches; the checkpoint's
    weights hold rank 0's, so without this the other ranks would resume with rank 0's and the run's
    evaluations would drift from the uninterrupted run's until the difference fades. Another world size (or a
    checkpoint written before they were saved) keeps rank 0's.
    """
    saved = position.get("norms")
    if saved is None or len(saved) != p.strategy.world_size:
        return
    with torch.no_grad():
        for stat, value in zip(norm_statistics([p.model, p.method]), saved[p.strategy.rank], strict=True):
            stat.copy_(value)


def stop_mid_epoch(run: Epoch, epoch: int, number: int, generator: torch.Generator, sums: EpochSums,
                   elapsed: float) -> None:
    """Save a checkpoint after batch ``number`` of ``epoch`` and raise RunInterrupted."""
    p = run.parts
    generators = p.strategy.gather_objects(generator.get_state().cpu())
    # Each rank's own sums and BatchNorm statistics, so that every rank resumes with its own and the run
    # goes on exactly (sums reduced here and again at the epoch's end would add in another order).
    rank_sums = p.strategy.gather_objects({"values": {k: v.detach().cpu() for k, v in sums.values.items()},
                                           "seen": sums.seen})
    norms = p.strategy.gather_objects([t.detach().cpu() for t in norm_statistics([p.model, p.method])])
    sums.over_ranks(p)
    position = {"epoch": epoch, "batch": number, "generators": generators, "generator_device": generator.device.type,
                "rank_sums": rank_sums, "norms": norms,
                "sums": {k: v.detach().cpu() for k, v in sums.values.items()}, "seen": sums.seen,
                "elapsed": elapsed}
    run.checkpoints.save(LAST, position=position)
    raise run.signals.interrupted(f"in epoch {epoch + 1} after batch {number} of {len(p.train_loader)}",
                                  run.checkpoints.last)


def end_epoch(run: Epoch, epoch: int, sums: EpochSums, elapsed: float, skipped: int) -> dict[str, Any]:
    """The epoch's record, averaged over the samples of every rank; a non-finite average stops the run."""
    p, state = run.parts, run.state
    sums.over_ranks(p)
    state.train_times.append(elapsed)
    on_host = dict(zip(sums.values, torch.stack(list(sums.values.values())).tolist(), strict=True))  # one copy
    state.train_acc = on_host["train.acc"] / max(sums.seen, 1)
    record = {"epoch": epoch + 1, "epochs": p.epochs, "lr": p.optimizer.param_groups[0]["lr"],
              "time_s": elapsed, "skipped_steps": skipped}
    record.update({k: v / max(sums.seen, 1) for k, v in on_host.items()})
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        last = run.checkpoints.last
        where = f"the last good checkpoint is '{last}'" if last.is_file() else "no checkpoint was written yet"
        raise AikdError(f"Training diverged in epoch {epoch + 1}: {', '.join(bad)} became non-finite. "
                        f"Lower train.lr or check the method's weights; {where}.")
    return record
