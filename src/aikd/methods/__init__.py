"""Training methods, one file each; importing this package imports every module in it, which registers them all.

A new method is therefore one file here with a class registered by ``@register_method`` (and, for the
tests, a proxy config ``configs/fmnist_proxy/<name>.yaml``): nothing else in the package names it.
"""

from __future__ import annotations

import importlib
import pkgutil

from aikd.methods.base import METHODS, Batch, Method, MethodContext, StepOutput, register_method

# The order of the methods' rows in aikd report's tables (the paper's Table 2, then the methods it adds), the
# one place it is written; a method not listed follows the listed ones, by name.
# Label regularisers, then the self-KD methods by year, then the teacher-student ones, then AI-KD.
TABLE_ORDER = ("ce", "kd", "tfkd_self", "tfkd_reg", "ls", "zipfls", "ddgsd", "cskd", "pskd", "bake", "dlb", "uskd",
               "dkd", "aekt", "bss", "amkd", "aikd")


def table_rank(name: str) -> tuple[int, str]:
    """Sort key of method ``name``'s rows: its place in :data:`TABLE_ORDER`, else after them all by name."""
    return (TABLE_ORDER.index(name), "") if name in TABLE_ORDER else (len(TABLE_ORDER), name)


def _import_every_module() -> None:
    """Import each module of this package (in name order): a method's file registers it with no list to edit."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_import_every_module()

__all__ = ["METHODS", "TABLE_ORDER", "Batch", "Method", "MethodContext", "StepOutput", "register_method",
           "table_rank"]
