"""Data-parallel plumbing: the process group, and the few collectives the loop and methods need.

A distributed run is started by ``torchrun`` (or ``aikd train --nproc N``), which
sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous variables in every
process. :func:`setup` joins the group once per process (NCCL on GPUs, gloo on
CPU). Every helper here is a no-op in a single process, so the loop and the
methods call them unconditionally and a one-process run takes exactly the
code path it always took.

Kept free of engine and method imports so both can use it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from aikd.errors import AikdError, ConfigError


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


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_name: str) -> DistInfo:
    """Join the process group torchrun prepared (once per process); a single process gets rank 0 of 1."""
    if not launched_by_torchrun():
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if dist.is_initialized():
        return info
    wants_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if wants_cuda:
        if info.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"Local rank {info.local_rank} has no GPU: this node has {torch.cuda.device_count()}. "
                              f"Start at most that many processes per node (torchrun --nproc-per-node).")
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group("nccl" if wants_cuda else "gloo")
    return info


def current() -> DistInfo:
    """The rank and size of the joined group, or rank 0 of 1 when there is none."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """Each process of a multi-GPU node drives the GPU of its local rank."""
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def is_distributed() -> bool:
    return current().enabled


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over the ranks, in place; returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool | Tensor, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one: decisions that must not split the ranks."""
    value = torch.as_tensor(flag, dtype=torch.int32, device=device).reshape(())
    if is_distributed():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value)


def all_gather_rows(tensor: Tensor) -> Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order (row counts may differ between ranks)."""
    if not is_distributed():
        return tensor
    world = dist.get_world_size()
    count = torch.tensor([tensor.shape[0]], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (small picklable things: generator states), in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_parameters(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (what DistributedDataParallel does when it wraps)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor, src=0)


def on_main_then_share(action: Callable[[], None]) -> None:
    """Run ``action`` on rank 0 alone; if it raises an :class:`AikdError`, every rank raises it.

    For checks that read or change shared files (the output folder): the other ranks wait for
    rank 0 instead of racing it, and stop with its message instead of waiting forever.
    """
    error = None
    if current().is_main:
        try:
            action()
        except AikdError as err:
            error = err
    if not is_distributed():
        if error is not None:
            raise error
        return
    message = all_gather_objects(None if error is None else (type(error), str(error)))[0]
    if message is not None:
        kind, text = message
        raise kind(text)


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Average the gradients of parameters outside DistributedDataParallel (a critic, a method's head).

    One flat all-reduce for all of them; parameters without a gradient take part as zeros so
    every rank sends the same shapes.
    """
    if not is_distributed():
        return
    params = [p for p in parameters if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def average_norm_statistics(modules: Sequence[nn.Module]) -> None:
    """Average BatchNorm running means and variances over the ranks.

    Without SyncBatchNorm each rank's statistics follow its own slice of the
    batches; averaging them at the end of an epoch gives every rank the same
    model for evaluation, checkpoints and AI-KD's snapshot, and a better
    estimate than any one rank's.
    """
    if not is_distributed():
        return
    stats = [t for m in modules for layer in m.modules() if isinstance(layer, nn.modules.batchnorm._BatchNorm)
             for t in (layer.running_mean, layer.running_var) if t is not None]
    if not stats:
        return
    flat = torch.cat([t.float().reshape(-1) for t in stats])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for t in stats:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
