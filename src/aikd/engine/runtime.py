"""Device choice, mixed precision and seeding."""

from __future__ import annotations

import contextlib
import os
import random
import re
from collections.abc import Iterator

import numpy as np
import torch

from aikd import compiling
from aikd.config import TrainConfig
from aikd.errors import ConfigError


def pick_device(name: str) -> torch.device:
    """``auto`` takes CUDA, then Apple MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} was asked for, but this machine has no CUDA GPU. "
                          f"Use device=auto or device=cpu.")
    if name == "mps" and not (getattr(torch.backends, "mps", None)
                              and torch.backends.mps.is_available()):
        raise ConfigError("device=mps was asked for, but MPS is not available here.")
    return torch.device(name)


# bf16 tensor cores arrived with Ampere (compute capability 8.0). Older GPUs (V100 7.0, T4 7.5) run bf16 only
# emulated, in float32 units at a fraction of fp16's speed, though torch.cuda.is_bf16_supported() counts them.
NATIVE_BF16_CAPABILITY = (8, 0)


def amp_dtype_for(amp: str, capability: tuple[int, int]) -> torch.dtype | None:
    """The autocast dtype that ``train.amp`` picks on a CUDA GPU of compute capability ``capability``.

    ``auto`` takes bf16 only where the GPU computes it natively, else fp16 (the run then scales the loss with a
    GradScaler, built in aikd.engine.setup); ``bf16`` and ``fp16`` are taken as asked; ``off`` is full precision.
    """
    if amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or tuple(capability) >= NATIVE_BF16_CAPABILITY:
        return torch.bfloat16
    return torch.float16


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype, or None for full precision (always on CPU and MPS)."""
    if device.type != "cuda":
        return None
    return amp_dtype_for(cfg.amp, torch.cuda.get_device_capability(device))


def use_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type in ("cuda", "cpu"))


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; in deterministic mode, refuse nondeterministic kernels.

    Strict, not warn-only: a warning scrolls by and the run silently stops being repeatable, which is
    what ``deterministic: true`` promises against. An op without a deterministic kernel then raises, and
    :func:`nondeterministic_ops_explained` turns that into a one-line error. The setting is the run's either
    way, so a run with ``deterministic: false`` after a deterministic one in the same process is not held to it.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


# torch's message when deterministic mode meets an op without a deterministic kernel (aten/src/ATen/Context.cpp).
_NO_DETERMINISTIC_KERNEL = re.compile(r"^(\S+) does not have a deterministic implementation")


@contextlib.contextmanager
def nondeterministic_ops_explained() -> Iterator[None]:
    """Around training: torch's error for an op with no deterministic kernel becomes one line naming the op.

    torch's own message suggests ``warn_only=True`` and filing an issue, neither of which a user of aikd can
    act on; what they can do is leave deterministic mode, or replace the op in their model.
    """
    try:
        yield
    except RuntimeError as err:
        found = _NO_DETERMINISTIC_KERNEL.match(str(err))
        if found is None:
            raise
        raise ConfigError(f"deterministic=true, but the run uses {found.group(1)}, which has no deterministic "
                          f"kernel on this device: set deterministic=false (the run is then not bit-repeatable) "
                          f"or replace that op in the model.") from err


def epoch_generator(seed: int, epoch: int, device: torch.device, rank: int = 0) -> torch.Generator:
    """The augmentation RNG of one epoch: depends only on (seed, epoch), so it replays on resume.

    Each rank of a distributed run draws its own augmentations (rank 0 draws a single process's).
    """
    g = torch.Generator(device=device)
    g.manual_seed(seed * 7_919 + epoch + 1 + rank * 1_000_003)
    return g


class CompiledOrEager(torch.nn.Module):
    """``torch.compile(module)`` that falls back to eager mode if compiling fails (aikd.compiling)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        self.call = compiling.CompiledOrEager(module, "train.compile")

    @property
    def failed(self) -> str | None:
        return self.call.failed

    def forward(self, *args, **kwargs):
        return self.call(*args, **kwargs)
