"""List which aikd modules import which, and every import circle among them (there should be none).

Imports inside functions count too (they run when the function does), and so do imports under
``if TYPE_CHECKING:``: they never run, but a type named across layers ties them as much as a call.
Importing ``aikd.a.b`` first imports the package ``aikd.a``, so that edge is followed as well, except
from modules inside ``aikd.a`` (a package's own modules load while it initialises).

    .venv/bin/python scripts/import_graph.py            # the circles, or "no import circle"
    .venv/bin/python scripts/import_graph.py --edges    # and every module's aikd imports
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, here: str, is_package: bool) -> set[str]:
    """aikd modules imported anywhere in ``tree``, ``if TYPE_CHECKING:`` blocks included."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "aikd")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = here.split(".") if is_package else here.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] == "aikd":
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in SRC.joinpath("aikd").rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = imported(ast.parse(path.read_text()), name, path.name == "__init__.py")
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}  # its own packages
        closed = set()
        for target in targets:
            parts = target.split(".")
            closed.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))  # parent packages first
        edges[name] = {t for t in closed if t in files and t != name and t not in own}
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def connect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def main() -> int:
    edges = graph()
    if "--edges" in sys.argv:
        for name in sorted(edges):
            print(f"{name} -> {', '.join(sorted(edges[name])) or '(nothing)'}")
        print()
    found = circles(edges)
    for component in found:
        print("import circle:", " <-> ".join(component))
    if not found:
        print(f"no import circle among {len(edges)} aikd modules")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
