"""The package's layers: no import circle (TYPE_CHECKING imports counted), and the edges that must not exist."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "import_graph.py"


@pytest.fixture(scope="module")
def edges() -> dict[str, set[str]]:
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.graph(), module


def reaches(edges: dict[str, set[str]], start: str, prefix: str) -> bool:
    """Whether ``start`` imports, directly or through others, a module under ``prefix``."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        for target in edges.get(name, ()):
            if target == prefix or target.startswith(prefix + "."):
                return True
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return False


def test_no_import_circle(edges):
    graph, module = edges
    assert module.circles(graph) == []


def test_type_checking_imports_count(edges, tmp_path):
    _, module = edges
    import ast

    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from aikd.config import RunConfig\n")
    assert "aikd.config" in module.imported(tree, "aikd.data.loaders", False)


@pytest.mark.parametrize(("lower", "upper"), [
    ("aikd.engine", "aikd.report"), ("aikd.evaluation", "aikd.report"), ("aikd.distributed", "aikd.data"),
    ("aikd.strategy", "aikd.distributed"), ("aikd.methods.base", "aikd.distributed"),
    ("aikd.config", "aikd.engine"), ("aikd.data", "aikd.config"), ("aikd.report", "aikd.engine"),
    ("aikd.report", "aikd.evaluation"),
])
def test_a_lower_layer_never_imports_a_higher_one(edges, lower, upper):
    graph, _ = edges
    starts = [name for name in graph if name == lower or name.startswith(lower + ".")]
    assert starts and not [s for s in starts if reaches(graph, s, upper)]
