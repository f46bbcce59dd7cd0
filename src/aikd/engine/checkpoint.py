"""Checkpoints that load without executing code, written atomically.

One ``.safetensors`` file holds everything: the model's weights under
``model/``, every other tensor (optimizer moments, method buffers, RNG states)
under ``state/``, and a JSON header in the file's metadata that describes the
run (config, epoch, architecture, classes) and the nesting of the state. No
pickle is involved, so a tampered file can fail to load but never run code.

Writes go to a temporary file in the same folder, are flushed and fsynced,
then renamed over the target: a crash at any moment leaves either the old or
the new checkpoint, never half of one. The file is streamed tensor by tensor
(:class:`SafetensorsStream`), and read tensor by tensor from a memory map; a
tensor split by rows over a run's ranks (the prediction buffer) is written
whole, as its owners send their blocks, and read back by rows, so a run
resumes with any number of processes.
"""

from __future__ import annotations

import json
import math
import random
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from aikd.errors import CheckpointError
from aikd.fileio import atomic_write_bytes as atomic_write_bytes  # re-exported: the engine imports it from here
from aikd.fileio import atomic_write_stream
from aikd.shards import RowShard

FORMAT = "aikd-checkpoint/1"
_META_KEY = "aikd"


# ---------------------------------------------------------------- nested state <-> flat tensors

def flatten_state(tree: Any, tensors: dict[str, Any]) -> Any:
    """Replace every tensor in a nested structure by a reference into ``tensors``.

    Dicts with non-string keys (optimizer state is keyed by parameter number)
    and tuples are tagged so that :func:`unflatten_state` restores them exactly.
    """
    if isinstance(tree, Tensor):
        key = f"state/{len(tensors)}"
        tensors[key] = tree.detach()  # written as it is, when the file is streamed
        return {"__tensor__": key}
    if isinstance(tree, RowShard):  # one rank's block: the file holds the whole tensor
        key = f"state/{len(tensors)}"
        tensors[key] = tree
        return {"__rows__": key}
    if isinstance(tree, np.ndarray):
        return {"__ndarray__": flatten_state(torch.from_numpy(tree.copy()), tensors)}
    if isinstance(tree, dict):
        if all(isinstance(k, str) for k in tree):
            return {"__dict__": {k: flatten_state(v, tensors) for k, v in tree.items()}}
        return {"__items__": [[flatten_state(k, tensors), flatten_state(v, tensors)]
                              for k, v in tree.items()]}
    if isinstance(tree, tuple):
        return {"__tuple__": [flatten_state(v, tensors) for v in tree]}
    if isinstance(tree, list):
        return [flatten_state(v, tensors) for v in tree]
    if isinstance(tree, np.integer | np.floating):
        return tree.item()
    if tree is None or isinstance(tree, bool | int | float | str):
        return tree
    raise TypeError(f"cannot checkpoint a value of type {type(tree).__name__}")


def unflatten_state(tree: Any, tensors: Mapping[str, Tensor], rows: Mapping[str, Any] | None = None) -> Any:
    """The nested structure :func:`flatten_state` described, its tensors taken from ``tensors``; a tensor saved
    split by rows from ``rows`` where given (a :class:`StoredRows` to read a rank's rows from), else whole."""
    if isinstance(tree, list):
        return [unflatten_state(v, tensors, rows) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__rows__" in tree:
        return (rows if rows is not None else tensors)[tree["__rows__"]]
    if "__ndarray__" in tree:
        return unflatten_state(tree["__ndarray__"], tensors, rows).numpy()
    if "__dict__" in tree:
        return {k: unflatten_state(v, tensors, rows) for k, v in tree["__dict__"].items()}
    if "__items__" in tree:
        return {unflatten_state(k, tensors, rows): unflatten_state(v, tensors, rows) for k, v in tree["__items__"]}
    if "__tuple__" in tree:
        return tuple(unflatten_state(v, tensors, rows) for v in tree["__tuple__"])
    raise ValueError(f"unknown node {sorted(tree)}")


# ---------------------------------------------------------------- files

@dataclass
class Checkpoint:
    """A loaded checkpoint: the model's weights, the run state and the description."""

    model: dict[str, Tensor]
    state: dict[str, Any]
    meta: dict[str, Any]
    path: Path


@dataclass(frozen=True)
class StoredRows:
    """A tensor of a checkpoint file not read yet: a resume reads only the rows its rank owns
    (:meth:`rows`, from the memory-mapped file), where the whole tensor would cost every rank a copy."""

    path: Path
    key: str
    shape: tuple[int, ...]

    def rows(self, start: int, stop: int) -> Tensor:
        """Rows ``[start, stop)``: a view of the file's private (copy-on-write) memory map, whose pages are
        read as they are touched; copy what is kept (a buffer copies them into its own rows)."""
        with safe_open(str(self.path), framework="pt") as fh:
            return fh.get_slice(self.key)[start:stop]

    def load(self) -> Tensor:
        return self.rows(0, self.shape[0])


@dataclass(frozen=True)
class CheckpointHeader:
    """What a checkpoint says about itself without reading its tensors: the description (``meta``), the
    state's nesting with references to tensors (``tree``), and each tensor's dtype and shape."""

    path: Path
    meta: dict[str, Any]
    tree: Any
    tensors: dict[str, dict[str, Any]]

    def outline(self) -> dict[str, Any]:
        """The run state with every tensor an empty placeholder: its counters and nesting, for choosing a
        checkpoint among several (``--resume auto``) without reading one byte of tensor data."""
        return unflatten_state(self.tree, _Placeholders()) or {}


class _Placeholders(dict):
    def __missing__(self, key: str) -> Tensor:
        return torch.empty(0)


_MAX_HEADER = 100 * 2**20  # safetensors' own bound on the JSON header


def read_header(path: str | Path) -> CheckpointHeader:
    """The header of a checkpoint, checked to describe a whole file: its tensors' data must end exactly where
    the file does, so a truncated copy or a write cut short is refused here, before any tensor is read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint '{path}' does not exist.")
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError(f"{size} bytes, shorter than a safetensors header")
            length = struct.unpack("<Q", head)[0]
            if length > min(size - 8, _MAX_HEADER):
                raise ValueError(f"a header of {length} bytes in a file of {size}")
            entries = json.loads(fh.read(length))
        if not isinstance(entries, dict):
            raise ValueError("the header is not a JSON object")
        tensors = {k: v for k, v in entries.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        if 8 + length + end != size:
            raise ValueError(f"its tensors end at byte {8 + length + end}, the file at byte {size}")
        raw_meta = (entries.get("__metadata__") or {}).get(_META_KEY)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise CheckpointError(
            f"Checkpoint '{path}' is truncated or is not a safetensors file ({err}). "
            f"Use an earlier checkpoint or retrain."
        ) from None
    if raw_meta is None:
        raise CheckpointError(f"'{path}' is a safetensors file but not an aikd checkpoint "
                              f"(no '{_META_KEY}' metadata).")
    try:
        header = json.loads(raw_meta)
        if header.get("format") != FORMAT:
            raise ValueError(f"format {header.get('format')!r}, expected {FORMAT!r}")
        tree = header.pop("state")
        missing = sorted(set(_references(tree)) - set(tensors))
        if missing:
            raise KeyError(f"the state refers to tensors the file does not hold: {', '.join(missing[:5])}")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"Checkpoint '{path}' has a damaged header: {err}.") from None
    return CheckpointHeader(path, header, tree, tensors)


def _references(tree: Any) -> list[str]:
    """Every tensor key the nested state refers to."""
    if isinstance(tree, list):
        return [key for v in tree for key in _references(v)]
    if not isinstance(tree, dict):
        return []
    if "__tensor__" in tree or "__rows__" in tree:
        return [tree.get("__tensor__") or tree["__rows__"]]
    return [key for v in tree.values() for key in _references(v)]


def save_checkpoint(path: str | Path, model_state: dict[str, Tensor], meta: dict[str, Any],
                    state: dict[str, Any] | None = None, writer: bool = True) -> Path:
    """Atomically write a checkpoint; ``state`` may hold any nest of tensors and scalars, and
    :class:`~aikd.shards.RowShard` blocks of tensors split over the ranks.

    The file is streamed: its header is computed from the tensors' shapes, then each tensor's bytes are
    written in turn (a GPU tensor copied to the host one at a time), and a split tensor block by block as
    every rank sends its own (``writer=False``: this rank writes nothing and sends its blocks; every rank
    of a run with split tensors calls this, in the same order). Rank 0 never holds more than its state and
    one other rank's block; the old way (clone everything, serialise, write) held the state three times.
    """
    path = Path(path)
    tensors: dict[str, Tensor | RowShard] = {f"model/{k}": v.detach() for k, v in model_state.items()}
    header = dict(meta, format=FORMAT, state=flatten_state(state or {}, tensors))
    stream = SafetensorsStream(tensors, {_META_KEY: json.dumps(header)})
    if not writer:
        stream.send()
        return path
    try:
        atomic_write_stream(path, stream.write, stream.size)
    finally:
        stream.drain()  # after a failed write the other ranks still wait to send their blocks
    return path


def abandon_checkpoint(state: dict[str, Any] | None) -> None:
    """On the writing rank, when it gives up before :func:`save_checkpoint`: take and drop the blocks the other
    ranks are about to send for ``state``, so that none of them waits forever to send its own."""
    tensors: dict[str, Tensor | RowShard] = {}
    flatten_state(state or {}, tensors)
    SafetensorsStream(tensors, {}).drain()


def load_checkpoint(path: str | Path, lazy_rows: bool = False) -> Checkpoint:
    """Read a checkpoint, with a clear error for anything that is not a whole aikd checkpoint.

    The file is memory-mapped and each tensor read on its own, never the whole file at once.
    ``lazy_rows``: tensors saved split by rows (a sharded prediction buffer) come back as
    :class:`StoredRows`, from which a resuming rank reads its own rows alone.
    """
    header = read_header(path)
    path = header.path
    try:
        with safe_open(str(path), framework="pt") as fh:
            stored = {key: StoredRows(path, key, tuple(info["shape"])) for key, info in header.tensors.items()}
            tensors = _Reader(fh)
            state = unflatten_state(header.tree, tensors, stored if lazy_rows else None)
            model = {k.removeprefix("model/"): tensors[k] for k in header.tensors if k.startswith("model/")}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(
            f"Checkpoint '{path}' is truncated or is not a safetensors file ({err}). "
            f"Use an earlier checkpoint or retrain."
        ) from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"Checkpoint '{path}' has a damaged header: {err}.") from None
    return Checkpoint(model, state, header.meta, path)


class _Reader(dict):
    """The tensors of an open file, each read when the state first refers to it, into memory of its own: a view
    of the memory map would keep the file (or, once a newer checkpoint replaced it, its disk space) for as long
    as the tensor lives, which for optimizer moments is the whole run."""

    def __init__(self, handle: Any) -> None:
        super().__init__()
        self.handle = handle

    def __missing__(self, key: str) -> Tensor:
        self[key] = value = self.handle.get_tensor(key).clone()
        return value


# ---------------------------------------------------------------- the streamed safetensors file

# safetensors' dtype names, in the order its own writer places tensors (larger enum value first, then by name);
# followed here so that a streamed file is byte for byte the one ``safetensors.torch.save`` makes.
_DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32", torch.float64: "F64",
    torch.int64: "I64", torch.uint64: "U64",
}
_DTYPE_ORDER = {dtype: i for i, dtype in enumerate(_DTYPES)}


class SafetensorsStream:
    """An ordinary safetensors file written tensor by tensor: the header from shapes and dtypes alone, then
    each tensor's bytes, those of a :class:`~aikd.shards.RowShard` block by block from its owners."""

    def __init__(self, tensors: dict[str, Tensor | RowShard], metadata: dict[str, str]) -> None:
        for key, tensor in tensors.items():
            if tensor.dtype not in _DTYPES:
                raise TypeError(f"cannot checkpoint '{key}': safetensors has no dtype {tensor.dtype}")
        self.order = sorted(tensors.items(), key=lambda item: (-_DTYPE_ORDER[item[1].dtype], item[0]))
        entries: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        for key, tensor in self.order:
            shape = list(tensor.shape)
            end = offset + math.prod(shape) * tensor.dtype.itemsize
            entries[key] = {"dtype": _DTYPES[tensor.dtype], "shape": shape, "data_offsets": [offset, end]}
            offset = end
        text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        self.header = struct.pack("<Q", len(text)) + text
        self.size = len(self.header) + offset
        self.pending = [t for _, t in self.order if isinstance(t, RowShard)]  # blocks other ranks will send

    def write(self, fh: BinaryIO) -> None:
        fh.write(self.header)
        for _, tensor in self.order:
            if isinstance(tensor, RowShard):
                self._write_blocks(fh, tensor)
            else:
                _write(fh, tensor)

    def _write_blocks(self, fh: BinaryIO, shard: RowShard) -> None:
        """Every block of ``shard`` as it arrives; a failed write still takes the remaining blocks, so that
        no rank waits forever to send its own, and then raises."""
        self.pending.remove(shard)
        failed: list[OSError] = []

        def visit(block: Tensor) -> None:
            if not failed:
                try:
                    _write(fh, block)
                except OSError as err:
                    failed.append(err)

        shard.strategy.shards_to_main(shard.local, shard.blocks.sizes(), visit)
        if failed:
            raise failed[0]

    def send(self) -> None:
        """On a rank that does not write: send this rank's block of every split tensor, in the file's order."""
        for shard in self.pending:
            shard.strategy.shards_to_main(shard.local, shard.blocks.sizes(), None)
        self.pending = []

    def drain(self) -> None:
        """Receive and drop the blocks a failed write did not reach, so that no rank waits forever to send."""
        for shard in self.pending:
            shard.strategy.shards_to_main(shard.local, shard.blocks.sizes(), lambda block: None)
        self.pending = []


def _write(fh: BinaryIO, tensor: Tensor) -> None:
    """A tensor's bytes, little-endian and row-major as safetensors stores them (a GPU tensor via one host copy)."""
    host = tensor.detach().contiguous().cpu()
    fh.write(host.reshape(-1).view(torch.uint8).numpy().data)


# ---------------------------------------------------------------- random number generators

def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's global RNGs in checkpointable form: Python, NumPy, torch's CPU stream and, when
    ``device`` is a GPU, that GPU's stream alone (a rank drives one GPU; the others' streams are not its own,
    and saving them would tie the checkpoint to the number of visible GPUs)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> str | None:
    """Restore what :func:`rng_state` saved; returns why the GPU stream was not restored, None when it was
    (or when neither side has one), so the caller can warn instead of crash."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    saved, here = state.get("cuda"), device is not None and device.type == "cuda"
    if isinstance(saved, list):  # checkpoints before aikd saved one GPU's stream: every visible GPU's
        index = (device.index or 0) if here else 0
        saved = saved[index] if index < len(saved) else None
    if saved is None and not here:
        return None
    if saved is None:
        return "the checkpoint holds no CUDA random stream for this GPU (it was written without one)"
    if not here:
        return "the checkpoint holds a CUDA random stream and this run has no GPU"
    torch.cuda.set_rng_state(saved, device)
    return None
