"""Where AI-KD's superior logits come from: the z_sup of the guide loss and of the critic's "real" side.

* :class:`PretrainedSuperior`: a frozen model from a separate phase 1 (the paper's);
* :class:`EMASuperior`: an exponential moving average of the student's weights, from epoch ``start_epoch``;
* :class:`MilestoneSuperior`: a frozen copy of the student taken at the start of epoch ``start_epoch``.

Each is a :class:`~aikd.methods.base.Source`: :meth:`for_batch` answers with the batch's superior logits (every
row has one), or None while it has none (an in-run model before its start epoch); the in-run ones are ordinary
state of their owner (its ``state_dict()``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from aikd.methods.base import Batch, Source, Targets
from aikd.methods.ema import EMAModel, FrozenCopy


class PretrainedSuperior(Source):
    """A frozen pre-trained model's logits. ``logits_of`` is the method's ``teacher_logits``: the engine loads
    every method's pre-trained model from the config's ``teacher`` section, and to AI-KD that model is its
    superior model (docs/methods/aikd.md, "Names")."""

    def __init__(self, logits_of: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.logits_of = logits_of

    def for_batch(self, batch: Batch) -> Targets:
        return Targets(self.logits_of(batch.images))


class EMASuperior(EMAModel, Source):
    """The student's EMA (updated after every optimizer step from the start), answering from ``start_epoch`` on."""

    def __init__(self, student: nn.Module, decay: float, start_epoch: int, compile: bool = False) -> None:
        super().__init__(student, decay, compile)
        self.start_epoch = start_epoch

    def for_batch(self, batch: Batch) -> Targets:
        return Targets(None if batch.epoch < self.start_epoch else self.logits(batch.images))


class MilestoneSuperior(FrozenCopy, Source):
    """A frozen copy of the student taken when epoch ``start_epoch`` starts, answering from then on."""

    def __init__(self, student: nn.Module, start_epoch: int, compile: bool = False) -> None:
        super().__init__(student, compile)
        self.start_epoch = start_epoch
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def on_epoch_start(self, epoch: int, model: nn.Module) -> None:
        """Take the copy as epoch ``start_epoch`` starts, unless ``ready`` says it was taken: a run resumed inside
        that epoch keeps the copy of the run it resumes, not one of a later student. The choice is made per
        tensor on the device (``ready`` is not read on the host)."""
        if epoch != self.start_epoch:
            return
        for mine, live in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            mine.copy_(torch.where(self.ready, mine, live))
        self.ready.fill_(True)

    def for_batch(self, batch: Batch) -> Targets:
        """From ``start_epoch`` on, when the copy exists: it is taken as that epoch starts, before its first batch."""
        return Targets(self.logits(batch.images) if batch.epoch >= self.start_epoch else None)
