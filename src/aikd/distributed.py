"""The process group and the distribution strategy: how one process relates to the others of its run.

A distributed run is started by ``torchrun`` (or ``aikd train --nproc N``), which
sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous variables in every
process, or by Slurm's ``srun`` (one task per rank, on one node or several), whose
task variables :mod:`aikd.rendezvous` turns into the same; :func:`setup` joins the
group once per process (NCCL on GPUs, gloo on CPU), with a timeout that holds.

Two strategies share one small interface, :class:`aikd.strategy.Strategy`.
:class:`SingleProcess` (in that leaf module, so that methods need not import this one) is a run
of one process: every call is the identity or a no-op. :class:`DataParallel` is one rank of a
torchrun job. The loop, the setup and the methods call the
strategy unconditionally and never ask whether the run is distributed; the
collectives live here and nowhere else (pure functions such as the losses and
``critic_step`` take the few they need as arguments).

* ``wrap``: the student as the training step calls it (DistributedDataParallel);
* ``rank`` / ``world_size``: which share of the batches is this rank's (the samplers in
  :mod:`aikd.data.loaders` take them);
* ``sum_``, ``agree``, ``gather_rows``, ``gather_objects``: reduce, decide
  together, collect rows or small objects in rank order;
* ``average_gradients``, ``average_norm_statistics``: what DDP does not do
  (a method's own trained modules; BatchNorm running statistics at an epoch's end);
* ``main_then_share``: rank 0 acts (prepares the output folder) and every rank
  raises its error.

Kept free of engine and method imports so both can use it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from aikd import rendezvous
from aikd.compat import distributed_data_parallel
from aikd.errors import AikdError, ConfigError
from aikd.strategy import SINGLE_PROCESS, SingleProcess, Strategy, norm_statistics

__all__ = ["SINGLE_PROCESS", "DataParallel", "DistInfo", "SingleProcess", "Strategy", "cuda_index", "current",
           "is_main_rank", "setup", "strategy_for"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the run: rank ``rank`` of ``world_size``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, logs and summaries."""
        return self.rank == 0


def launched_as_rank() -> bool:
    """Whether this process is one rank of several: torchrun's variables, or those of a task of srun."""
    rendezvous.adopt_slurm_ranks()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_name: str) -> DistInfo:
    """Join the process group that torchrun or srun prepared (once per process); a single process gets rank 0 of 1.

    On GPUs each process selects its GPU (:func:`cuda_index`) before joining: NCCL binds to the current device.
    The addresses are checked first (:func:`aikd.rendezvous.check_addresses`), and the rendezvous and every
    collective wait at most ``AIKD_DIST_TIMEOUT`` seconds (default 600) for the other ranks.
    """
    if not launched_as_rank():
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if dist.is_initialized():
        return info
    wants_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    backend = "nccl" if wants_cuda else "gloo"
    timeout = timedelta(seconds=rendezvous.collective_timeout_s())
    rendezvous.check_addresses(backend)
    if wants_cuda:
        torch.cuda.set_device(cuda_index(device_name, info.local_rank, torch.cuda.device_count()))
    dist.init_process_group(backend, timeout=timeout)
    return info


def current() -> DistInfo:
    """The rank and size of the joined group, or rank 0 of 1 when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def is_main_rank() -> bool:
    """Whether this process is rank 0: of the joined group, or else of the run that torchrun or srun started.

    Known before the group is joined (from RANK, or Slurm's task variables): a pipeline decides whether to take
    the lock of a phase-1 cache entry before its training joins the group, and if every rank took it, rank 1
    would wait for the lock that rank 0 holds while rank 0 waits for rank 1 in the rendezvous.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    rendezvous.adopt_slurm_ranks()
    return os.environ.get("RANK", "0") == "0"


def cuda_index(requested: str, local_rank: int | None, visible: int) -> int:
    """The GPU (an index among the ``visible`` ones) that this process drives.

    ``local_rank`` is None for a single process, which takes the index ``requested`` names (``cuda:1``) or 0.
    A process of a distributed run takes the GPU of its local rank, except where it sees one GPU only: a
    scheduler that binds one GPU per task (Slurm's --gpus-per-task) hides the others, so that one is its own
    whatever its local rank. Anything else is refused with a message that says what to change.
    """
    if visible < 1:
        raise ConfigError(f"device={requested} was asked for, but this process sees no CUDA GPU. "
                          f"Use device=cpu, or check CUDA_VISIBLE_DEVICES.")
    named = requested.partition(":")[2]
    if local_rank is None:
        index = int(named) if named.isdigit() else 0
        if index >= visible:
            raise ConfigError(f"device={requested} was asked for, but this process sees {visible} GPU(s) "
                              f"(cuda:0 to cuda:{visible - 1}). Pick one of those, or check CUDA_VISIBLE_DEVICES.")
        return index
    if visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    raise ConfigError(f"Local rank {local_rank} has no GPU: this process sees {visible}. Start at most that many "
                      f"processes per node (torchrun --nproc-per-node), or bind one GPU per process.")


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """The GPU this process drives (:func:`cuda_index`), made its current device so that CUDA state (random
    streams, caches, NCCL) is created there and not on GPU 0; other devices as they are."""
    if device.type != "cuda":
        return device
    index = cuda_index(str(device), info.local_rank if info.enabled else None, torch.cuda.device_count())
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


class DataParallel(SingleProcess):
    """Rank ``info.rank`` of ``info.world_size`` processes that train one model on slices of each batch."""

    distributed = True

    def __init__(self, info: DistInfo) -> None:
        self.rank, self.world_size, self.is_main = info.rank, info.world_size, info.is_main

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """DistributedDataParallel: it broadcasts rank 0's weights and buffers now, averages gradients in backward.

        Running statistics are not broadcast every step (they are averaged at each epoch's end). A
        method that needs a second forward with gradient in one step (BSS's boundary samples) calls
        the bare student (``MethodContext.student``): its gradients flow into the same parameters
        and DDP averages their sum once.
        """
        device_ids = [device.index] if device.type == "cuda" else None
        return distributed_data_parallel(model, device_ids, gradient_as_bucket_view=True)

    def sum_(self, tensor: Tensor) -> Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def mean_(self, tensor: Tensor) -> Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.div_(self.world_size)

    def agree(self, flag: bool | Tensor, device: torch.device) -> bool:
        """True on every rank when ``flag`` is true on at least one: decisions that must not split the ranks."""
        value = torch.as_tensor(flag, dtype=torch.int32, device=device).reshape(())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value)

    def any_rank(self, flag: Tensor) -> Tensor:
        value = flag.float()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value

    def gather_rows(self, tensor: Tensor, rows: int | None = None) -> Tensor:
        """Every rank's ``tensor`` concatenated along dim 0 in rank order (row counts may differ).

        ``rows``: the most rows any rank holds, where the caller knows it (a training step's share of the
        batch, ``MethodContext.step_rows``). The ranks then send ``rows`` rows each, a part of fewer rows padded
        with copies of its first row, and need not first exchange their counts, which the host would have to
        wait for; a write by index stores a copied row's value twice, which changes nothing.
        """
        if rows is not None:
            return self._gather_padded(tensor, rows)
        count = torch.tensor([tensor.shape[0]], device=tensor.device)
        counts = [torch.zeros_like(count) for _ in range(self.world_size)]
        dist.all_gather(counts, count)
        sizes = [int(c) for c in counts]
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])

    def _gather_padded(self, tensor: Tensor, rows: int) -> Tensor:
        if not 0 < tensor.shape[0] <= rows:
            raise ValueError(f"gather_rows: this rank holds {tensor.shape[0]} rows, not 1 to {rows}")
        padded = torch.cat([tensor, tensor[:1].expand(rows - tensor.shape[0], *tensor.shape[1:])]).contiguous()
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat(parts)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's small picklable ``obj`` (generator states), in rank order."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def shards_to_main(self, local: Tensor, sizes: Sequence[int], visit: Callable[[Tensor], None] | None) -> None:
        """Every rank's block of rows, one at a time, to rank 0, which calls ``visit`` on each in rank order.

        A checkpoint of a tensor split by rows (a sharded prediction buffer) is written as the blocks arrive:
        rank 0 holds its own block and at most one other rank's at any moment, never the whole tensor.
        Point-to-point sends, so every rank must call this for the same tensors in the same order.
        """
        if len(sizes) != self.world_size or local.shape[0] != sizes[self.rank]:
            raise ValueError(f"shards_to_main: rank {self.rank} holds {local.shape[0]} rows; the sizes are {sizes}")
        if not self.is_main:
            if local.shape[0]:
                dist.send(local.contiguous(), dst=0)
            return
        if visit is None:
            raise ValueError("shards_to_main: rank 0 receives every block and needs a visit for them")
        visit(local)
        for source, rows in enumerate(sizes[1:], start=1):
            block = local.new_empty((rows, *local.shape[1:]))
            if rows:
                dist.recv(block, src=source)
            visit(block)
            del block  # before the next one arrives

    def average_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """One flat all-reduce for the gradients of parameters DDP does not see (a critic, a method's head);
        parameters without a gradient take part as zeros, so every rank sends the same shapes."""
        params = [p for p in parameters if p.requires_grad]
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def average_norm_statistics(self, modules: Sequence[nn.Module]) -> None:
        """Average BatchNorm running means and variances over the ranks.

        Without SyncBatchNorm each rank's statistics follow its own slice of the batches;
        averaging them at an epoch's end gives every rank the same model for evaluation,
        checkpoints and AI-KD's snapshot, and a better estimate than any one rank's.
        """
        stats = norm_statistics(modules)
        if not stats:
            return
        flat = torch.cat([t.float().reshape(-1) for t in stats])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for t in stats:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def barrier(self) -> None:
        dist.barrier()

    def main_then_share(self, action: Callable[[], None]) -> None:
        """Run ``action`` on rank 0 alone; if it raises an :class:`AikdError`, every rank raises it.

        For checks that read or change shared files (the output folder): the other ranks wait
        for rank 0 instead of racing it, and stop with its message instead of waiting forever.
        """
        error = None
        if self.is_main:
            try:
                action()
            except AikdError as err:
                error = err
        message = self.gather_objects(None if error is None else (type(error), str(error)))[0]
        if message is not None:
            kind, text = message
            raise kind(text)


def strategy_for(info: DistInfo) -> Strategy:
    """The strategy of this process: DataParallel when torchrun or srun started several, else SingleProcess."""
    return DataParallel(info) if info.enabled else SingleProcess()
