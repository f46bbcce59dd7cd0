"""Checkpoints that load without executing code, written atomically.

One ``.safetensors`` file holds everything: the model's weights under
``model/``, every other tensor (optimizer moments, method buffers, RNG states)
under ``state/``, and a JSON header in the file's metadata that describes the
run (config, epoch, architecture, classes) and the nesting of the state. No
pickle is involved, so a tampered file can fail to load but never run code.

Writes go to a temporary file in the same folder, are flushed and fsynced,
then renamed over the target: a crash at any moment leaves either the old or
the new checkpoint, never half of one.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from aikd.errors import CheckpointError
from aikd.fileio import atomic_write_bytes

FORMAT = "aikd-checkpoint/1"
_META_KEY = "aikd"


# ---------------------------------------------------------------- nested state <-> flat tensors

def flatten_state(tree: Any, tensors: dict[str, Tensor]) -> Any:
    """Replace every tensor in a nested structure by a reference into ``tensors``.

    Dicts with non-string keys (optimizer state is keyed by parameter number)
    and tuples are tagged so that :func:`unflatten_state` restores them exactly.
    """
    if isinstance(tree, Tensor):
        key = f"state/{len(tensors)}"
        tensors[key] = tree.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
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


def unflatten_state(tree: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__ndarray__" in tree:
        return unflatten_state(tree["__ndarray__"], tensors).numpy()
    if "__dict__" in tree:
        return {k: unflatten_state(v, tensors) for k, v in tree["__dict__"].items()}
    if "__items__" in tree:
        return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in tree["__items__"]}
    if "__tuple__" in tree:
        return tuple(unflatten_state(v, tensors) for v in tree["__tuple__"])
    raise ValueError(f"unknown node {sorted(tree)}")


# ---------------------------------------------------------------- files

@dataclass
class Checkpoint:
    """A loaded checkpoint: the model's weights, the run state and the description."""

    model: dict[str, Tensor]
    state: dict[str, Any]
    meta: dict[str, Any]
    path: Path


def save_checkpoint(path: str | Path, model_state: dict[str, Tensor], meta: dict[str, Any],
                    state: dict[str, Any] | None = None) -> Path:
    """Atomically write a checkpoint; ``state`` may hold any nest of tensors and scalars."""
    path = Path(path)
    tensors = {f"model/{k}": v.detach().cpu().contiguous().clone() for k, v in model_state.items()}
    header = dict(meta, format=FORMAT, state=flatten_state(state or {}, tensors))
    payload = st_save(tensors, metadata={_META_KEY: json.dumps(header)})
    atomic_write_bytes(path, payload)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint, with a clear error for anything that is not a whole aikd checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint '{path}' does not exist.")
    try:
        tensors = st_load(path.read_bytes())
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            raw_meta = (fh.metadata() or {}).get(_META_KEY)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
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
        state = unflatten_state(header.pop("state"), tensors)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"Checkpoint '{path}' has a damaged header: {err}.") from None
    model = {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
    return Checkpoint(model, state, header, path)


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
