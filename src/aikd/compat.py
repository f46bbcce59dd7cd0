"""Where the torch releases aikd runs on differ, and how aikd bridges them: the only place that asks.

The releases tested, and the commands that test them, are in docs/results/torch_versions.md; the
floor in pyproject.toml is the oldest of them. Code elsewhere calls these helpers and never looks
at ``torch.__version__`` itself, so a difference found on a new release is fixed here once.

Each helper asks the installed torch whether it has a feature (``inspect.signature``, ``hasattr``)
rather than comparing version strings. A version string does not say what a build contains:
nightlies and vendor builds (versions such as ``2.11.0a0+git<hash>``) carry features of a later
release, or lack some of their own, and a version comparison would pick the wrong branch for them
where a look at the function itself cannot.

Differences bridged:

* DistributedDataParallel's switch for broadcasting buffers before every forward. torch 2.13 added
  ``forward_sync_buffers`` and deprecated ``broadcast_buffers`` (so says DDP's docstring in 2.14.1); 2.11
  knows only the latter, whose ``False`` also leaves the buffers out of the broadcast at construction.
  :func:`distributed_data_parallel` gives both the newer behaviour: buffers broadcast from rank 0 once,
  at construction, never per forward.
* SGD's fused kernel (``torch.optim.SGD(fused=True)``): :func:`sgd_fused_kwargs` asks SGD's signature and
  the optimizers' list of devices with fused kernels (a private function: absent, nothing is fused).
"""

from __future__ import annotations

import inspect
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from aikd.errors import AikdError

if TYPE_CHECKING:
    from torch.nn.parallel import DistributedDataParallel

__all__ = ["ddp_buffer_kwargs", "ddp_parameters", "distributed_data_parallel", "sgd_fused_kwargs"]


def ddp_parameters() -> frozenset[str]:
    """The keyword arguments the installed DistributedDataParallel accepts."""
    from torch.nn.parallel import DistributedDataParallel

    return frozenset(inspect.signature(DistributedDataParallel.__init__).parameters)


def ddp_buffer_kwargs(accepted: Collection[str]) -> dict[str, bool]:
    """The keyword that stops DDP from broadcasting buffers before every forward, for a DDP taking ``accepted``.

    aikd averages BatchNorm running statistics at each epoch's end instead (``average_norm_statistics``
    in src/aikd/distributed.py); a broadcast per forward would throw away every rank's but rank 0's.
    """
    for keyword in ("forward_sync_buffers", "broadcast_buffers"):  # the newer first: the older is deprecated
        if keyword in accepted:
            return {keyword: False}
    raise AikdError(f"This torch ({torch.__version__}) has a DistributedDataParallel that takes neither "
                       "forward_sync_buffers nor broadcast_buffers, so aikd cannot keep it from overwriting every "
                       "rank's BatchNorm statistics with rank 0's. Install a torch release listed in "
                       "docs/results/torch_versions.md.")


def distributed_data_parallel(model: nn.Module, device_ids: list[int] | None, **kwargs: Any) -> DistributedDataParallel:
    """``DistributedDataParallel(model, ...)`` that syncs buffers once, at construction, on every torch release.

    Where DDP has only ``broadcast_buffers``, turning it off also skips the buffers at construction,
    so they are broadcast from rank 0 here: every rank starts from rank 0's model, as with the newer
    ``forward_sync_buffers=False``, whichever the ranks built.
    """
    from torch.nn.parallel import DistributedDataParallel

    buffer_kwargs = ddp_buffer_kwargs(ddp_parameters())
    wrapped = DistributedDataParallel(model, device_ids=device_ids, **buffer_kwargs, **kwargs)
    if "forward_sync_buffers" not in buffer_kwargs:
        with torch.no_grad():
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
    return wrapped


def sgd_fused_kwargs(device_type: str) -> dict[str, bool]:
    """``{"fused": True}`` where this torch's SGD has a fused kernel for ``device_type``, else nothing."""
    if "fused" not in inspect.signature(torch.optim.SGD).parameters:
        return {}
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
    except ImportError:
        return {}
    return {"fused": True} if device_type in _get_fused_kernels_supported_devices() else {}
