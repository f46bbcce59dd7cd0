"""Taps: tensors from inside a model (a layer's output, the map before global pooling), caught by forward hooks.

A method that needs more than the logits (Zipf's label smoothing ranks the classes of the pre-pool map;
USKD's weak head reads an intermediate stage) hooks the *bare* student it is given at construction
(``MethodContext.student``). The hook belongs to that module, so it fires however the module is called: by
the loop through a DDP or ``torch.compile`` wrapper (Dynamo traces the hook into the graph and returns the
caught tensor as one more output: no graph break, tests/test_taps.py), or by a user's own loop.

A tap catches only while armed, inside :meth:`Tap.capture`, so evaluation's forwards and any other call of
the model store nothing; :meth:`Tap.take` hands the tensor over and forgets it. A tap therefore holds a
tensor only between a training forward and its loss, never across steps.

    tap = Tap(find_module(model, "features.layers.5"))
    with tap.capture():
        logits = model(images)
    feature_map = tap.take()

The tap is a plain object (not a module): the methods that own one keep no reference to the student in
their ``state_dict()``. A deep copy of the model (an EMA teacher) copies its hooks with their own taps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from aikd.errors import ConfigError, did_you_mean
from aikd.models.base import Classifier, GlobalAvgPool

__all__ = ["Tap", "find_module", "global_pool", "head_of", "module_names", "output_channels", "pooled"]

SHOWN_NAMES = 60  # module names a ConfigError lists before counting the rest


class Tap:
    """Catches the output (or, with ``input=True``, the first input) of ``module`` while armed."""

    def __init__(self, module: nn.Module, input: bool = False) -> None:
        self.module, self.input = module, input
        self.armed = False
        self.value: Tensor | None = None
        self.handle = module.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.armed:
            self.value = args[0] if self.input else output  # a later call of the module overwrites it

    @contextlib.contextmanager
    def capture(self) -> Iterator[Tap]:
        """Arm the tap for the forward passes inside the block; the last one's tensor is kept for :meth:`take`."""
        self.value, self.armed = None, True
        try:
            yield self
        finally:
            self.armed = False

    def take(self) -> Tensor:
        """The tensor caught by the last forward of the last :meth:`capture` block; the tap forgets it."""
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("Tap.take(): no forward pass of the model reached the tapped module inside "
                               "`with tap.capture():`.")
        return value

    def remove(self) -> None:
        """Take the hook off the module."""
        self.handle.remove()

    def __getstate__(self) -> dict[str, Any]:  # a pickled model (torch.save(model)) carries no caught tensor
        return {**self.__dict__, "value": None, "armed": False}


def module_names(model: nn.Module) -> list[str]:
    """The names of ``model``'s modules, as ``find_module`` takes them (``model.named_modules()``, root left out)."""
    return [name for name, _ in model.named_modules() if name]


def describe_names(model: nn.Module) -> str:
    names = module_names(model)
    shown = ", ".join(names[:SHOWN_NAMES])
    more = f" ... and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else ""
    return f"{shown}{more}"


def find_module(model: nn.Module, name: str, key: str) -> nn.Module:
    """The sub-module ``name`` of ``model``, or a ConfigError naming the config ``key``, the value and the choices."""
    modules = dict(model.named_modules())
    if name and name in modules:
        return modules[name]
    raise ConfigError(f"Config key '{key}': {type(model).__name__} has no module '{name}'."
                      f"{did_you_mean(name, modules)} Its modules: {describe_names(model)}.")


def model_label(model: nn.Module) -> str:
    """A short name of the architecture for messages: timm's arch name, else the classes of model and features."""
    net = getattr(model, "net", None)
    arch = getattr(getattr(net, "pretrained_cfg", None), "get", lambda *_: None)("architecture")
    if arch:
        return f"timm/{arch}"
    features = getattr(model, "features", None)
    return f"{type(model).__name__}({type(features).__name__})" if features is not None else type(model).__name__


def global_pool(model: nn.Module) -> nn.Module | None:
    """The model's :class:`~aikd.models.base.GlobalAvgPool` (whose input is the pre-pool map), or None.

    aikd's preact_resnet18, resnet18 and densenet121 have exactly one; small_cnn (flatten + FC) and timm
    models have none. A model with several is refused: which map is meant is for the user to say.
    """
    pools = [name for name, m in model.named_modules() if isinstance(m, GlobalAvgPool)]
    if len(pools) > 1:
        raise ConfigError(f"{model_label(model)} has {len(pools)} GlobalAvgPool layers ({', '.join(pools)}): name "
                          "the module whose output is the map before the global pooling of the logits.")
    return dict(model.named_modules())[pools[0]] if pools else None


def head_of(model: nn.Module) -> nn.Linear:
    """The linear layer that maps pooled features to logits: ``model.head`` (aikd's models), timm's classifier,
    or torchvision's ``fc`` / ``classifier``."""
    net = getattr(model, "net", None)
    candidates = [getattr(model, name, None) for name in ("head", "fc", "classifier")]
    if hasattr(net, "get_classifier"):
        candidates.append(net.get_classifier())
    head = next((m for m in candidates if isinstance(m, nn.Linear)), None)
    if head is None:
        raise ConfigError(f"{model_label(model)}: no linear classifier head found (model.head, fc, classifier or "
                          "timm's get_classifier()) to apply at every location of a feature map.")
    return head


def pooled(features: Tensor) -> Tensor:
    """A caught tensor as one vector per sample: (N, C, H, W) -> spatial mean, (N, L, C) tokens -> mean, (N, C)
    as it is."""
    if features.ndim == 4:
        return features.mean((2, 3))
    if features.ndim == 3:
        return features.mean(1)
    if features.ndim == 2:
        return features
    raise ConfigError(f"A tapped tensor of shape {tuple(features.shape)} cannot be pooled to one vector per "
                      "sample: tap a module whose output is (N, C, H, W), (N, tokens, C) or (N, C).")


class _Reached(Exception):
    """Stops a probing forward pass once the tapped module has run."""


def output_channels(model: nn.Module, module: nn.Module, image_size: int = 32) -> int:
    """The length of ``pooled(module's output)``, found by one forward pass of a blank batch that stops there.

    The pass runs in eval mode under no_grad (BatchNorm's statistics do not move) on two ``image_size``
    images with the model's input channels (its first convolution's); a layer after the tapped one never
    runs, so small_cnn's flatten, which needs its own image size, is never reached.
    """
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first_conv is None:
        raise ConfigError(f"{model_label(model)}: cannot infer the tapped layer's width (no convolution gives the "
                          "input channels); set the method's `channels` key.")
    device = next(model.parameters()).device
    caught: list[Tensor] = []

    def stop(_: nn.Module, __: Any, output: Any) -> None:
        caught.append(output)
        raise _Reached

    handle = module.register_forward_hook(stop)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(2, first_conv.in_channels, image_size, image_size, device=device))
    except _Reached:
        pass
    except (RuntimeError, AssertionError, ValueError) as err:
        raise ConfigError(f"{model_label(model)}: a probing forward pass on {image_size}-pixel images failed "
                          f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); set the method's "
                          "`channels` key to the tapped layer's width.") from None
    finally:
        handle.remove()
        model.train(was_training)
    if not caught:
        raise ConfigError(f"{model_label(model)}: the tapped module never ran in a forward pass; choose a module "
                          f"the forward pass calls. Its modules: {describe_names(model)}.")
    return pooled(caught[0]).shape[1]


def is_flattening_classifier(model: nn.Module) -> bool:
    """aikd's own model without global pooling (small_cnn: a ``features`` Sequential that flattens the last map)."""
    return isinstance(model, Classifier) and isinstance(model.features, nn.Sequential) and any(
        isinstance(m, nn.Flatten) for m in model.features)
