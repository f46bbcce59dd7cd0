"""torch.compile that falls back to eager mode when compiling fails (a missing toolchain, an unsupported op)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch


def is_compile_error(err: Exception) -> bool:
    """Errors raised by the compiler stack (dynamo, inductor, a backend), not by the compiled code itself."""
    module = type(err).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor", "torch._subclasses")) or isinstance(
        err, (ImportError, OSError, NotImplementedError))


class CompiledOrEager:
    """``fn`` compiled with torch.compile; if compiling fails the first time, a warning and ``fn`` itself from then on.

    Compilation happens at the first call (and again for new input shapes), so that is where a missing
    compiler shows up: the run warns once and goes on instead of stopping. ``what`` names the setting in
    the warning.
    """

    def __init__(self, fn: Callable[..., Any], what: str) -> None:
        self.fn, self.what = fn, what
        self.compiled = torch.compile(fn)
        self.failed: str | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.failed is None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:  # sorted below: compiler failures fall back, the code's own errors rise
                if not is_compile_error(err):
                    raise
                self.failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                warnings.warn(f"{self.what}: torch.compile failed ({self.failed}); running in eager mode.",
                              stacklevel=2)
        return self.fn(*args, **kwargs)


def compiled_or_eager(fn: Callable[..., Any], what: str) -> CompiledOrEager:
    return CompiledOrEager(fn, what)


def compiled_forward(model: torch.nn.Module | None, compile: bool, what: str) -> CompiledOrEager | None:
    """A frozen model's forward compiled under ``train.compile`` (``compile``), else None: call the model itself.

    Kept by its owner as a plain attribute, never as a sub-module, so that the owner's ``state_dict()`` keys
    (and with them every checkpoint) are the same with and without compiling. The compiled forward reads
    the model's own tensors, so an in-place update (an EMA step, ``load_state_dict``) is seen by the next call.
    """
    return CompiledOrEager(model, what) if compile and model is not None else None
