"""Range checks for config dataclasses, called from their ``__post_init__``.

Types are checked by :func:`aikd.config.build`; what a type cannot say (a positive learning rate,
a weight in [0, 1]) each section's dataclass checks itself when it is built, so a bad value stops
the run when the config is read, before any data is loaded. The run's own sections
(:class:`aikd.config.TrainConfig`, :class:`aikd.data.settings.DataConfig`) and every method's
hyper-parameters use the same helpers; :mod:`aikd.methods.base` re-exports them.
"""

from __future__ import annotations

from typing import Any

from aikd.errors import ConfigError

__all__ = ["non_negative", "positive", "positive_or_null", "require", "weight"]


def require(ok: bool, key: str, value: Any, rule: str) -> None:
    """Refuse a value out of its range, naming the config key: "Config key 'KEY' RULE, got VALUE."."""
    if not ok:
        raise ConfigError(f"Config key '{key}' {rule}, got {value!r}.")


def positive(key: str, value: float) -> None:
    require(value > 0, key, value, "must be positive")


def positive_or_null(key: str, value: float | None) -> None:
    require(value is None or value > 0, key, value, "must be positive or null")


def non_negative(key: str, value: float) -> None:
    require(value >= 0, key, value, "must be >= 0")


def weight(key: str, value: float) -> None:
    require(0 <= value <= 1, key, value, "is a weight in [0, 1]")
