"""Device choice, mixed precision and seeding."""

from __future__ import annotations

import os
import random

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


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype, or None for full precision (always on CPU and MPS)."""
    if device.type != "cuda" or cfg.amp == "off":
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def use_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.channels_last == "on" or (cfg.channels_last == "auto" and device.type in ("cuda", "cpu"))


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; in deterministic mode, forbid nondeterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


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
