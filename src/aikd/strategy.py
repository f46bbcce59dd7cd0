"""The distribution strategy's interface, and the strategy of a run of one process.

A leaf module (torch only): methods, guards and the engine annotate with :class:`Strategy` (and
:class:`Placement`, a process's device and strategy together) and default to :data:`SINGLE_PROCESS`
without importing :mod:`aikd.distributed`, where
:class:`~aikd.distributed.DataParallel`, the process group and torchrun's variables live.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn


class Strategy(Protocol):
    """How one process of a run relates to the others: which share of the batches is its, and the collectives."""

    rank: int
    world_size: int
    is_main: bool  # rank 0: it alone writes checkpoints, logs and summaries
    distributed: bool

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module: ...
    def sum_(self, tensor: Tensor) -> Tensor: ...
    def mean_(self, tensor: Tensor) -> Tensor: ...
    def agree(self, flag: bool | Tensor, device: torch.device) -> bool: ...
    def any_rank(self, flag: Tensor) -> Tensor: ...
    def gather_rows(self, tensor: Tensor, rows: int | None = None) -> Tensor: ...
    def gather_objects(self, obj: Any) -> list[Any]: ...
    def shards_to_main(self, local: Tensor, sizes: Sequence[int], visit: Callable[[Tensor], None] | None) -> None: ...
    def average_gradients(self, parameters: Iterable[nn.Parameter]) -> None: ...
    def average_norm_statistics(self, modules: Sequence[nn.Module]) -> None: ...
    def barrier(self) -> None: ...
    def main_then_share(self, action: Callable[[], None]) -> None: ...


def norm_statistics(modules: Sequence[nn.Module]) -> list[Tensor]:
    """The BatchNorm running means and variances of ``modules``, in module order: what each rank of a
    data-parallel run keeps apart between two epoch ends (each follows its own slice of the batches)."""
    return [t for m in modules for layer in m.modules() if isinstance(layer, nn.modules.batchnorm._BatchNorm)
            for t in (layer.running_mean, layer.running_var) if t is not None]


class SingleProcess:
    """A run of one process: rank 0 of 1; every collective is the identity."""

    rank, world_size, is_main, distributed = 0, 1, True, False

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        return model

    def sum_(self, tensor: Tensor) -> Tensor:
        return tensor

    def mean_(self, tensor: Tensor) -> Tensor:
        """``tensor`` averaged over the ranks, in place (a flat gradient that DDP does not see)."""
        return tensor

    def agree(self, flag: bool | Tensor, device: torch.device) -> bool:
        """True when ``flag`` is true here (on any rank, in a distributed run)."""
        return bool(torch.as_tensor(flag).reshape(()))

    def any_rank(self, flag: Tensor) -> Tensor:
        """``flag`` (a bool tensor) as a float tensor, true where it is true on any rank; never waits for the host."""
        return flag.float()

    def gather_rows(self, tensor: Tensor, rows: int | None = None) -> Tensor:
        return tensor

    def gather_objects(self, obj: Any) -> list[Any]:
        return [obj]

    def shards_to_main(self, local: Tensor, sizes: Sequence[int], visit: Callable[[Tensor], None] | None) -> None:
        """Rank 0 calls ``visit`` on every rank's block of rows in rank order (the others send theirs and pass
        None); with one process, the one block. ``sizes``: every rank's row count."""
        if visit is not None:
            visit(local)

    def average_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Gradients of parameters outside the wrapped student: already this process's own."""

    def average_norm_statistics(self, modules: Sequence[nn.Module]) -> None:
        """BatchNorm running statistics: already this process's own."""

    def barrier(self) -> None:
        """Nothing to wait for."""

    def main_then_share(self, action: Callable[[], None]) -> None:
        action()


SINGLE_PROCESS: Strategy = SingleProcess()


@dataclass(frozen=True)
class Placement:
    """Where one process of a run computes: its device, how it relates to the other processes (the strategy),
    and whether its images and model are channels-last. The engine's parts that place tensors or call
    collectives (the evaluator, the non-finite guard, the checkpoints) receive this one object."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: Strategy = SINGLE_PROCESS
    channels_last: bool = False
