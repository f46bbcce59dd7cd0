"""Optional dependencies (pip extras), imported on demand: a missing one is named with its extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from aikd.errors import ConfigError

# What each optional feature imports, and the extra that installs it.
TRACKING = ("mlflow", "tracking", "tracking.backend=mlflow needs MLflow")


def missing(extra: str, feature: str) -> str:
    """The message for a missing optional dependency: what needs it, and the extra that installs it."""
    return f"{feature}: pip install 'aikd[{extra}]'"


def require(module: str, extra: str, feature: str) -> ModuleType:
    """``module``, imported; or a :class:`ConfigError` saying ``feature`` needs it and which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(missing(extra, feature)) from None
