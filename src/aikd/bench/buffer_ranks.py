"""The prediction buffer's memory on a real 2-rank gloo job: before issue 35 (a whole copy per rank, saved by
clone + serialise) and after (one shard per rank, streamed), measured at a small shape.

``python -m torch.distributed.run --standalone --nproc-per-node=2 -m aikd.bench.buffer_ranks ROWS CLASSES OUT``
runs one rank; the files it saves go beside OUT. Each step resets the process's resident high-water mark
(``/proc/self/clear_refs``) and reads how far above the resident size before it the step went: the bytes a
step adds at its peak, whatever it frees afterwards (file pages mapped by a read included). Rank 0 writes every
rank's figures to OUT (JSON). :func:`aikd.bench.memory.buffer_scaling` starts the job and computes the
ImageNet-1k shape from what it measured.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from aikd.distributed import DataParallel, current
from aikd.engine.checkpoint import StoredRows, save_checkpoint
from aikd.fileio import atomic_write_bytes
from aikd.methods.buffer import PredictionBuffer
from aikd.rendezvous import leave_group


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_extra_bytes(step: Callable[[], Any]) -> tuple[int, Any]:
    """(resident bytes ``step`` adds at its peak, its result): the high-water mark is reset first, so the
    peak is this step's alone."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    except OSError as err:
        raise RuntimeError(f"cannot reset the resident high-water mark ({err}): this measure needs Linux's "
                           f"/proc/self/clear_refs") from None
    before = _status_kib("VmRSS")
    result = step()
    return (_status_kib("VmHWM") - before) * 1024, result


def _save_before(path: Path, logits: torch.Tensor) -> None:
    """The save of a whole buffer before issue 35 (src/aikd/engine/checkpoint.py at e1d4dc9): a host clone of
    every tensor, all of them serialised into one bytes object, then written."""
    tensors = {"state/0": logits.detach().cpu().contiguous().clone()}
    atomic_write_bytes(path, st_save(tensors, metadata={"aikd": "{}"}))


def measure(rows: int, classes: int, folder: Path) -> dict[str, Any]:
    """This rank's figures; every rank calls it (the saves are collectives)."""
    strategy = DataParallel(current())
    return {**_before(rows, classes, strategy, folder), **_after(rows, classes, strategy, folder)}


def _before(rows: int, classes: int, strategy: DataParallel, folder: Path) -> dict[str, Any]:
    """Every rank holds the whole buffer; rank 0 saves it by clone + serialise; a resume reads the whole file."""
    figures: dict[str, Any] = {}
    figures["whole_alloc"], whole = peak_extra_bytes(lambda: PredictionBuffer(rows, classes))
    figures["buffer_bytes"] = whole.logits.numel() * whole.logits.element_size()
    path = folder / "before.safetensors"
    if strategy.is_main:
        figures["whole_save_extra"], _ = peak_extra_bytes(lambda: _save_before(path, whole.logits))
    strategy.barrier()
    # the resume before: every rank read the whole file into bytes, and safetensors copied the tensors out of it
    figures["whole_resume_extra"], _ = peak_extra_bytes(
        lambda: whole.logits.copy_(st_load(path.read_bytes())["state/0"]))
    return figures


def _after(rows: int, classes: int, strategy: DataParallel, folder: Path) -> dict[str, Any]:
    """One shard per rank, streamed to rank 0 block by block; a resume reads its own rows of the file."""
    figures: dict[str, Any] = {}
    figures["shard_alloc"], shard = peak_extra_bytes(
        lambda: PredictionBuffer(rows, classes, strategy=strategy, step_rows=1, shard=True))
    figures["shard_bytes"] = shard.logits.numel() * shard.logits.element_size()
    path = folder / "after.safetensors"
    figures["shard_save_extra"], _ = peak_extra_bytes(lambda: save_checkpoint(
        path, {}, {}, {"buffer": shard.row_shards()["logits"]}, writer=strategy.is_main))
    strategy.barrier()
    stored = StoredRows(path, "state/0", (rows, classes))
    # the resume after: each rank copies its rows out of the memory-mapped file into its shard
    figures["shard_resume_extra"], _ = peak_extra_bytes(
        lambda: shard.logits.copy_(stored.rows(*shard.blocks.bounds(strategy.rank))))
    return figures


def main(rows: int, classes: int, out: Path) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    figures = measure(rows, classes, out.parent)  # a folder every rank sees: the files rank 0 writes are read
    everyone = DataParallel(current()).gather_objects(figures)
    if dist.get_rank() == 0:
        out.write_text(json.dumps({"rows": rows, "classes": classes, "ranks": everyone}, indent=1))
    leave_group(together=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
