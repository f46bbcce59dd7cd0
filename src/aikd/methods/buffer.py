"""The per-sample prediction buffer shared by PS-KD and AI-KD.

It holds, for every training sample, the logits the student produced for it
the last time it was seen, indexed by dataset index: the "previous epoch"
knowledge without an extra forward pass. Logits are stored in float16 and a
row of NaN marks a sample not seen yet, so the buffer costs exactly
``2 * num_classes`` bytes per sample: 200 B on CIFAR-100 (10 MB for its 50 000
images), 2.56 GB for ImageNet-1k. Reads and writes are single indexed tensor ops.

In a data-parallel run every rank holds the whole buffer (gather, not shard):
each write first gathers the indices and logits of all ranks' slices of the
global batch (with the ``gather_rows`` it was given, the run strategy's), so
every rank's copy is the one a single process would have.
That costs ``global_batch x (2 C + 8)`` bytes of communication per step and
keeps reads local; sharding would save memory but, as samples move between
ranks every epoch, would need an exchange per read instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class PredictionBuffer(nn.Module):
    """``num_samples x num_classes`` float16 logits; NaN in a row's first entry means "no entry yet".

    A registered buffer, so it travels with ``state_dict()`` into every checkpoint and
    comes back exactly on resume. A non-finite prediction is never a usable target, so
    the sentinel costs nothing: such a row reads as "not seen".
    """

    def __init__(self, num_samples: int, num_classes: int, dtype: torch.dtype = torch.float16,
                 gather_rows: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        self.register_buffer("logits", torch.full((num_samples, num_classes), float("nan"), dtype=dtype))
        self.gather_rows = gather_rows or (lambda rows: rows)  # every process's rows (a distributed run)

    @property
    def bytes_per_sample(self) -> int:
        return self.logits.element_size() * self.logits.shape[1]

    @property
    def filled(self) -> Tensor:
        """(num_samples,) bool: which samples have an entry."""
        return ~torch.isnan(self.logits[:, 0])

    def read(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """(stored logits as float32, mask of samples that have an entry) for ``indices``."""
        rows = self.logits[indices.to(self.logits.device)]
        return rows.float(), ~torch.isnan(rows[:, 0])

    @torch.no_grad()
    def write(self, indices: Tensor, logits: Tensor) -> None:
        """Store ``logits`` for ``indices`` (and, in a distributed run, every other rank's slice too)."""
        indices = self.gather_rows(indices.to(self.logits.device))
        self.logits[indices] = self.gather_rows(logits.detach().to(self.logits.device, self.logits.dtype))
