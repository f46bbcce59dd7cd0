"""Rows of one tensor split over a run's processes: which rank owns which rows, and a rank's part.

A leaf module (torch only), shared by the per-sample prediction buffer (src/aikd/methods/buffer.py), which
holds one block of rows per rank, and the checkpoint writer (src/aikd/engine/checkpoint.py), which streams
the blocks into one whole tensor of the file, rank by rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from aikd.strategy import Strategy


@dataclass(frozen=True)
class RowBlocks:
    """``rows`` rows split into ``ranks`` contiguous blocks in rank order, as even as integers allow.

    Rank r owns rows ``[r * rows // ranks, (r + 1) * rows // ranks)``: a formula every rank evaluates alike,
    so no rank needs to ask another which rows it holds. One rank owns them all.
    """

    rows: int
    ranks: int = 1

    def __post_init__(self) -> None:
        if self.rows < 0 or self.ranks < 1:
            raise ValueError(f"RowBlocks: {self.rows} rows over {self.ranks} ranks")

    def bounds(self, rank: int) -> tuple[int, int]:
        """``(start, stop)``: the rows rank ``rank`` owns."""
        if not 0 <= rank < self.ranks:
            raise ValueError(f"RowBlocks: rank {rank} is not one of 0 to {self.ranks - 1}")
        return rank * self.rows // self.ranks, (rank + 1) * self.rows // self.ranks

    def sizes(self) -> list[int]:
        """Every rank's row count, in rank order."""
        return [stop - start for start, stop in map(self.bounds, range(self.ranks))]


@dataclass(frozen=True)
class RowShard:
    """This rank's block ``local`` of a ``(blocks.rows, ...)`` tensor whose other blocks the other ranks hold.

    What a checkpoint saves in place of a tensor that no single rank holds whole: the writer asks every rank
    for its block in turn (``strategy.shards_to_main``), and the file holds the whole tensor.
    """

    local: Tensor
    blocks: RowBlocks
    strategy: Strategy

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        """The whole tensor's shape."""
        return (self.blocks.rows, *self.local.shape[1:])

    @property
    def bounds(self) -> tuple[int, int]:
        """``(start, stop)``: the rows of the whole tensor that ``local`` holds."""
        return self.blocks.bounds(self.strategy.rank if self.blocks.ranks > 1 else 0)


def row_shards_of(module: nn.Module) -> dict[str, RowShard]:
    """The ``state_dict()`` entries of ``module`` that are one rank's block of a tensor split by rows, by key:
    those of every submodule with a ``row_shards()`` method (a :class:`~aikd.methods.buffer.PredictionBuffer`)."""
    found = {}
    for name, sub in module.named_modules():
        row_shards = getattr(sub, "row_shards", None)
        if callable(row_shards):
            found.update({f"{name}.{key}" if name else key: shard for key, shard in row_shards().items()})
    return found
