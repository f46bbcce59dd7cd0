"""The built-in registries, for code that must look names up without importing their modules at load time.

Methods, models and datasets register themselves next to their definitions
(``@register_method``, ``MODELS.register``, ``DATASETS.register``). These accessors
import the defining packages on first use, which runs every registration, and return
the filled registries. Config validation looks models and datasets up here; it finds
the methods' hyper-parameter schemas in :data:`aikd.registry.METHOD_CONFIGS` instead
(its first lookup imports the shipped methods, see :mod:`aikd`), so it never imports a method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aikd.registry import Registry


def models() -> Registry[Any]:
    from aikd.models import MODELS

    return MODELS


def datasets() -> Registry[Any]:
    from aikd.data.readers import DATASETS

    return DATASETS
