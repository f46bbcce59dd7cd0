"""Frozen copies of the student and its exponential moving average: parts any method can use (online AI-KD's
superior model and previous-epoch snapshot, an EMA teacher, a mean teacher in your own loop).

    teacher = EMAModel(student, decay=0.99)   # at construction: ordinary state of the method (a sub-module)
    target = teacher.logits(images)           # float32, no gradient
    teacher.update(student)                   # after every optimizer step
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from aikd.methods.base import Batch, Part


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


class FrozenCopy(Part):
    """A frozen copy of a model (``self.model``) that always answers in eval mode (BatchNorm's running
    statistics, no dropout), whatever mode its owner is put in."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = frozen_copy(model)

    def train(self, mode: bool = True) -> FrozenCopy:
        super().train(mode)
        self.model.eval()
        return self

    def logits(self, images: Tensor) -> Tensor:
        """The copy's logits: float32, no gradient (an ordinary tensor, which losses may save for backward)."""
        with torch.inference_mode():
            logits = self.model(images)
        return logits.to(torch.float32, copy=True)

    def copy_from(self, model: nn.Module) -> None:
        self.model.load_state_dict(model.state_dict())


class EMAModel(FrozenCopy):
    """An exponential moving average of a model's weights, updated after every optimizer step (decay ``decay``)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model)
        self.decay = decay

    def update(self, model: nn.Module) -> None:
        ema_update(self.model, model, self.decay)

    def on_step_end(self, model: nn.Module, batch: Batch, logits: Tensor) -> None:
        self.update(model)
