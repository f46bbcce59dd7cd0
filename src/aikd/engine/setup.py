"""Setup: a validated run config -> the parts a run trains with.

Everything a run builds before its first step, in a fixed order (the order fixes
which random numbers each part draws, so it is part of the recipe): the
process group and strategy, seeds, device, data, student, frozen teacher,
method, batch mixing, loaders, the student as the step calls it (DDP,
compile), optimizer, schedule and gradient scaler. :class:`RunParts` holds
them, plus the conversion the loop needs (a raw batch to a
:class:`~aikd.methods.Batch`); evaluation is :mod:`.evaluator`'s.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from aikd import distributed
from aikd.config import RunConfig
from aikd.data import DataBundle, load_data
from aikd.data.loaders import EpochBatchSampler, rank_train_sampler
from aikd.data.mixing import BatchMixer
from aikd.engine.model_io import load_frozen_model, model_meta
from aikd.engine.optim import build_optimizer, build_scheduler
from aikd.engine.runtime import CompiledOrEager, autocast_dtype, pick_device, seed_everything, use_channels_last
from aikd.engine.state import Trained
from aikd.errors import ConfigError
from aikd.methods import METHODS, Batch, Method, MethodContext
from aikd.models import build_model, resolve_stem
from aikd.models.weights import load_weights
from aikd.strategy import Placement, Strategy


@dataclass
class RunParts:
    """The built parts of one run; the loop and the trainer read them, nothing rebuilds them."""

    seed: int  # the run's seed: each epoch's augmentation stream derives from it
    epochs: int
    placement: Placement  # the device, the strategy (SingleProcess or DataParallel) and the memory format
    amp_dtype: torch.dtype | None
    data: DataBundle
    model: nn.Module  # the bare student: what is saved, evaluated and handed to the method's hooks
    method: Method
    mixer: BatchMixer
    train_loader: Any
    train_model: nn.Module  # the student as the training step calls it (DDP, torch.compile)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    describe: dict[str, Any]  # the model's description saved with its weights (architecture, classes)

    strategy = property(lambda self: self.placement.strategy)
    device = property(lambda self: self.placement.device)
    channels_last = property(lambda self: self.placement.channels_last)

    def trained(self) -> Trained:
        """What a full checkpoint saves besides the run state."""
        return Trained(self.model, self.describe, self.optimizer, self.scheduler, self.scaler, self.method)

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def to_batch(self, images: Tensor, labels: Tensor, indices: Tensor, epoch: int, step: int,
                 generator: torch.Generator) -> Batch:
        """A loader batch on the device, augmented (in-memory data), in the model's memory format, mixed."""
        images = images.to(self.device, non_blocking=True)
        images = self.data.to_device(images, train=True, generator=generator)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(self.device, non_blocking=True)
        if self.mixer.active:
            images, labels = self.mixer(images, labels, generator, step, self.strategy.rank)
        return Batch(images, labels, indices.to(self.device, non_blocking=True), epoch, step)


def build_parts(cfg: RunConfig, data: DataBundle | None = None) -> RunParts:
    """Build every part of a run from its config (``data``: already loaded data to train on instead)."""
    info = distributed.setup(cfg.device)  # rank 0 of 1 unless started by torchrun
    strategy = distributed.strategy_for(info)
    seed_everything(cfg.seed, cfg.deterministic)
    device = distributed.device_for(info, pick_device(cfg.device))
    channels_last = use_channels_last(cfg.train, device)
    data = data if data is not None else load_data(cfg.data)
    model = build_model(cfg.model.name, data.num_classes, data.in_channels, data.image_size, cfg.model.stem,
                        cfg.model.kwargs)
    if cfg.model.weights is not None:
        load_weights(model, Path(cfg.model.weights).expanduser())
    _check_input_fits(model, cfg, data)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    _check_distributed(cfg, strategy, device)
    _check_batch_fits(model, cfg, strategy.world_size)
    if strategy.distributed and cfg.train.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    method = _build_method(cfg, data, model, strategy, device)
    pin = device.type == "cuda"
    sampler = rank_train_sampler(method.batch_sampler(cfg.data.batch_size, cfg.seed), len(data.train),
                                 cfg.data.batch_size, cfg.seed, strategy.rank, strategy.world_size)
    train_loader = data.loader(True, sampler, seed=cfg.seed, pin_memory=pin, device=device)
    train_model = strategy.wrap(model, device)
    if cfg.train.compile:
        train_model = CompiledOrEager(train_model)
    optimizer = build_optimizer(model, cfg.train, method.student_parameters(), method.student_parameters_lr_scale())
    amp_dtype = autocast_dtype(cfg.train, device)
    return RunParts(
        seed=cfg.seed, epochs=cfg.train.epochs, placement=Placement(device, strategy, channels_last),
        amp_dtype=amp_dtype, data=data, model=model, method=method,
        mixer=BatchMixer(cfg.data, data.num_classes, paired=method.paired_batches, seed=cfg.seed),
        train_loader=train_loader, train_model=train_model, optimizer=optimizer,
        scheduler=build_scheduler(optimizer, cfg.train, len(train_loader)),
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        describe=model_meta(cfg.model.name, resolve_stem(cfg.model.stem, data.image_size), data.num_classes,
                            data.in_channels, data.image_size, data.train.classes, cfg.model.kwargs),
    )


def _check_input_fits(model: nn.Module, cfg: RunConfig, data: DataBundle) -> None:
    """One eval-mode forward of a blank image, so that an architecture too deep for the images (a network
    that strides 32 on 28-pixel images) stops here with the shapes, not inside the first training step."""
    shape = (2, data.in_channels, data.image_size, data.image_size)
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(shape))
    except RuntimeError as err:
        raise ConfigError(f"Model '{cfg.model.name}' cannot take {shape[1]}x{shape[2]}x{shape[3]} images of "
                          f"'{cfg.data.name}': {str(err).splitlines()[0]}. Choose another model, a larger "
                          f"data.image_size (image-file datasets) or other model.kwargs (timm).") from None
    finally:
        model.train()


def _build_method(cfg: RunConfig, data: DataBundle, model: nn.Module, strategy: Strategy,
                  device: torch.device) -> Method:
    method_cls = METHODS.get(cfg.method)
    teacher = None
    if method_cls.needs_teacher(cfg.hparams):
        teacher = _load_teacher(cfg, data, device, cfg.model.name if method_cls.teacher_same_architecture else None)
    # The method counts global batches per epoch before the loader exists (the method builds its own sampler);
    # the scheduler counts the batches of this rank's loader, which in a distributed run leaves out a last
    # global batch too small to split over the ranks. Two counts, kept apart: one would change such runs.
    ctx = MethodContext(num_classes=data.num_classes, num_train=len(data.train), epochs=cfg.train.epochs,
                        device=device, train_labels=data.train.labels, teacher=teacher,
                        steps_per_epoch=len(EpochBatchSampler(len(data.train), cfg.data.batch_size)),
                        student=model, strategy=strategy, compile=cfg.train.compile,
                        step_rows=(2 if method_cls.paired_batches else 1) * cfg.data.batch_size // strategy.world_size)
    return method_cls(cfg.hparams, ctx).to(device)


def _load_teacher(cfg: RunConfig, data: DataBundle, device: torch.device, same_architecture_as: str | None
                  ) -> nn.Module:
    if cfg.teacher.checkpoint is None:
        raise ConfigError(
            f"Method '{cfg.method}' distils from a pre-trained model: set "
            f"teacher.checkpoint=PATH, or run 'aikd pipeline' to train one first."
        )
    teacher = load_frozen_model(cfg.teacher.checkpoint, device, num_classes=data.num_classes,
                                in_channels=data.in_channels, expect_model=same_architecture_as,
                                image_size=data.image_size, classes=list(data.train.classes))
    return teacher.to(memory_format=torch.channels_last)  # see Method.teacher_logits


def _check_batch_fits(model: nn.Module, cfg: RunConfig, world_size: int) -> None:
    """BatchNorm cannot train on one sample per batch: refuse such a batch size before the first step, not in
    its traceback. (A last batch of one is left out of its epoch by the batch samplers, src/aikd/data/loaders.py.)"""
    per_process = cfg.data.batch_size // world_size
    if per_process < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        where = f" per process ({world_size} processes)" if world_size > 1 else ""
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} gives batches of {per_process} sample{where}, "
                          f"and model '{cfg.model.name}' has BatchNorm layers, which cannot train on one sample. "
                          f"Use data.batch_size={2 * world_size} or more.")


def _check_distributed(cfg: RunConfig, strategy: Strategy, device: torch.device) -> None:
    """Refuse the settings a run of several processes cannot train with: a global batch that does not split
    evenly over the ranks, and ``train.sync_bn`` without CUDA.

    ``train.sync_bn`` is allowed with every method, BSS and AMKD included: SyncBatchNorm runs a collective in
    each train-mode forward, so every rank must run the same forwards, and these methods' second, attacked
    forward has a fixed shape (src/aikd/methods/bss.py). It runs on every step of an attacking epoch, on
    every rank, whatever the batch's samples are; whether it runs depends only on the epoch and the per-rank
    batch size, and the sampler gives every rank at least two samples (src/aikd/data/loaders.py,
    ``ShardedBatchSampler``).
    """
    if not strategy.distributed:
        return
    world, batch = strategy.world_size, cfg.data.batch_size
    if batch % world:
        raise ConfigError(f"data.batch_size={batch} is the global batch of a distributed run and must split "
                          f"evenly over its {world} processes: use a multiple of {world}.")
    if cfg.train.sync_bn and device.type != "cuda":
        raise ConfigError("train.sync_bn=true needs CUDA GPUs (SyncBatchNorm has no CPU kernels); "
                          "on CPU leave it off: running statistics are averaged over the ranks each epoch.")
