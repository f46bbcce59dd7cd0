"""``model.weights=PATH``: start a model from a local timm / torchvision / aikd weights file.

Nothing is downloaded (weights cannot be fetched at run time here): the file is read from
disk, as safetensors or as a PyTorch state dict loaded with ``weights_only=True``, so no
code in it runs. The file's keys are matched to the model whichever library wrote it (a
``state_dict`` / ``model`` wrapper is unwrapped, a ``module.`` prefix from DDP stripped,
timm's and torchvision's names mapped onto aikd's wrappers). A classifier for another
number of classes is left at its initialization, as fine-tuning wants; any other weight
that is missing or has the wrong shape is refused, naming the file and the keys.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from aikd.errors import CheckpointError

CLASSIFIER_NAMES = ("fc.", "classifier.", "head.", "head.fc.", "last_linear.")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file (safetensors or a torch state dict), without executing anything."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Weights file '{path}' (model.weights) does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            with warnings.catch_warnings():  # torch's note on pickle protocols: the load is refused or not, below
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():
            raise CheckpointError(f"Cannot read weights file '{path}' (model.weights): {_first_line(err)}") from None
        # torch's message goes on to suggest weights_only=False, which would run the file's code: not relayed.
        raise CheckpointError(f"Weights file '{path}' (model.weights) holds pickled objects besides tensors, which "
                              f"aikd does not load (loading them could run code). Save the state dict alone, as "
                              f"safetensors or with torch.save(model.state_dict(), ...).") from None
    except Exception as err:  # a damaged file, another format: all refused the same way
        raise CheckpointError(f"Cannot read weights file '{path}' (model.weights): {_first_line(err)}") from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"Weights file '{path}' (model.weights) does not hold a state dict of tensors.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _first_line(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _torchvision_densenet(key: str) -> str:
    """torchvision's DenseNet ``features.*`` sit under aikd's ``features.body.*``."""
    return "features.body." + key.removeprefix("features.") if key.startswith("features.") else key


# Ways a file's key may name this model's parameter: as is (an aikd export), under aikd's timm wrapper
# (``net.``), under aikd's torchvision wrappers (``features.``, DenseNet's ``features.body.``).
MAPPINGS: tuple[Callable[[str], str], ...] = (lambda k: k, lambda k: f"net.{k}", lambda k: f"features.{k}",
                                              _torchvision_densenet)


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Initialize ``model`` from the weights file at ``path`` (see the module's docstring)."""
    source = read_state_dict(path)
    target = model.state_dict()
    best: dict[str, Tensor] = {}
    for mapping in MAPPINGS:
        mapped = {mapping(k): v for k, v in source.items()}
        fitting = {k: v for k, v in mapped.items() if k in target and target[k].shape == v.shape}
        if len(fitting) > len(best):
            best = fitting
    classifier = {k for k in target if k.removeprefix("net.").startswith(CLASSIFIER_NAMES)}
    for key in classifier - set(best):  # an aikd head is 'head.*'; timm's or torchvision's fc / classifier
        for name in CLASSIFIER_NAMES:
            suffix = key.rsplit(".", 1)[-1]
            alt = source.get(f"{name}{suffix}")
            if alt is not None and alt.shape == target[key].shape:
                best[key] = alt
                break
    missing = [k for k in target if k not in best and k not in classifier and not k.endswith("num_batches_tracked")]
    if missing or not best:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"Weights file '{path}' (model.weights) does not fit this model: "
                              f"{shown or 'no key matches'} missing or of another shape. Use weights of the same "
                              f"architecture (timm, torchvision or an aikd export).")
    skipped = sorted(classifier - set(best))
    if skipped:
        warnings.warn(f"model.weights: the file's classifier does not fit {len(target[skipped[0]])} classes; "
                      f"{', '.join(skipped)} start untrained (fine-tuning).", stacklevel=2)
    model.load_state_dict(best, strict=False)
