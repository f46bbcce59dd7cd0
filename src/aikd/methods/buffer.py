"""The per-sample prediction buffer shared by PS-KD and AI-KD.

It holds, for every training sample, the logits the student produced for it
the last time it was seen, indexed by dataset index: the "previous epoch"
knowledge without an extra forward pass. Logits are stored in float16, so the
buffer costs ``2 * num_classes`` bytes per sample (200 B on CIFAR-100, 10 MB
for its 50 000 images), plus one byte for the "seen" flag. Reads and writes
are single indexed tensor ops.

In a data-parallel run every rank holds the whole buffer (gather, not shard):
each write first gathers the indices and logits of all ranks' slices of the
global batch, so every rank's copy is the one a single process would have.
That costs ``global_batch x (2 C + 8)`` bytes of communication per step and
keeps reads local; sharding would save memory but, as samples move between
ranks every epoch, would need an exchange per read instead.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from aikd.distributed import all_gather_rows


class PredictionBuffer(nn.Module):
    """``num_samples x num_classes`` float16 logits plus a per-sample "filled" flag.

    Both are registered buffers, so they travel with ``state_dict()`` into
    every checkpoint and come back exactly on resume.
    """

    def __init__(self, num_samples: int, num_classes: int, dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        self.register_buffer("logits", torch.zeros(num_samples, num_classes, dtype=dtype))
        self.register_buffer("filled", torch.zeros(num_samples, dtype=torch.bool))

    @property
    def bytes_per_sample(self) -> int:
        return self.logits.element_size() * self.logits.shape[1] + self.filled.element_size()

    def read(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """(stored logits as float32, mask of samples that have an entry) for ``indices``."""
        indices = indices.to(self.logits.device)
        return self.logits[indices].float(), self.filled[indices]

    @torch.no_grad()
    def write(self, indices: Tensor, logits: Tensor) -> None:
        """Store ``logits`` for ``indices`` (and, in a distributed run, every other rank's slice too)."""
        indices = all_gather_rows(indices.to(self.logits.device))
        logits = all_gather_rows(logits.detach().to(self.logits.device, self.logits.dtype))
        self.logits[indices] = logits
        self.filled[indices] = True
