"""Host syncs per training step: where the host would wait for a GPU, counted on any device.

A step is fast on a GPU only if the host never waits for the device inside it: the host then queues the next
kernels while the device runs the last ones. Waiting happens whenever the host needs a value that only the device
has: a Python number out of a tensor (``.item()``, ``float()``, ``bool()``, ``int()``), an output whose size
depends on the data (``nonzero``, ``x[mask]``, ``unique``), or a copy from the device to the host.

:class:`SyncCounter` counts these inside a ``with`` block. On CUDA it counts the warnings of
``torch.cuda.set_sync_debug_mode("warn")``, the real syncs; on any other device a ``TorchDispatchMode`` counts
the ops that would sync on a GPU (:func:`is_sync_op`), so a CPU run shows where a GPU would wait.
:func:`syncs_per_step` turns the counts of two runs of different lengths into a count per step, without what an
epoch does once (its sums, evaluation): ``aikd bench`` prints it for every method, the default test suite
(tests/test_host_syncs.py) holds every method to its documented number, and scripts/gpu_check.py counts the real
syncs on a GPU with the same counter.

Run under torchrun, ``python -m aikd.bench.syncs`` counts a data-parallel run's (rank 0's) syncs per step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

# Ops that make the host wait for a GPU: their result (a Python number, or an output whose size depends on the
# data) exists only once the device has computed it. On a CPU they cost nothing, which is why they are counted.
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "equal", "masked_select", "_unique2", "unique_dim",
                      "unique_consecutive", "nonzero_numpy", "masked_scatter_", "is_nonzero"})


def _where(paths: tuple[str, ...] = ("/aikd/", "/scripts/")) -> str:
    """The innermost caller in aikd's own code ('aikd/methods/bss.py:37'), else the innermost outside torch."""
    frame, fallback = sys._getframe(1), None
    while frame is not None:
        name = frame.f_code.co_filename.replace(os.sep, "/")
        own = name.endswith(("/bench/syncs.py", "/gpu_check.py"))
        if any(p in name for p in paths) and not own:
            return f"{name[name.rindex('/aikd/') + 1:] if '/aikd/' in name else Path(name).name}:{frame.f_lineno}"
        if fallback is None and "/torch/" not in name and not own and not name.endswith("/warnings.py"):
            fallback = f"{Path(name).name}:{frame.f_lineno}"
        frame = frame.f_back
    return fallback or "?"


def is_sync_op(name: str, overload: str, args: tuple, kwargs: dict) -> bool:
    """Whether an aten op (``func.overloadpacket.__name__``, ``func._overloadname``) waits for the device on a GPU:
    a listed op, boolean-mask indexing (a hidden nonzero), repeat_interleave with tensor repeats and no
    output_size, or a copy from a device to the host."""
    if name in SYNC_OPS:
        return True
    if name in ("index", "index_put", "index_put_") and len(args) > 1:
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
    if name == "repeat_interleave":
        return overload in ("Tensor", "self_Tensor") and kwargs.get("output_size") is None
    if name == "_to_copy":
        source, target = args[0], kwargs.get("device")
        return isinstance(source, torch.Tensor) and source.device.type != "cpu" and target is not None \
            and torch.device(target).type == "cpu"
    if name == "copy_":
        return args[0].device.type == "cpu" and args[1].device.type not in ("cpu", "meta")
    return False


class SyncCounter:
    """Counts the host syncs inside a ``with`` block, by op (``by_op``) and by caller in aikd (``sites``).

    ``cuda``: count the real syncs of a CUDA device (its sync debug mode); else the ops that would sync on a GPU.
    """

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda
        self.kind = "cuda sync debug mode" if cuda else "dispatch mode (ops that sync on a GPU)"
        self.by_op: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()
        self._inner: Any = None

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def hit(self, op: str, site: str) -> None:
        self.by_op[op] += 1
        self.sites[site] += 1

    def __enter__(self) -> SyncCounter:
        self._inner = SyncWarnings(self) if self.cuda else _counting_mode(self)
        self._inner.__enter__()
        if self.cuda:
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode(0)
        self._inner.__exit__(*exc)

    def facts(self, steps: int) -> dict[str, Any]:
        return {"counter": self.kind, "total": self.total, "steps": steps,
                "per_step": self.total / steps if steps else None, "by_op": dict(self.by_op.most_common()),
                "sites": dict(self.sites.most_common(6))}


class SyncWarnings:
    """Counts, into a SyncCounter, the warnings of ``torch.cuda.set_sync_debug_mode("warn")`` ("called a
    synchronizing CUDA operation") while the block runs, each at the aikd line whose call synced: the warning
    is seen as it is raised, with the calling frames still there. Other warnings pass on unchanged."""

    MESSAGE = "called a synchronizing CUDA operation"

    def __init__(self, counter: SyncCounter) -> None:
        self.counter = counter
        self._catcher = warnings.catch_warnings()

    def __enter__(self) -> SyncWarnings:
        self._catcher.__enter__()  # restores the filters and showwarning on exit
        warnings.simplefilter("always")
        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if self.MESSAGE in str(message):
                self.counter.hit("cuda sync", _where())
            else:
                previous(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        return self

    def __exit__(self, *exc: object) -> None:
        self._catcher.__exit__(*exc)


def _counting_mode(counter: SyncCounter) -> Any:
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountSyncs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func.overloadpacket.__name__
            if is_sync_op(name, func._overloadname, args, kwargs):
                counter.hit(name, _where())
            return func(*args, **kwargs)

    return CountSyncs()


# ---------------------------------------------------------------------------------------------- per step

# Two runs, of SHORT and LONG steps per epoch: an epoch's own syncs (its sums, the guard's check at its end) are
# the same in both, so the difference is the steps' alone. Both stay below the guard's period (CHECK_EVERY).
SHORT, LONG, EPOCHS = 2, 4, 2


def syncs_per_step(build: Callable[[int], Any], epochs: int = EPOCHS, cuda: bool = False) -> dict[str, Any]:
    """Host syncs per training step of the Trainer ``build(steps)`` makes (``steps`` steps per epoch).

    Counted over ``epochs`` epochs (an online method's second source, a snapshot, switch on in epoch 1) of a
    SHORT and a LONG run; ``sites`` are the callers whose count grows with the steps.
    """
    counters, lengths = [], []
    for steps in (SHORT, LONG):
        trainer = build(steps)
        # A method's own sampler may take more steps over the same samples (BAKE's anchors with companions):
        # the steps counted are the loader's.
        lengths.append(len(trainer.train_loader))
        with SyncCounter(cuda) as counter:
            for epoch in range(epochs):
                trainer.train_epoch(epoch)
        counters.append(counter)
    short, long = counters
    if lengths[1] <= lengths[0]:
        raise ValueError(f"the runs have {lengths[0]} and {lengths[1]} steps per epoch: the second must be longer")
    extra_steps = (lengths[1] - lengths[0]) * epochs
    return {"counter": long.kind, "per_step": (long.total - short.total) / extra_steps,
            "by_op": {k: v / extra_steps for k, v in (long.by_op - short.by_op).items()},
            "sites": {k: v / extra_steps for k, v in (long.sites - short.sites).most_common(6)},
            "per_epoch": short.total / epochs - lengths[0] * (long.total - short.total) / extra_steps}


def method_syncs(name: str, overrides: Sequence[str] = (), device: str = "cpu",
                 work: Path | None = None) -> dict[str, Any]:
    """:func:`syncs_per_step` of method or bench variant ``name`` (aikd.bench.steps.VARIANTS), small_cnn on
    synthetic in-memory data, batch 8, with config ``overrides`` (mixing, an AI-KD source); ``work``: a folder
    every rank of a data-parallel run sees (the teacher checkpoint and the runs go there)."""
    from aikd.bench.steps import SMALL_CNN, build_trainer, teacher_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(work or tmp)
        setting = replace(SMALL_CNN, batch=8)
        teacher = folder / f"teacher-{setting.model}.safetensors"
        if not teacher.is_file():  # under torchrun, main() wrote it before
            teacher_checkpoint(setting, folder)

        def build(steps: int):
            return build_trainer(replace(setting, steps=steps), name, teacher, folder / f"{name}-{steps}", EPOCHS,
                                 device, overrides)

        return syncs_per_step(build, cuda=torch.device(device).type == "cuda")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m aikd.bench.syncs --work DIR [--set K=V ...] METHOD ...``: each method's syncs per step as
    one JSON line on rank 0's stdout (run it under torchrun to count a data-parallel step)."""
    parser = argparse.ArgumentParser(prog="python -m aikd.bench.syncs")
    parser.add_argument("methods", nargs="+")
    parser.add_argument("--work", type=Path, required=True, help="a folder every rank sees")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    from aikd import distributed, rendezvous
    from aikd.bench.steps import SMALL_CNN, teacher_checkpoint

    info = distributed.setup(args.device)
    if info.is_main:
        teacher_checkpoint(replace(SMALL_CNN, batch=8), args.work)
    if info.enabled:
        torch.distributed.barrier()
    for name in args.methods:
        facts = method_syncs(name, args.set, args.device, args.work)
        if info.is_main:
            print(json.dumps({"method": name, "world_size": info.world_size, **facts}), flush=True)
    rendezvous.leave_group(together=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
