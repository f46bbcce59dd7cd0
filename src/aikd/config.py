"""Run configuration: a typed schema, YAML files, dotted overrides, validation.

The schema is plain dataclasses whose defaults are the AI-KD paper's recipe
(Section 4.2), so a config file only states what differs from the paper. Every
value a user writes passes through :func:`build`, which rejects unknown keys
(with a suggestion) and wrong types before anything is trained.

Method hyper-parameters live in a top-level section named after the method
(``aikd.alpha_g``, ``pskd.alpha_t``); each method registers its own dataclass in
:data:`aikd.registry.METHOD_CONFIGS`, so this module imports no method.

Value ranges are checked by each section's own ``__post_init__`` (with the helpers of
:mod:`aikd.checks`), the run's sections and the methods' alike, so a dataclass built in
code is checked as one read from a file.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from aikd.checks import non_negative, positive, require
from aikd.data.settings import DataConfig
from aikd.errors import ConfigError, RenamedKeyWarning, did_you_mean
from aikd.registry import METHOD_CONFIGS

__all__ = ["DataConfig", "ModelConfig", "RunConfig", "TeacherConfig", "TrainConfig", "apply_overrides", "from_dict",
           "load_config", "read_yaml", "save_config"]


@dataclass
class ModelConfig:
    """The classifier architecture."""

    name: str = "preact_resnet18"  # a registered model, or timm/<arch> for any timm architecture
    stem: Literal["auto", "cifar", "imagenet"] = "auto"  # auto: cifar below 100 px
    # A local timm / torchvision / aikd weights file (.safetensors, or a torch state dict read without
    # running code) to start from; a classifier for another class count starts untrained.
    weights: str | None = None
    kwargs: Any = None  # keyword arguments of timm.create_model (timm models), e.g. {patch_size: 4}


@dataclass
class TrainConfig:
    """The optimisation recipe (paper 4.2: SGD Nesterov, lr 0.1, x0.1 at 50% and 75%)."""

    epochs: int = 300
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of epochs
    gamma: float = 0.1
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # auto: bf16/fp16 on CUDA, off elsewhere
    # auto: on for CUDA and CPU (small_cnn trains 1.55x faster on a 2-core CPU in channels_last), off on MPS
    channels_last: Literal["auto", "on", "off"] = "auto"
    # torch.compile everything a training step runs: the student's training forward, a frozen teacher's and
    # AI-KD's EMA / milestone / snapshot copies' forwards, and the critic's K steps with Adam's updates as one
    # region (worth it on GPUs for long runs); a model or machine it fails on falls back to eager mode with a
    # warning.
    compile: bool = False
    eval_every: int = 1
    keep_last: int = 1  # epoch checkpoints kept: last.safetensors plus keep_last - 1 older epoch-NNNN ones
    # A step whose loss is NaN or infinite: "stop" the run naming the loss term, or "skip" the step
    # (no update, counted in the summary) and stop only after max_skipped_steps of them.
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_skipped_steps: int = 100
    # Data-parallel runs (torchrun): BatchNorm statistics over the global batch instead of each
    # rank's slice (SyncBatchNorm; CUDA only). Off: each rank normalizes its slice, and the running
    # statistics are averaged over the ranks at every epoch's end.
    sync_bn: bool = False

    def __post_init__(self) -> None:
        for key in ("epochs", "lr", "eval_every", "keep_last", "max_skipped_steps"):
            positive(f"train.{key}", getattr(self, key))
        for key in ("momentum", "weight_decay", "gamma"):
            non_negative(f"train.{key}", getattr(self, key))
        for m in self.milestones:
            require(0 < m <= 1, "train.milestones", m, "holds fractions of the run in (0, 1] "
                    "(the paper's 150 and 225 of 300 epochs are 0.5 and 0.75)")


@dataclass
class TeacherConfig:
    """A pre-trained model for methods that distil from one (KD, TF-KD, AI-KD)."""

    checkpoint: str | None = None
    # Architecture of the teacher that `aikd pipeline` trains in phase 1 (None: the student's).
    model: str | None = None
    # The checkpoint's content hash, recorded by aikd when a run starts (None: not yet known). It is what
    # identifies the teacher: a run folder moved with its teacher stays the same run, the weights may not change.
    sha256: str | None = None


def same_teacher(saved: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether two configs' ``teacher`` sections name the same teacher: the same content hash where both recorded
    one (the path may have changed with a moved folder), else the same path (a run saved before hashes were kept).
    """
    if saved.get("sha256") and current.get("sha256"):
        return saved["sha256"] == current["sha256"]
    return saved.get("checkpoint") == current.get("checkpoint")


def file_sha256(path: str | Path) -> str | None:
    """The SHA-256 of a file's bytes, or None if there is no such file."""
    import hashlib

    path = Path(path).expanduser()
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def with_teacher_hash(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``teacher.sha256`` read from the checkpoint it names (unchanged without one, or once set)."""
    if cfg.teacher.checkpoint is None or cfg.teacher.sha256 is not None:
        return cfg
    digest = file_sha256(cfg.teacher.checkpoint)
    return cfg if digest is None else dataclasses.replace(
        cfg, teacher=dataclasses.replace(cfg.teacher, sha256=digest))


@dataclass
class TrackingConfig:
    """An experiment tracker that receives a copy of the run's numbers (beside metrics.jsonl and TensorBoard).

    Where a run is reported, not what it is: the section is left out of :meth:`RunConfig.to_dict`, so it never
    enters config.yaml, a checkpoint, a phase-1 cache key, or the checks that a resumed or reused run is the
    same run. Switching tracking on or off never makes a run look changed.
    """

    backend: Literal["none", "mlflow"] = "none"  # mlflow needs the extra: pip install 'aikd[tracking]'
    # MLflow tracking URI: sqlite:///runs/mlflow.db, http://host:5000, ... None: $MLFLOW_TRACKING_URI if set,
    # else MLflow's own default (sqlite:///mlflow.db in the working folder).
    uri: str | None = None
    experiment: str | None = None  # None: the dataset's name (data.name)
    run_name: str | None = None  # None: RECIPE-MODEL-seedN
    log_checkpoint: bool = True  # upload the final checkpoint (checkpoints/last.safetensors) as an artifact


# RunConfig fields that to_dict() leaves out: the method's hyper-parameters, saved under the method's name
# instead, and what does not shape the run (see TrackingConfig).
NOT_SAVED = ("hparams", "tracking")
# The metadata of a field that no config sets by its name (RunConfig.hparams: filled from the method's section).
NOT_A_KEY = {"config_key": False}


@dataclass
class RunConfig:
    """Everything one training run needs."""

    method: str = "ce"
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # The selected method's hyper-parameters (its registered dataclass, from the config's section named after
    # the method); None in a RunConfig built in code without from_dict.
    hparams: Any = field(default=None, metadata=NOT_A_KEY)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        dev = self.device
        require(dev in ("auto", "cpu", "cuda", "mps") or dev.startswith("cuda:"), "device", dev,
                "must be auto, cpu, cuda, cuda:N or mps")

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-ready form, with the selected method's section as a top-level key.

        Only the selected method has a section: other methods' settings do not shape the
        run, and a new default in one method must not make another method's saved runs look
        changed. The tracking section is left out too (:class:`TrackingConfig`).
        """
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in NOT_SAVED}
        if self.hparams is not None:
            out[self.method] = _plain(self.hparams)
        return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def method_schemas() -> dict[str, type]:
    """Each registered method's hyper-parameter dataclass (``Method.Config``), by method name.

    The schemas come from :data:`aikd.registry.METHOD_CONFIGS`, which ``register_method`` fills
    (its first lookup imports the shipped methods, see :mod:`aikd`), so this module imports no method.
    """
    return {name: METHOD_CONFIGS.get(name) for name in METHOD_CONFIGS.names()}


def _keys(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of a section that a config sets, by name."""
    return {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("config_key", True)}


# ---------------------------------------------------------------------------
# Validation


def build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and type.

    ``where`` is the dotted path of this section, used in error messages.
    """
    if isinstance(data, OverrideValue):
        data = data.parsed
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"Config section '{where}' must be a mapping of keys to values, got {data!r}."
        )
    hints = typing.get_type_hints(cls)
    fields = _keys(cls)
    kwargs = {}
    for old, value in data.items():
        key = _current_name(cls, old, data, where)
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            hint = did_you_mean(str(key), fields) or _key_elsewhere(str(key), where)
            raise ConfigError(f"Unknown config key '{path}'.{hint} Valid keys here: {', '.join(fields)}.")
        kwargs[key] = _check(hints[key], value, path)
    return cls(**kwargs)  # its __post_init__ checks the ranges (a ConfigError naming the key)


def _current_name(cls: type, key: Any, data: Mapping[str, Any], where: str) -> Any:
    """``key`` as the section names it now. A section lists its keys renamed within the last release in
    ``RENAMED_KEYS`` (old -> new); an old name is read as the new one, with a :class:`RenamedKeyWarning`."""
    new = getattr(cls, "RENAMED_KEYS", {}).get(key)
    if new is None:
        return key
    old_path, new_path = (f"{where}.{name}" if where else name for name in (key, new))
    if new in data:
        raise ConfigError(f"Config keys '{old_path}' and '{new_path}' are one setting under its old and new name; "
                          f"keep '{new_path}' only.")
    warnings.warn(f"Config key '{old_path}' is now '{new_path}'; the old name is read until the next release. "
                  f"Rename it in your config.", RenamedKeyWarning, stacklevel=2)
    return new


def _key_elsewhere(key: str, where: str) -> str:
    """' Did you mean 'data.batch_size'?' for a key that belongs to another section (or to the top level)."""
    sections = _keys(RunConfig)
    hints = typing.get_type_hints(RunConfig)
    candidates = []
    for name in sections:
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            candidates += [f"{name}.{f.name}" for f in dataclasses.fields(kind)]
        else:
            candidates.append(name)
    candidates += [f"{method}.{f.name}" for method, schema in method_schemas().items()
                   for f in dataclasses.fields(schema)]
    same = [c for c in candidates if c.rsplit(".", 1)[-1] == key and c.rpartition(".")[0] != where]
    if same:
        return f" Did you mean '{same[0]}'?" if len(same) == 1 else \
            f" Did you mean one of {', '.join(repr(c) for c in same[:4])}?"
    return did_you_mean(key, [c for c in candidates if c.rpartition(".")[0] != where])


@dataclass(frozen=True)
class OverrideValue:
    """The value of a ``KEY=VALUE`` override: the text as typed and its YAML reading.

    Which one the key gets depends on the schema: a string option takes the text
    (``train.channels_last=on`` is "on", not YAML 1.1's True; ``model.name=1.10`` stays
    "1.10"), every other option the YAML value (numbers, booleans, lists, null).
    """

    text: str
    parsed: Any


def _wants_text(hint: Any) -> bool:
    if hint is str:
        return True
    if typing.get_origin(hint) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(hint))
    return False


def _value(value: Any, hint: Any) -> Any:
    """Resolve an :class:`OverrideValue` against the type the schema expects (other values pass through)."""
    if not isinstance(value, OverrideValue):
        return value
    if typing.get_origin(hint) in (Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value.parsed is None and len(options) < len(typing.get_args(hint)):
            return None
        return value.text if any(_wants_text(a) for a in options) else value.parsed
    return value.text if _wants_text(hint) else value.parsed


def _check(hint: Any, value: Any, path: str) -> Any:
    """``value`` checked against the schema type ``hint`` (and converted: an int for a float key becomes a float)."""
    check = _checker(hint)
    if check is None:
        raise TypeError(f"unsupported schema type {hint!r} at {path}")  # a bug in a schema
    return check(hint, _value(value, hint), path)


def _checker(hint: Any) -> Any:
    """The function that checks values of type ``hint``, called as ``check(hint, value, path)``; None for a type
    no schema may use."""
    if dataclasses.is_dataclass(hint):
        return build
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return _check_union
    if origin is Literal:
        return _check_literal
    if origin is list:
        return _check_list
    return _SCALARS.get(hint)


def _check_union(hint: Any, value: Any, path: str) -> Any:
    options = typing.get_args(hint)
    if value is None and type(None) in options:
        return None
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return _check(option, value, path)
        except ConfigError as err:
            errors.append(str(err))
    raise ConfigError(errors[0]) if len(errors) == 1 else _type_error(path, hint, value)


def _check_literal(hint: Any, value: Any, path: str) -> Any:
    allowed = typing.get_args(hint)
    if isinstance(value, bool) and {"on", "off"} <= set(allowed):  # YAML 1.1 reads on/off as booleans
        value = "on" if value else "off"
    if value not in allowed:
        raise ConfigError(
            f"Config key '{path}' must be one of {', '.join(map(repr, allowed))}, "
            f"got {value!r}.{did_you_mean(str(value), map(str, allowed))}"
        )
    return value


def _check_list(hint: Any, value: Any, path: str) -> list[Any]:
    (item,) = typing.get_args(hint)
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise _type_error(path, hint, value)
    return [_check(item, v, f"{path}[{i}]") for i, v in enumerate(value)]


def _check_any(hint: Any, value: Any, path: str) -> Any:
    return value


def _check_bool(hint: Any, value: Any, path: str) -> bool:
    if isinstance(value, bool):
        return value
    raise _type_error(path, hint, value)


def _check_int(hint: Any, value: Any, path: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _type_error(path, hint, value)


def _check_float(hint: Any, value: Any, path: str) -> float:
    if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            raise _type_error(path, hint, value) from None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _type_error(path, hint, value)
    try:
        number = float(value)
    except OverflowError:  # an int beyond the float range
        number = math.inf
    require(math.isfinite(number), path, number, "must be a finite number")
    return number


def _check_str(hint: Any, value: Any, path: str) -> str:
    if isinstance(value, str):
        return value
    raise _type_error(path, hint, value)


_SCALARS = {Any: _check_any, bool: _check_bool, int: _check_int, float: _check_float, str: _check_str}


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def _type_error(path: str, hint: Any, value: Any) -> ConfigError:
    return ConfigError(
        f"Config key '{path}' expects {_type_name(hint)}, got {value!r} "
        f"({type(value).__name__})."
    )


def from_dict(data: Mapping[str, Any], source: str = "config") -> RunConfig:
    """Validate a plain mapping (a parsed YAML file plus overrides) into a RunConfig.

    Everything a run will use is checked here, before any data is read or any model built:
    keys, types, value ranges (each section's, a method's too, in its dataclass's ``__post_init__``),
    and the names of the method, model, teacher model and dataset against their registries.

    Only the selected method's section is kept (its defaults where the mapping has none). A section
    named after another registered method is checked with that method's schema, so a typo there is
    caught, and then dropped: a sweep applies its overrides and ``--grid`` to every config it runs,
    whichever method each one trains.
    """
    data = dict(data)
    method = _value(data.get("method", "ce"), str)
    if not isinstance(method, str):
        raise ConfigError(f"Config key 'method' must be a method name, got {method!r}.")
    names = METHOD_CONFIGS.names()
    if method not in METHOD_CONFIGS:
        raise ConfigError(
            f"Unknown method '{method}' (config key 'method' in {source})."
            f"{did_you_mean(method, names)} Available: {', '.join(names)}."
        )
    data["method"] = method
    for key in ("methods", "hparams"):  # filled from the method's section below, not settable themselves
        if key in data:
            raise ConfigError(
                f"Config key '{key}' cannot be set (in {source}): method hyper-parameters go in a "
                f"top-level section named after the method, for example '{method}:'."
            )
    hparams = build(METHOD_CONFIGS.get(method), data.pop(method, None), method)
    for name in names:
        if name in data:  # another method's section: checked, not kept
            build(METHOD_CONFIGS.get(name), data.pop(name), name)
    cfg = build(RunConfig, data, "")
    cfg.hparams = hparams
    _check_names(cfg)
    _check_tracking(cfg)
    return cfg


def _check_tracking(cfg: RunConfig) -> None:
    """A tracker's package must be importable, so a run (or a pipeline's phase 1) never trains before it fails."""
    if cfg.tracking.backend == "mlflow":
        from aikd.extras import TRACKING, require

        require(*TRACKING)


def _check_names(cfg: RunConfig) -> None:
    """The dataset, model and teacher model must be registered (each lookup names the key and the choices)."""
    from aikd.catalog import datasets, models

    datasets().get(cfg.data.name)
    for key, name in (("model.name", cfg.model.name), ("teacher.model", cfg.teacher.model)):
        if name is None:
            continue
        if name.startswith("timm/"):
            from aikd.models.timm_nets import check_timm_name

            check_timm_name(name, key)
        else:
            models().get(name, key)
    if cfg.model.kwargs is not None and not isinstance(cfg.model.kwargs, dict):
        raise ConfigError(f"Config key 'model.kwargs' is a mapping of timm.create_model arguments, "
                          f"got {cfg.model.kwargs!r}.")
    if cfg.model.weights is not None and not Path(cfg.model.weights).expanduser().is_file():
        raise ConfigError(f"Config key 'model.weights': file '{cfg.model.weights}' does not exist.")


# ---------------------------------------------------------------------------
# Files and overrides


# What PyYAML's safe loader raises, besides YAMLError, for scalars it cannot build
# (dates like 2020-13-45, '!!float abc', '!!bool maybe', ints too long to convert).
_YAML_VALUE_ERRORS = (ValueError, KeyError, AttributeError, TypeError)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (a file, or a shipped config's name), turning every failure into a message naming the
    file."""
    from aikd.shipped import resolve_config

    path = resolve_config(path)  # a shipped config by name, where no such file exists
    if path.is_dir():
        raise ConfigError(f"Config '{path}' is a folder; give one of its YAML files, for example "
                          f"'{next(iter(sorted(path.rglob('*.yaml'))), path / 'ce.yaml')}'.")
    try:
        text = path.read_text()
    except (UnicodeDecodeError, OSError) as err:  # a binary file, or unreadable
        raise ConfigError(f"Config file '{path}' cannot be read as a YAML text file: {err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"Config file '{path}' is not valid YAML{line}: {problem}.") from None
    except _YAML_VALUE_ERRORS as err:  # a scalar PyYAML cannot build, e.g. the date 2020-13-45
        raise ConfigError(f"Config file '{path}' is not valid YAML: a value cannot be read "
                          f"({type(err).__name__}: {err}).") from None
    if data is None or data == {}:  # an empty file would train the defaults without a word
        raise ConfigError(f"Config file '{path}' is empty; a config names at least its method, data and model "
                          f"(see configs/ for examples).")
    if not isinstance(data, dict):
        raise ConfigError(f"Config file '{path}' must hold a mapping of keys, got {type(data).__name__}.")
    return data


def parse_override(text: str) -> tuple[list[str], OverrideValue]:
    """Split ``a.b.c=value`` into its key path and its value (text and YAML reading, see :class:`OverrideValue`)."""
    if "=" not in text:
        raise ConfigError(
            f"Override '{text}' must look like KEY=VALUE, for example train.epochs=2."
        )
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"Override '{text}' has an empty key part.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except (yaml.YAMLError, *_YAML_VALUE_ERRORS):
        value = raw
    return parts, OverrideValue(raw.strip(), value)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``KEY=VALUE`` override set."""
    import copy

    data = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if isinstance(child, OverrideValue) and isinstance(child.parsed, dict):  # an earlier a={...}
                child = node[part] = child.parsed
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(
                    f"Override '{text}': '{'.'.join(parts[: i + 1])}' is a value, not a section."
                )
            node = child
        node[parts[-1]] = value
    return data


def from_saved(data: Mapping[str, Any], source: str = "saved config") -> RunConfig:
    """:func:`from_dict` for a run's saved config.yaml, whose keys keep the names of the version that wrote it:
    renamed keys are read without a :class:`RenamedKeyWarning` (nobody is to rename them there)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RenamedKeyWarning)
        return from_dict(data, source)


def normalized(data: Mapping[str, Any]) -> dict[str, Any] | None:
    """A saved config in today's canonical form (new keys at their defaults), or None if it no longer validates."""
    try:
        return from_saved(data).to_dict()
    except ConfigError:
        return None


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML config (or start from the defaults), apply overrides, validate."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    return from_dict(data, source=str(path) if path else "overrides")


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def recipe_name(config_path: str | Path | None, model_name: str, method: str) -> str:
    """The label of a run in reports: the config file's name without the model suffix.

    ``configs/cifar100/aikd_no_adv_preact_resnet18.yaml`` -> ``aikd_no_adv``, because
    reports put the model in the column; without a file, the method's name.
    """
    if config_path is None:
        return method
    stem = Path(config_path).stem
    suffix = f"_{model_name}"
    return stem[: -len(suffix)] if stem.endswith(suffix) and len(stem) > len(suffix) else stem
