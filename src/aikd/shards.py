"""Rows of one tensor split over a run's processes: which rank owns which rows, and a rank's part.

A leaf module (torch only), shared by the per-sample prediction buffer (src/aikd/methods/buffer.py), which
holds one block of rows per rank, and the checkpoint writer (src/aikd/engine/checkpoint.py), which streams
the blocks into one whole tensor of the file, rank by rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

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
    def shape(self) -> tuple[int, ...]:
        """The whole tensor's shape."""
        return (self.blocks.rows, *self.local.shape[1:])
