"""The paper's optimizer and schedule (Section 4.2)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from aikd.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig, extra: Iterable[nn.Parameter] = (),
                    extra_lr_scale: float = 1.0) -> torch.optim.SGD:
    """SGD with (Nesterov) momentum and weight decay on every parameter, as the official codes do.

    ``extra`` adds training-only parameters a method owns, in a second group whose
    learning rate is ``extra_lr_scale`` times the model's (the schedule scales both).
    """
    groups = [{"params": list(model.parameters())}]
    extra = list(extra)
    if extra:
        groups.append({"params": extra, "lr": cfg.lr * extra_lr_scale})
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


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
