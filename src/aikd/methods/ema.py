"""Frozen copies of the student and its exponential moving average: parts any method can use (online AI-KD's
superior model and previous-epoch snapshot, an EMA teacher, a mean teacher in your own loop).

    teacher = EMAModel(student, decay=0.99)   # at construction: ordinary state of the method (a sub-module)
    target = teacher.logits(images)           # float32, no gradient
    teacher.update(student)                   # after every optimizer step
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import Tensor, nn

from aikd.compiling import compiled_forward
from aikd.methods.base import Batch, Part


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with no gradients: saved and restored with its owner's state_dict()."""
    return copy.deepcopy(model).eval().requires_grad_(False)


Slot = tuple[dict, str]  # (a module's _parameters or _buffers, a name): where one state_dict() tensor lives


def _state_slots(module: nn.Module) -> list[Slot] | None:
    """Where each tensor of ``module.state_dict()`` lives, in its order; None if state_dict() is not just the
    modules' parameters and persistent buffers (a state_dict hook, an extra state), which then is read each step.

    A slot is read afresh at every update, so a tensor that ``.to()`` or ``load_state_dict(assign=True)``
    replaces is seen; ``load_state_dict()`` copies into the same tensors, which the slots keep finding.
    """
    slots: list[Slot] = []
    for _, owner in module.named_modules(remove_duplicate=False):  # state_dict()'s order, shared modules repeated
        slots += [(owner._parameters, name) for name, p in owner._parameters.items() if p is not None]
        slots += [(owner._buffers, name) for name, b in owner._buffers.items()
                  if b is not None and name not in owner._non_persistent_buffers_set]
    expected = list(module.state_dict(keep_vars=True).values())
    if len(slots) != len(expected) or not all(d[k] is t for (d, k), t in zip(slots, expected, strict=True)):
        return None
    return slots


class _EMAPairs:
    """The (average, model) tensor pairs of :func:`ema_update`, split into floating-point and integer ones, found
    once per pair of modules. A tensor shared by two sub-modules is averaged once."""

    def __init__(self, average: nn.Module, model: nn.Module) -> None:
        self.model = weakref.ref(model)
        mine, live = _state_slots(average), _state_slots(model)
        self.ok = mine is not None and live is not None and len(mine) == len(live)
        self.floats: list[tuple[Slot, Slot]] = []
        self.others: list[tuple[Slot, Slot]] = []
        if not self.ok:
            return
        seen: set[int] = set()
        for a, b in zip(mine, live, strict=True):
            tensor = a[0][a[1]]
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            (self.floats if tensor.is_floating_point() else self.others).append((a, b))

    def tensors(self, pairs: list[tuple[Slot, Slot]]) -> tuple[list[Tensor], list[Tensor]]:
        means = [a[0][a[1]] for a, _ in pairs]
        lives = [b[0][b[1]] for _, b in pairs]
        return means, [t if t.dtype == m.dtype else t.to(m.dtype) for m, t in zip(means, lives, strict=True)]


_PAIRS: weakref.WeakKeyDictionary[nn.Module, _EMAPairs] = weakref.WeakKeyDictionary()


@torch.no_grad()
def ema_update(average: nn.Module, model: nn.Module, decay: float) -> None:
    """average <- decay average + (1 - decay) model, for every floating-point parameter and buffer (BatchNorm's
    running statistics included); integer buffers (BatchNorm's batch counter) are copied.

    Two foreach ops (a multiply, then an add scaled by 1 - decay: the same operations, in the same order, as
    the tensor-by-tensor update, so runs keep their numbers bit for bit, which a lerp would not) and one
    foreach copy: a handful of kernels per step instead of two per tensor (about 250 for a ResNet-18), which
    on a GPU cost more to launch than to run. Where the tensors live is found once per pair of modules (a
    ``state_dict()`` walk costs about 2 ms for a ResNet-18 on the CPU).
    """
    pairs = _PAIRS.get(average)
    if pairs is None or pairs.model() is not model:
        pairs = _PAIRS[average] = _EMAPairs(average, model)
    if not pairs.ok:  # state_dict() has more than parameters and buffers: the plain walk, every step
        for mean, live in zip(average.state_dict().values(), model.state_dict().values(), strict=True):
            if mean.is_floating_point():
                mean.mul_(decay).add_(live.to(mean.dtype), alpha=1 - decay)
            else:
                mean.copy_(live)
        return
    means, lives = pairs.tensors(pairs.floats)
    if means:
        torch._foreach_mul_(means, decay)
        torch._foreach_add_(means, lives, alpha=1 - decay)
    means, lives = pairs.tensors(pairs.others)
    if means:
        torch._foreach_copy_(means, lives)


class FrozenCopy(Part):
    """A frozen copy of a model (``self.model``) that always answers in eval mode (BatchNorm's running
    statistics, no dropout), whatever mode its owner is put in. With ``compile`` (``train.compile``) its
    forward runs compiled; the compiled wrapper is not a sub-module, so ``state_dict()`` keys do not change."""

    def __init__(self, model: nn.Module, compile: bool = False) -> None:
        super().__init__()
        self.model = frozen_copy(model)
        self._forward = compiled_forward(self.model, compile, "train.compile (frozen copy)")

    def train(self, mode: bool = True) -> FrozenCopy:
        super().train(mode)
        self.model.eval()
        return self

    def logits(self, images: Tensor) -> Tensor:
        """The copy's logits: float32, no gradient (an ordinary tensor, which losses may save for backward)."""
        with torch.inference_mode():
            logits = (self._forward or self.model)(images)
        return logits.to(torch.float32, copy=True)

    def copy_from(self, model: nn.Module) -> None:
        self.model.load_state_dict(model.state_dict())


class EMAModel(FrozenCopy):
    """An exponential moving average of a model's weights, updated after every optimizer step (decay ``decay``)."""

    def __init__(self, model: nn.Module, decay: float, compile: bool = False) -> None:
        super().__init__(model, compile)
        self.decay = decay

    def update(self, model: nn.Module) -> None:
        ema_update(self.model, model, self.decay)

    def on_step_end(self, model: nn.Module, batch: Batch, logits: Tensor) -> None:
        self.update(model)
