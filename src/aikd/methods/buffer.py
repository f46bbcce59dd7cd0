"""The per-sample prediction buffer shared by PS-KD and AI-KD.

It holds, for every training sample, the logits the student produced for it
the last time it was seen, indexed by dataset index: the "previous epoch"
knowledge without an extra forward pass. Logits are stored in float16 and a
row of NaN marks a sample not seen yet, so the buffer costs exactly
``2 * num_classes`` bytes per sample: 200 B on CIFAR-100 (10 MB for its 50 000
images), 2.56 GB for ImageNet-1k. Reads and writes are single indexed tensor ops.

In ``aikd train``'s data-parallel runs the buffer is sharded: rank r of R holds rows
``[r N / R, (r + 1) N / R)`` (:class:`~aikd.shards.RowBlocks`), allocated at that size on its device,
so a node of R ranks holds one copy of the buffer in all (docs/distributed.md, "The per-sample
buffer's memory"). A write gathers the indices and logits of the whole global batch (the run
strategy's ``gather_rows`` with the step's padded row count, no exchange of counts), and every rank
keeps the rows it owns. A read gathers the step's indices the same way; every rank fills the rows it
owns for the whole global batch and -0.0 elsewhere, one all-reduce (a sum) completes every row, and
each rank takes its own slice. -0.0 is the additive identity of IEEE arithmetic (x + -0.0 is x bit for
bit, NaN, +0.0 and -0.0 included), so a sharded read returns exactly what a whole buffer would.
Per step that is ``global_batch x (2 C + 8)`` bytes for the write, as before sharding, and an all-reduce
of ``global_batch x 2 C`` bytes plus the indices for the read.

A single process, and the drop-in losses (:class:`~aikd.methods.pskd.PSKDLoss`, ``AIKDLoss``, whose
``state_dict()`` your own loop saves and so must hold the whole buffer), hold the whole buffer: one
block of every row. Writes take the same path; reads need no exchange.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from aikd.shards import RowBlocks, RowShard
from aikd.strategy import SINGLE_PROCESS, Strategy

if TYPE_CHECKING:
    from aikd.methods.base import MethodContext


class PredictionBuffer(nn.Module):
    """``num_samples x num_classes`` float16 logits (this rank's rows of them); NaN in a row's first entry means
    "no entry yet".

    Saved with ``state_dict()`` under ``logits`` (this rank's block of rows: every row, unsharded), so it
    travels into every checkpoint and comes back exactly on resume. A non-finite prediction is never a usable
    target, so the sentinel costs nothing: such a row reads as "not seen".

    ``shard=True`` (``aikd train``): with a distributed ``strategy``, this rank holds only its block of
    rows, and ``step_rows`` (the most rows one rank's step holds, ``MethodContext.step_rows``) must be
    known: reads and writes exchange padded rows without asking the host for counts. ``device``: where
    the rows are allocated, directly at their size (a buffer is never built whole first).
    """

    def __init__(self, num_samples: int, num_classes: int, dtype: torch.dtype = torch.float16, *,
                 strategy: Strategy = SINGLE_PROCESS, step_rows: int | None = None, shard: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.strategy, self.step_rows = strategy, step_rows
        self.sharded = shard and strategy.distributed
        if self.sharded and step_rows is None:
            raise ValueError("PredictionBuffer(shard=True) over several ranks needs step_rows: the most rows one "
                             "rank's step holds")
        self.blocks = RowBlocks(num_samples, strategy.world_size if self.sharded else 1)
        self.start, stop = self.blocks.bounds(strategy.rank if self.sharded else 0)
        # One spare row past the owned ones takes the writes of rows another rank owns (an indexed write
        # cannot skip entries without asking the host which); it is never read as a sample's row.
        self.register_buffer("table", torch.full((stop - self.start + 1, num_classes), float("nan"), dtype=dtype,
                                                 device=device), persistent=False)

    @classmethod
    def for_run(cls, ctx: MethodContext) -> PredictionBuffer:
        """The buffer of a method that ``aikd train`` builds: sharded over the run's ranks, on its device."""
        return cls(ctx.num_train, ctx.num_classes, strategy=ctx.strategy, step_rows=ctx.step_rows, shard=True,
                   device=ctx.device)

    @property
    def logits(self) -> Tensor:
        """The rows this rank owns (every row, unsharded): ``(owned rows, num_classes)``."""
        return self.table[:-1]

    @property
    def num_samples(self) -> int:
        return self.blocks.rows

    @property
    def bytes_per_sample(self) -> int:
        return self.table.element_size() * self.table.shape[1]

    @property
    def filled(self) -> Tensor:
        """(owned rows,) bool: which of this rank's samples have an entry."""
        return ~torch.isnan(self.logits[:, 0])

    def read(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """(stored logits as float32, mask of samples that have an entry) for ``indices``."""
        indices = indices.to(self.table.device)
        rows = self._read_shared(indices) if self.sharded else self.logits[indices]
        return rows.float(), ~torch.isnan(rows[:, 0])

    def _read_shared(self, indices: Tensor) -> Tensor:
        """Every rank's rows for the step's global batch, summed from the owners' parts; this rank's slice."""
        everyone = self.strategy.gather_rows(indices, rows=self.step_rows)
        local, owned = self._owned(everyone)
        rows = self.table[local]
        rows = torch.where(owned.unsqueeze(1), rows, torch.full((), -0.0, dtype=rows.dtype, device=rows.device))
        self.strategy.sum_(rows)  # one owner per row: x + (-0.0) + ... is x exactly
        first = self.strategy.rank * (self.step_rows or 0)  # every rank sent step_rows rows
        return rows[first:first + indices.shape[0]]

    def _owned(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """(row of ``indices`` in this rank's table, the spare row where another rank owns it; which it owns)."""
        local = indices - self.start
        spare = self.table.shape[0] - 1
        owned = (local >= 0) & (local < spare)
        return torch.where(owned, local, spare), owned

    @torch.no_grad()
    def write(self, indices: Tensor, logits: Tensor) -> None:
        """Store ``logits`` for ``indices`` (and, in a distributed run, every other rank's slice too)."""
        rows = self.step_rows if self.sharded else None
        indices = self.strategy.gather_rows(indices.to(self.table.device), rows=rows)
        values = self.strategy.gather_rows(logits.detach().to(self.table.device, self.table.dtype), rows=rows)
        local, _ = self._owned(indices)
        self.table[local] = values

    def row_shards(self) -> dict[str, RowShard]:
        """The ``state_dict()`` entries that hold one block of a tensor split by rows: a checkpoint writes the
        whole tensor, block by block, and a resume reads each rank's block alone (src/aikd/engine/state.py)."""
        # Unsharded, rank 0's copy is the whole tensor and the other ranks send nothing.
        strategy = self.strategy if self.sharded else SINGLE_PROCESS
        return {"logits": RowShard(self.logits.detach(), self.blocks, strategy)}

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "logits"] = self.logits if keep_vars else self.logits.detach()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        """Take ``logits``: this rank's block (a checkpoint of any world size, cut to this rank's rows by the
        checkpoint's reader), or, from a state_dict saved whole, this rank's rows of it."""
        key = prefix + "logits"
        value = state_dict.pop(key, None)
        if value is None:
            missing_keys.append(key)
        elif value.shape[1:] != self.logits.shape[1:] or value.shape[0] not in (self.logits.shape[0], self.blocks.rows):
            error_msgs.append(f"size mismatch for {key}: a buffer of {tuple(value.shape)} was saved, this one holds "
                              f"{self.blocks.rows} samples x {self.logits.shape[1]} classes")
        else:
            if value.shape[0] != self.logits.shape[0]:  # the whole buffer: keep this rank's rows
                value = value[self.start:self.start + self.logits.shape[0]]
            with torch.no_grad():
                self.logits.copy_(value)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
