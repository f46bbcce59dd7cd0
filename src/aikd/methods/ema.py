"""A model's exponential moving average: a part any method can use (online AI-KD's superior model, an EMA
teacher, a mean teacher in your own loop).

    ema = frozen_copy(student)               # at construction: ordinary state of the method (a sub-module)
    ema_update(ema, student, decay=0.99)     # after every optimizer step
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with no gradients: saved and restored with its owner's state_dict()."""
    return copy.deepcopy(model).eval().requires_grad_(False)


@torch.no_grad()
def ema_update(average: nn.Module, model: nn.Module, decay: float) -> None:
    """average <- decay average + (1 - decay) model, for every floating-point parameter and buffer (BatchNorm's
    running statistics included); integer buffers (BatchNorm's batch counter) are copied."""
    for mean, live in zip(average.state_dict().values(), model.state_dict().values(), strict=True):
        if mean.is_floating_point():
            mean.mul_(decay).add_(live.to(mean.dtype), alpha=1 - decay)
        else:
            mean.copy_(live)
