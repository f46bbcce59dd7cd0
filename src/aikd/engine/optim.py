"""The paper's optimizer and schedule (Section 4.2)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from aikd.compat import sgd_fused_kwargs
from aikd.config import TrainConfig

# Devices whose SGD runs fused: CUDA. Not the CPU: its fused SGD (torch 2.14) rounds differently from the plain
# loop (1e-9 apart after five small_cnn steps), and CPU runs keep their numbers bit for bit
# (scripts/bit_identity.sh). Not meta either (tests/test_meta_device.py's stand-in for a GPU): torch has no
# meta kernel for the fused SGD, so the meta runs take the plain loop.
FUSED_SGD_DEVICES = ("cuda",)
# Settings that choose an implementation, not the update: a resumed run keeps its own (see load_optimizer_state).
IMPLEMENTATION_KEYS = ("fused", "foreach")


def build_optimizer(model: nn.Module, cfg: TrainConfig, extra: Iterable[nn.Parameter] = (),
                    extra_lr_scale: float = 1.0) -> torch.optim.SGD:
    """SGD with (Nesterov) momentum and weight decay on every parameter, as the official codes do.

    ``extra`` adds training-only parameters a method owns, in a second group whose
    learning rate is ``extra_lr_scale`` times the model's (the schedule scales both).
    Fused (one kernel for every parameter, where torch has it for :data:`FUSED_SGD_DEVICES`): besides the
    launches it saves, a fused optimizer lets GradScaler.step under fp16 skip a step on the device
    instead of reading ``found_inf`` on the host (``.item()``) before every step.
    """
    groups = [{"params": list(model.parameters())}]
    extra = list(extra)
    if extra:
        groups.append({"params": extra, "lr": cfg.lr * extra_lr_scale})
    settings = {"lr": cfg.lr, "momentum": cfg.momentum, "nesterov": cfg.nesterov and cfg.momentum > 0,
                "weight_decay": cfg.weight_decay}
    fused = fused_sgd_kwargs({p.device.type for group in groups for p in group["params"]})
    if fused:
        try:
            return torch.optim.SGD(groups, **settings, **fused)
        except (RuntimeError, ValueError):  # a parameter the fused kernel does not take (a dtype)
            pass
    return torch.optim.SGD(groups, **settings)


def fused_sgd_kwargs(device_types: set[str]) -> dict[str, bool]:
    """``{"fused": True}`` for parameters all on one device of :data:`FUSED_SGD_DEVICES` that this torch's SGD
    fuses, else nothing (the plain loop)."""
    if len(device_types) != 1 or not device_types <= set(FUSED_SGD_DEVICES):
        return {}
    return sgd_fused_kwargs(next(iter(device_types)))


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``, keeping this optimizer's implementation (fused or not).

    load_state_dict() takes every group setting from the saved state, these too: a checkpoint of a CPU run
    (not fused) would leave a GPU run unfused, and a GPU checkpoint would fuse a CPU run, changing its rounding.
    """
    chosen = [{k: g[k] for k in IMPLEMENTATION_KEYS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, keep in zip(optimizer.param_groups, chosen, strict=True):
        group.update(keep)
    match_parameter_layout(optimizer)


def match_parameter_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor (SGD's momentum, Adam's moments) its parameter's strides.

    A checkpoint stores tensors contiguous, so a channels_last model resumes with momentum buffers of another
    layout than its weights and gradients. The plain and foreach SGD accept that; CUDA's fused SGD refuses it
    ("check_fast_path_restrictions"), which crashed every resumed channels_last run on a GPU. Same values, same
    bits: only the memory layout changes.
    """
    for param, slots in optimizer.state.items():
        for key, value in slots.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                slots[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def milestone_steps(cfg: TrainConfig, steps_per_epoch: int) -> list[int]:
    """Optimizer steps at which the learning rate drops.

    Milestones are fractions of the run placed on the step grid: for the
    paper's 300 epochs, 0.5 and 0.75 fall exactly on the first steps of epochs
    150 and 225, the same as an epoch-wise MultiStepLR. For short runs (a
    1-epoch smoke test, a demo) the drops still happen inside the run.
    """
    total = cfg.epochs * steps_per_epoch
    return sorted({max(1, round(f * total)) for f in cfg.milestones})


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
                    ) -> torch.optim.lr_scheduler.MultiStepLR:
    """Multiply the learning rate by ``gamma`` at each milestone; stepped after every batch."""
    return torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestone_steps(cfg, steps_per_epoch), gamma=cfg.gamma)
