"""The single training loop every method runs in.

A run: read the data, build the model (and the frozen teacher if the method
needs one), then for every epoch draw batches, let the method turn each batch
into named loss terms, step the optimizer on their sum, evaluate, log and
checkpoint. Methods plug in through :class:`aikd.methods.base.Method` only.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from aikd import distributed
from aikd.config import RunConfig, normalized, save_config
from aikd.data import DataBundle, load_data
from aikd.data.loaders import BlockBatchSampler, EpochBatchSampler, ShardedBatchSampler
from aikd.data.mixing import BatchMixer
from aikd.engine.checkpoint import (
    atomic_write_bytes,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from aikd.engine.logger import RunLogger, progress_bar
from aikd.engine.model_io import load_frozen_model, model_meta
from aikd.engine.optim import build_optimizer, build_scheduler
from aikd.engine.runtime import (
    CompiledOrEager,
    autocast_dtype,
    epoch_generator,
    pick_device,
    seed_everything,
    use_channels_last,
)
from aikd.errors import AikdError, CheckpointError, ConfigError, RunInterrupted
from aikd.methods import METHODS, Batch, MethodContext
from aikd.methods.base import hard_labels
from aikd.metrics import classification_metrics, predict
from aikd.metrics.calibration import ReliabilityBins, calibrate
from aikd.models import build_model, resolve_stem
from aikd.report.plots import reliability_diagram

LAST, BEST = "last.safetensors", "best.safetensors"


class Trainer:
    """Trains one model with one method; :meth:`fit` returns the run's summary."""

    def __init__(self, cfg: RunConfig, out_dir: str | Path, *, quiet: bool = False,
                 data: DataBundle | None = None, recipe: str | None = None) -> None:
        self.cfg = cfg
        self.out = Path(out_dir)
        self.recipe = recipe or cfg.method  # the row label in reports (the config's name)
        self.dist = distributed.setup(cfg.device)  # rank 0 of 1 unless started by torchrun
        self.quiet = quiet or not self.dist.is_main  # one voice (progress bars, epoch lines) per run
        seed_everything(cfg.seed, cfg.deterministic)
        self.device = distributed.device_for(self.dist, pick_device(cfg.device))
        self.amp_dtype = autocast_dtype(cfg.train, self.device)
        self.channels_last = use_channels_last(cfg.train, self.device)
        self.data = data if data is not None else load_data(cfg.data)
        d = self.data
        self.model = build_model(cfg.model.name, d.num_classes, d.in_channels, d.image_size,
                                 cfg.model.stem).to(self.device)
        self.stem = resolve_stem(cfg.model.stem, d.image_size)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._check_distributed_config()
        if self.dist.enabled and cfg.train.sync_bn:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        method_cls = METHODS.get(cfg.method)
        teacher = None
        if method_cls.needs_teacher(cfg.method_config()):
            teacher = self._load_teacher(cfg.model.name if method_cls.teacher_same_architecture else None)
        ctx = MethodContext(num_classes=d.num_classes, num_train=len(d.train), epochs=cfg.train.epochs,
                            device=self.device, train_labels=d.train.labels, teacher=teacher,
                            steps_per_epoch=len(EpochBatchSampler(len(d.train), cfg.data.batch_size)))
        self.method = method_cls(cfg.method_config(), ctx).to(self.device)
        self.mixer = BatchMixer(cfg.data, d.num_classes, paired=self.method.paired_batches)
        pin = self.device.type == "cuda"
        self.train_loader = d.loader(True, self._train_sampler(), seed=cfg.seed, pin_memory=pin)
        self.test_loader = self._eval_loader(d.test)
        # DDP runs the student's gradient sync unless the method calls the student twice per step (BSS, AMKD).
        self.ddp_wraps_student = self.dist.enabled and not self.method.multiple_student_forwards
        self.train_model = self._data_parallel(self.model)
        if cfg.train.compile:
            self.train_model = CompiledOrEager(self.train_model)
        self.optimizer = build_optimizer(self.model, cfg.train, self.method.student_parameters(),
                                         self.method.student_parameters_lr_scale())
        self.scheduler = build_scheduler(self.optimizer, cfg.train, len(self.train_loader))
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.amp_dtype == torch.float16)
        self.epoch = 0  # epochs completed
        self.step = 0
        self.best: dict[str, Any] = {"top1_err": math.inf, "epoch": 0}
        self.train_times: list[float] = []
        self.train_acc: float | None = None  # the last epoch's training accuracy (%), on its augmented views
        self.last_eval: tuple[int, dict[str, float]] = (-1, {})
        self.test_predictions: tuple[int, Tensor, Tensor] | None = None  # (epoch, logits, labels)
        self.position: dict[str, Any] | None = None  # where a mid-epoch checkpoint stopped
        self.stop_signal: int | None = None  # set by SIGTERM / SIGINT: stop at the next step boundary
        self.skipped_steps = 0  # steps skipped for a non-finite loss (train.on_nonfinite=skip)
        self.last_epoch_end: int | None = None  # epoch of last.safetensors when it was saved at an epoch's end
        self._norm_buffers: list[Tensor] | None = None

    # ------------------------------------------------------------------ set-up helpers

    def _check_distributed_config(self) -> None:
        if not self.dist.enabled:
            return
        world, batch = self.dist.world_size, self.cfg.data.batch_size
        if batch % world:
            raise ConfigError(f"data.batch_size={batch} is the global batch of a distributed run and must split "
                              f"evenly over its {world} processes: use a multiple of {world}.")
        if self.cfg.train.sync_bn and self.device.type != "cuda":
            raise ConfigError("train.sync_bn=true needs CUDA GPUs (SyncBatchNorm has no CPU kernels); "
                              "on CPU leave it off: running statistics are averaged over the ranks each epoch.")

    def _train_sampler(self):
        """The method's epoch batch sampler (or shuffled batches), sliced per rank in a distributed run."""
        d, cfg = self.data, self.cfg
        sampler = self.method.batch_sampler(cfg.data.batch_size, cfg.seed)
        if not self.dist.enabled:
            return sampler
        sampler = sampler or EpochBatchSampler(len(d.train), cfg.data.batch_size, cfg.seed)
        return ShardedBatchSampler(sampler, self.dist.rank, self.dist.world_size, self.method.paired_batches)

    def _eval_loader(self, split):
        """Sequential batches over ``split``; in a distributed run over this rank's block of it."""
        sampler = None
        if self.dist.enabled:
            sampler = BlockBatchSampler(len(split), self.cfg.data.eval_batch_size, self.dist.rank,
                                        self.dist.world_size)
        return self.data.loader(False, sampler, pin_memory=self.device.type == "cuda", split=split)

    def _data_parallel(self, model: nn.Module) -> nn.Module:
        """The student as the training step sees it: wrapped in DistributedDataParallel when distributed.

        The running statistics are not broadcast every step (they are averaged at each epoch's end).
        A method with several student forwards per step (BSS, AMKD) trains the bare model and the
        loop averages its gradients after the backward pass, since DDP expects one forward per backward.
        """
        if not self.ddp_wraps_student:
            distributed.broadcast_parameters(model)
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False,
                                       gradient_as_bucket_view=True)

    def _load_teacher(self, same_architecture_as: str | None) -> nn.Module:
        path = self.cfg.teacher.checkpoint
        if path is None:
            raise ConfigError(
                f"Method '{self.cfg.method}' distils from a pre-trained model: set "
                f"teacher.checkpoint=PATH, or run 'aikd pipeline' to train one first."
            )
        teacher = load_frozen_model(path, self.device, num_classes=self.data.num_classes,
                                    in_channels=self.data.in_channels, expect_model=same_architecture_as,
                                    image_size=self.data.image_size, classes=list(self.data.train.classes))
        return teacher.to(memory_format=torch.channels_last)  # see Method.teacher_logits

    def meta(self) -> dict[str, Any]:
        d = self.data
        return {
            **model_meta(self.cfg.model.name, self.stem, d.num_classes, d.in_channels,
                         d.image_size, d.train.classes),
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "step": self.step,
        }

    # ------------------------------------------------------------------ checkpoints

    def save(self, name: str, full: bool = True, position: dict[str, Any] | None = None) -> Path:
        """Write a checkpoint; ``position`` marks a mid-epoch one (where in the epoch it stopped)."""
        state = None
        if full:
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "method": self.method.state_dict(),
                "method_extra": self.method.extra_state(),
                "rng": rng_state(),
                "best": self.best,
                "train_times": self.train_times,
                "train_acc": self.train_acc,
                "skipped_steps": self.skipped_steps,
            }
            if position is not None:
                state["position"] = position
        if not self.dist.is_main:
            return self.out / "checkpoints" / name  # rank 0 writes; the others hold the same state
        if name == LAST:
            self._keep_previous_last()
        path = save_checkpoint(self.out / "checkpoints" / name, self.model.state_dict(), self.meta(), state)
        if name == LAST:
            self.last_epoch_end = None if position is not None else self.epoch
        return path

    def _keep_previous_last(self) -> None:
        """With train.keep_last > 1, keep the checkpoint about to be replaced as epoch-NNNN.safetensors.

        A hard link (a copy where links are not supported) made before the atomic
        replace, so at every moment last.safetensors is whole.
        """
        keep, folder = self.cfg.train.keep_last, self.out / "checkpoints"
        last = folder / LAST
        if keep <= 1 or not last.is_file() or not self.last_epoch_end:
            return  # nothing to keep, or a mid-epoch checkpoint (it only matters until the epoch ends)
        kept = folder / f"epoch-{self.last_epoch_end:04d}.safetensors"
        if not kept.exists():
            try:
                os.link(last, kept)
            except OSError:
                shutil.copyfile(last, kept)
        for old in sorted(folder.glob("epoch-*.safetensors"))[: -(keep - 1)]:
            old.unlink(missing_ok=True)

    def resume(self, path: str | Path | None = None) -> None:
        """Continue from a full checkpoint (by default OUTDIR/checkpoints/last.safetensors)."""
        path = Path(path) if path else self.out / "checkpoints" / LAST
        if not path.is_file():
            raise CheckpointError(f"Cannot resume: '{path}' does not exist. Start without --resume.")
        ckpt = load_checkpoint(path)
        if not ckpt.state:
            raise CheckpointError(f"'{path}' holds only weights; resume needs a full checkpoint "
                                  f"such as checkpoints/{LAST}.")
        saved = ckpt.meta.get("config", {})
        differ = _config_diff(normalized(saved) or saved, self.cfg.to_dict())
        if differ:
            raise ConfigError(
                f"Cannot resume from '{path}': the config differs from the checkpoint's in "
                f"{', '.join(differ)}. Resume with the original config, or start a new output folder."
            )
        try:
            self.model.load_state_dict(ckpt.model)
            self.optimizer.load_state_dict(ckpt.state["optimizer"])
            self.scheduler.load_state_dict(ckpt.state["scheduler"])
            self.scaler.load_state_dict(ckpt.state["scaler"])
            self.method.load_state_dict(ckpt.state["method"])
            self.method.load_extra_state(ckpt.state["method_extra"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"Checkpoint '{path}' does not fit this run: {err}") from None
        set_rng_state(ckpt.state["rng"])
        self.best = ckpt.state["best"]
        self.train_times = list(ckpt.state["train_times"])
        self.train_acc = ckpt.state.get("train_acc")
        self.skipped_steps = int(ckpt.state.get("skipped_steps", 0))
        self.position = ckpt.state.get("position")
        self.epoch, self.step = int(ckpt.meta["epoch"]), int(ckpt.meta["step"])
        self.last_epoch_end = self.epoch if self.position is None and path.name == LAST else None

    # ------------------------------------------------------------------ the loop

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
        source = find_resume_checkpoint(self.out, resume) if resume else None
        # Rank 0 checks and prepares the folder; a refusal there stops every rank with its message.
        distributed.on_main_then_share(lambda: self._prepare_out_dir(source is not None, overwrite))
        if source is not None:
            self.resume(source)
        if self.dist.is_main:
            save_config(self.cfg, self.out / "config.yaml")
        logger = RunLogger(self.out, self.quiet) if self.dist.is_main else RunLogger.silent()
        logger.info(self._banner())
        if source is not None:
            logger.info(f"aikd: resuming from '{source}' (epoch {self.epoch}"
                        f"{', batch ' + str(self.position['batch']) if self.position else ''})")
        previous_handlers = _catch_stop_signals(self)
        try:
            epochs = self.cfg.train.epochs
            while self.epoch < min(epochs, stop_after or epochs):
                record = self.train_epoch(self.epoch)
                self.epoch += 1
                if self.epoch % self.cfg.train.eval_every == 0 or self.epoch == epochs:
                    self.last_eval = (self.epoch, self.evaluate())
                    record.update({f"test.{k}": v for k, v in self.last_eval[1].items()})
                    if record["test.top1_err"] < self.best["top1_err"]:
                        self.best = {"top1_err": record["test.top1_err"], "epoch": self.epoch}
                        self.save(BEST, full=False)
                self.save(LAST)
                logger.log_epoch(record)
                if self._stop_requested():
                    raise self._interrupted(f"at the end of epoch {self.epoch}")
        finally:
            _restore_signals(previous_handlers)
            logger.close()
        if self.epoch < epochs:
            return None
        summary = self.summary()
        if self.dist.is_main:
            atomic_write_bytes(self.out / "summary.json", json.dumps(summary, indent=2).encode())
        distributed.barrier()  # every file of the run is written before any rank moves on (pipeline phase 2)
        return summary

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the training data; returns the epoch's averaged loss terms.

        After a mid-epoch checkpoint the epoch continues at the batch where it
        stopped, with the augmentation generator and running sums it had there.
        """
        start = time.perf_counter()
        model, method = self.train_model, self.method
        model.train()
        generator = epoch_generator(self.cfg.seed, epoch, self.device, self.dist.rank)
        sums: dict[str, Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        first_batch, seen, earlier = 0, 0, 0.0
        if self.position is not None and self.position["epoch"] == epoch:
            first_batch, earlier = self.position["batch"], self.position["elapsed"]
            self._restore_position(generator, sums)
            seen = self.position["seen"] if self.dist.is_main else 0  # saved summed over the ranks
        self.position = None
        self.train_loader.set_epoch(epoch, first_batch)
        method.on_epoch_start(epoch, self.model)  # the bare student: AI-KD copies it for its snapshot
        skipped_before = self.skipped_steps
        skip_policy = self.cfg.train.on_nonfinite == "skip"
        watch = NonFiniteWatch(self.device, epoch, self.step - first_batch, len(self.train_loader))
        bar = progress_bar(len(self.train_loader), f"epoch {epoch + 1}/{self.cfg.train.epochs}", self.quiet)
        bar.update(first_batch)
        for number, (images, labels, indices) in enumerate(self.train_loader, start=first_batch + 1):
            batch = self._to_batch(images, labels, indices, epoch, generator)
            # A skipped step must not leave its forward's BatchNorm statistics behind either.
            saved_buffers = self._copy_norm_statistics() if skip_policy else None
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                out = method.training_step(model, batch)
            loss = sum(out.losses.values())
            if not (skip_policy and self._skip_nonfinite(out.losses, watch, number)):
                watch.record(out.losses, number)  # on the device: no sync in the hot path
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self._average_gradients_outside_ddp()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                self.step += 1
                method.on_step_end(batch, out)
                n = len(out.logits)  # CS-KD's partners are not counted: its logits cover the anchors only
                seen += n
                self._accumulate(sums, out, loss, batch, n)
            else:  # skipped: no update, no buffer write; the schedule moves on as if the step ran
                self._restore_norm_statistics(saved_buffers)
                self.optimizer.zero_grad(set_to_none=True)
                with warnings.catch_warnings():  # "scheduler stepped before optimizer": intended here
                    warnings.simplefilter("ignore", UserWarning)
                    self.scheduler.step()
                self.step += 1
            bar.update(1)
            if number % CHECK_EVERY == 0:  # a sync point anyway, for the progress bar
                self._stop_if_diverged(watch)
                if not bar.disable and seen:
                    bar.set_postfix(loss=f"{float(sums['train.loss']) / seen:.4f}")
            at_agreement_point = not self.dist.enabled or number % CHECK_EVERY == 0
            if at_agreement_point and self._stop_requested() and number < len(self.train_loader):
                bar.close()
                self._stop_if_diverged(watch)  # never checkpoint a diverged model
                self._stop_mid_epoch(epoch, number, generator, sums, seen, earlier + time.perf_counter() - start)
        bar.close()
        self._stop_if_diverged(watch)
        distributed.average_norm_statistics([self.model, method])
        method.on_epoch_end(epoch, self.model)
        seen = self._sum_over_ranks(sums, seen)
        lr = self.optimizer.param_groups[0]["lr"]
        elapsed = earlier + time.perf_counter() - start
        self.train_times.append(elapsed)
        self.train_acc = float(sums["train.acc"]) / max(seen, 1)
        record = {"epoch": epoch + 1, "epochs": self.cfg.train.epochs, "lr": lr, "time_s": elapsed,
                  "skipped_steps": self.skipped_steps - skipped_before}
        record.update({k: float(v) / max(seen, 1) for k, v in sums.items()})
        bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            last = self.out / "checkpoints" / LAST
            where = f"the last good checkpoint is '{last}'" if last.is_file() else "no checkpoint was written yet"
            raise AikdError(
                f"Training diverged in epoch {epoch + 1}: {', '.join(bad)} became non-finite. "
                f"Lower train.lr or check the method's weights; {where}."
            )
        return record

    def _average_gradients_outside_ddp(self) -> None:
        """Average the gradients DistributedDataParallel does not: the student's when the method runs it
        bare (several forwards per step), and the method's own trained modules (AEKT's head)."""
        if not self.dist.enabled:
            return
        if not self.ddp_wraps_student:
            distributed.average_gradients(self.model.parameters())
        distributed.average_gradients(self.method.student_parameters())

    def _stop_requested(self) -> bool:
        """Whether a stop signal (SIGTERM, SIGINT) reached this process, or any rank of a distributed run.

        The ranks must stop at the same step, so in a distributed run this is a collective, and
        the loop asks it every CHECK_EVERY batches: a signal takes effect within CHECK_EVERY steps.
        """
        if not self.dist.enabled:
            return self.stop_signal is not None
        stop = distributed.any_rank(self.stop_signal is not None, self.device)
        if stop and self.stop_signal is None:
            self.stop_signal = signal.SIGTERM  # another rank was signalled
        return stop

    def _sum_over_ranks(self, sums: dict[str, Tensor], seen: int) -> int:
        """Turn this rank's epoch sums into the run's (in place); returns the samples seen by all ranks."""
        if not self.dist.enabled:
            return seen
        keys = sorted(sums)
        total = torch.stack([sums[k] for k in keys] + [torch.tensor(float(seen), device=self.device)])
        distributed.all_reduce_sum_(total)
        for key, value in zip(keys, total[:-1], strict=True):
            sums[key] = value
        return int(total[-1])

    def _restore_position(self, generator: torch.Generator, sums: dict[str, Tensor]) -> None:
        """This rank's augmentation generator and (on rank 0) the run's running sums at a mid-epoch checkpoint."""
        states = self.position.get("generators") or [self.position["generator"]]  # one rank's: older checkpoints
        if len(states) == self.dist.world_size:
            generator.set_state(states[self.dist.rank])
        elif self.dist.is_main:
            warnings.warn(f"The checkpoint was written by {len(states)} processes and this run has "
                          f"{self.dist.world_size}: the rest of this epoch draws other augmentations than "
                          f"the interrupted run would have.", stacklevel=2)
        if self.dist.is_main:
            sums.update({k: v.to(self.device) for k, v in self.position["sums"].items()})

    def _norm_statistics(self) -> list[Tensor]:
        """Running statistics of every normalization layer of the student and the method (the critic).

        Collected once: the modules do not change during a run, and the tensors are updated in place.
        """
        if self._norm_buffers is None:
            layers = (m for root in (self.model, self.method) for m in root.modules()
                      if isinstance(m, nn.modules.batchnorm._NormBase))
            self._norm_buffers = [b for layer in layers for b in layer.buffers()]
        return self._norm_buffers

    def _copy_norm_statistics(self) -> list[Tensor]:
        return [b.detach().clone() for b in self._norm_statistics()]

    def _restore_norm_statistics(self, saved: list[Tensor]) -> None:
        with torch.no_grad():
            for buffer, value in zip(self._norm_statistics(), saved, strict=True):
                buffer.copy_(value)

    @staticmethod
    def _accumulate(sums: dict[str, Tensor], out, loss: Tensor, batch: Batch, n: int) -> None:
        """Add one step's loss terms, statistics and accuracy (weighted by its samples) to the epoch sums."""
        with torch.no_grad():
            sums["train.loss"] += loss.detach().float() * n
            for key, value in out.losses.items():
                sums[f"loss.{key}"] += value.detach().float() * n
            for key, value in out.stats.items():
                sums[f"stat.{key}"] += value.detach().float() * n
            sums["train.acc"] += (out.logits.argmax(1) == hard_labels(batch.targets)[:n]).sum() * 100.0

    def _skip_nonfinite(self, losses: dict[str, Tensor], watch: NonFiniteWatch, number: int) -> bool:
        """train.on_nonfinite=skip: whether to skip this step (a device sync per step, the price of
        deciding before the update); stops after train.max_skipped_steps skipped steps. In a distributed
        run a step is skipped on every rank when any rank's loss is not finite."""
        finite = torch.stack([v.detach().float() for v in losses.values()]).isfinite().all()
        if not distributed.any_rank(~finite, self.device):
            return False
        if self.skipped_steps < self.cfg.train.max_skipped_steps:
            self.skipped_steps += 1
            return True
        watch.record(losses, number)
        self._stop_if_diverged(watch, f"after {self.skipped_steps} skipped steps (train.max_skipped_steps)")
        return False  # unreachable: the watch holds this step

    def _stop_if_diverged(self, watch: NonFiniteWatch, reason: str = "(train.on_nonfinite=stop)") -> None:
        """Raise, naming the first non-finite loss term and its step, if the watch saw one (syncs)."""
        first = watch.first()
        if not distributed.any_rank(first is not None, self.device):
            return
        first = first or "on another process of this distributed run"
        last = self.out / "checkpoints" / LAST
        kept = f"the last good checkpoint is '{last}'" if last.is_file() else "no checkpoint was written yet"
        raise AikdError(f"Training diverged {first} {reason}. Lower train.lr or the method's weights, or set "
                        f"train.on_nonfinite=skip to skip such steps; {kept}.")

    def _stop_mid_epoch(self, epoch: int, number: int, generator: torch.Generator, sums: dict[str, Tensor],
                        seen: int, elapsed: float) -> None:
        """Save a checkpoint after batch ``number`` of ``epoch`` and raise RunInterrupted."""
        generators = distributed.all_gather_objects(generator.get_state().cpu())
        seen = self._sum_over_ranks(sums, seen)
        position = {"epoch": epoch, "batch": number, "generators": generators,
                    "sums": {k: v.detach().cpu() for k, v in sums.items()}, "seen": seen, "elapsed": elapsed}
        self.save(LAST, position=position)
        raise self._interrupted(f"in epoch {epoch + 1} after batch {number} of {len(self.train_loader)}")

    def _interrupted(self, where: str) -> RunInterrupted:
        name = signal.Signals(self.stop_signal).name
        return RunInterrupted(
            f"Stopped by {name} {where}; the run is saved in '{self.out / 'checkpoints' / LAST}'. Continue it "
            f"with the same command plus --resume (or --resume auto).", self.stop_signal)

    def _to_batch(self, images: Tensor, labels: Tensor, indices: Tensor, epoch: int,
                  generator: torch.Generator) -> Batch:
        images = images.to(self.device, non_blocking=True)
        images = self.data.to_device(images, train=True, generator=generator)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(self.device, non_blocking=True)
        if self.mixer.active:
            images, labels = self.mixer(images, labels, generator)
        return Batch(images, labels, indices.to(self.device, non_blocking=True), epoch, self.step)

    def evaluate(self) -> dict[str, float]:
        """Metrics of the current model on the whole test split."""
        logits, labels = self._predict(self.test_loader, "eval")
        self.test_predictions = (self.epoch, logits, labels)
        return classification_metrics(logits, labels)

    def _predict(self, loader, description: str) -> tuple[Tensor, Tensor]:
        """(logits, labels) of a whole split; in a distributed run each rank predicts its block and
        the blocks are gathered in rank order, so every sample counts exactly once."""
        bar = progress_bar(len(loader), description, self.quiet)
        logits, labels = predict(self.model, loader, self._prepare_eval, self.device, self.amp_dtype, bar)
        bar.close()
        if self.dist.enabled:  # gathered on the device: NCCL moves GPU tensors only
            logits = distributed.all_gather_rows(logits.to(self.device)).cpu()
            labels = distributed.all_gather_rows(labels.to(self.device)).cpu()
        return logits, labels

    def calibrate(self) -> dict[str, float]:
        """Temperature scaling fitted on the held-out training images; {} when there are none.

        Writes ``reliability.json`` (test-set bins before and after scaling) and
        ``reliability.png`` into the run folder.
        """
        if self.data.holdout is None:
            return {}
        if self.test_predictions is None or self.test_predictions[0] != self.epoch:
            self.evaluate()
        _, test_logits, test_labels = self.test_predictions
        held_logits, held_labels = self._predict(self._eval_loader(self.data.holdout), "holdout")
        metrics, bins = calibrate(held_logits, held_labels, test_logits, test_labels)
        if self.dist.is_main:
            write_reliability(self.out, bins, metrics["temperature"], f"{self.recipe} - {self.cfg.data.name}")
        return metrics

    def _prepare_eval(self, images: Tensor) -> Tensor:
        images = self.data.to_device(images, train=False, generator=None)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    # ------------------------------------------------------------------ bookkeeping

    def summary(self) -> dict[str, Any]:
        """The final model's test metrics plus what identifies the run."""
        final = self.last_eval[1] if self.last_eval[0] == self.epoch else self.evaluate()
        return {
            **final,
            **self.calibrate(),
            "recipe": self.recipe,
            "method": self.cfg.method,
            "model": self.cfg.model.name,
            "dataset": self.cfg.data.name,
            "seed": self.cfg.seed,
            "epochs": self.epoch,
            "best_top1_err": self.best["top1_err"],
            "best_epoch": self.best["epoch"],
            "num_train": len(self.data.train),
            "num_test": len(self.data.test),
            "eval_split": self.data.eval_split,
            "num_params": sum(p.numel() for p in self.model.parameters()),
            "train_acc": self.train_acc,
            "time_per_epoch_s": sum(self.train_times) / max(len(self.train_times), 1),
            "train_time_s": sum(self.train_times),
            "device": str(self.device),
            "world_size": self.dist.world_size,
            "teacher": self.cfg.teacher.checkpoint,
            "skipped_steps": self.skipped_steps,
            **self.method.run_facts(),
        }

    def _banner(self) -> str:
        d = self.data
        return (f"aikd: {self.cfg.method} | {self.cfg.model.name} on {d.name} "
                f"({len(d.train)} train / {len(d.test)} {d.eval_split}, {d.num_classes} classes) | "
                f"{self.cfg.train.epochs} epochs | device {self.device}"
                f"{f' x {self.dist.world_size} processes' if self.dist.enabled else ''} | out {self.out}")

    def _prepare_out_dir(self, resume: bool, overwrite: bool) -> None:
        existing = (self.out / "checkpoints" / LAST).exists() or (self.out / "summary.json").exists()
        if existing and not resume:
            if not overwrite:
                raise AikdError(
                    f"Output folder '{self.out}' already holds a run. Continue it with --resume, "
                    f"or choose another -o OUTDIR."
                )
            for name in ("checkpoints", "tensorboard"):
                shutil.rmtree(self.out / name, ignore_errors=True)
            for name in ("metrics.jsonl", "summary.json", "config.yaml", "reliability.json", "reliability.png"):
                (self.out / name).unlink(missing_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)


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
        self.values: dict[str, Tensor] = {}  # each term's value at the first bad batch (terms may vary: AMKD)
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


def _catch_stop_signals(trainer: Trainer) -> dict[int, Any]:
    """Make SIGTERM and SIGINT ask ``trainer`` to stop at the next step boundary (main thread only).

    A second signal of the same kind while stopping falls back to the previous handler.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}

    def request_stop(signum, frame):
        trainer.stop_signal = signum
        signal.signal(signum, previous.get(signum, signal.SIG_DFL))

    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, request_stop)
    return previous


def _restore_signals(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def find_resume_checkpoint(out: Path, which: bool | str | Path) -> Path | None:
    """The checkpoint to resume from: last.safetensors (True / "last"), the newest valid one ("auto"), or a path.

    "auto" skips damaged files (a kill during a write on a filesystem without
    atomic rename, a truncated copy) and returns None when the folder holds no
    checkpoint at all, so a preemptible job can always pass --resume auto.
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
            ckpt = load_checkpoint(path)
        except CheckpointError as err:
            broken.append(f"{path.name} ({err})")
            continue
        if ckpt.state:
            position = ckpt.state.get("position") or {}
            ranked.append(((int(ckpt.meta.get("step", 0)), position.get("batch", 0), path.name == LAST), path))
    if not ranked:
        raise CheckpointError(f"No usable checkpoint in '{folder}' to resume from: {'; '.join(broken)}.")
    return max(ranked)[1]


def _config_diff(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(saved) | set(current))
    out = []
    for key in keys:
        a, b = saved.get(key), current.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, path + ".")
        elif a != b:
            out.append(f"{path} ({a!r} -> {b!r})")
    return out


def write_reliability(out: Path, bins: dict[str, ReliabilityBins], temperature: float, title: str) -> None:
    """The run's reliability bins as JSON (reports pool them over seeds) and as a diagram."""
    payload = {"temperature": temperature, **{k: b.to_dict() for k, b in bins.items()}}
    atomic_write_bytes(out / "reliability.json", json.dumps(payload).encode())
    reliability_diagram({"before TS": bins["raw"], f"after TS (T={temperature:.2f})": bins["ts"]},
                        out / "reliability.png", title)


def train(cfg: RunConfig, out_dir: str | Path, *, resume: bool | str | Path = False, overwrite: bool = False,
          quiet: bool = False, recipe: str | None = None, stop_after: int | None = None) -> dict[str, Any] | None:
    """Library entry point: train one run and return its summary (None when ``stop_after`` ended it early).

    ``recipe`` names the run in reports (``aikd report``); by default the method.
    """
    return Trainer(cfg, out_dir, quiet=quiet, recipe=recipe).fit(resume=resume, overwrite=overwrite,
                                                                 stop_after=stop_after)
