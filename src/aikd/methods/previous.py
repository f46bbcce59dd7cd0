"""Where AI-KD's previous-epoch logits z_{t-1} (the target of the progressive loss) come from.

* :class:`BufferPrevious`: the student's own logits for each sample the last time it trained on it
  (a :class:`~aikd.methods.buffer.PredictionBuffer`; no extra forward pass);
* :class:`SnapshotPrevious`: a frozen copy of the student as it was at the end of the previous epoch.

Each is a :class:`~aikd.methods.base.Source`: :meth:`for_batch` answers with :class:`~aikd.methods.base.Targets`
(logits or None, mask of the samples that have one or None for all).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aikd.methods.base import Batch, Source, Targets
from aikd.methods.buffer import PredictionBuffer
from aikd.methods.ema import FrozenCopy


class BufferPrevious(Source):
    """The last logits of every training sample, written after each step that stands."""

    def __init__(self, num_train: int, num_classes: int, buffer: PredictionBuffer | None = None) -> None:
        super().__init__()
        self.buffer = buffer if buffer is not None else PredictionBuffer(num_train, num_classes)

    def for_batch(self, batch: Batch) -> Targets:
        return Targets(*self.buffer.read(batch.indices))

    def on_step_end(self, model: nn.Module, batch: Batch, logits: Tensor) -> None:
        self.buffer.write(batch.indices, logits)


class SnapshotPrevious(FrozenCopy, Source):
    """The student's weights at the end of the previous epoch (a copy of the student until the first one ends).

    It answers from epoch 1 on: epoch 0's end has come before any batch of a later epoch, in this process
    or in the run whose checkpoint this one resumed (the copy and ``ready`` come back with the state). The
    epoch, a number the host has, decides, not ``ready``, which a GPU would have to be asked for every step.
    """

    def __init__(self, student: nn.Module, compile: bool = False) -> None:
        super().__init__(student, compile)
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        self.copy_from(model)
        self.ready.fill_(True)

    def for_batch(self, batch: Batch) -> Targets:
        return Targets(self.logits(batch.images) if batch.epoch > 0 else None)
