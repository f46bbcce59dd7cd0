"""The docs' claims point to tests: every ``tests/FILE.py::NAME`` in the README and docs/ must name a test that exists.

A renamed or removed test would otherwise leave a claim pointing at nothing. ``NAME`` may end in ``*``
(a family of tests) and may start with ``::`` after an earlier pointer into the same file.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POINTER = re.compile(r"tests/(\w+\.py)((?:::|`?, `?::)[\w*\[\]-]+)*")
NAME = re.compile(r"::([\w*]+)")


def pointers() -> list[tuple[str, str, str | None]]:
    """(document, test file, test name or None) for every pointer in the README and docs/."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = doc.read_text()
        for match in POINTER.finditer(text):
            names = NAME.findall(match.group(0)) or [None]
            found += [(doc.relative_to(ROOT).as_posix(), match.group(1), name) for name in names]
    return found


def test_every_test_the_docs_name_exists():
    found = pointers()
    assert len(found) > 20  # the pattern still finds the docs' pointers
    missing = []
    for doc, file, name in found:
        path = ROOT / "tests" / file
        if not path.is_file():
            missing.append(f"{doc}: tests/{file}")
            continue
        if name is None:
            continue
        pattern = re.escape(name.rstrip("*")) + ("" if name.endswith("*") else r"\b")
        if not re.search(rf"^def {pattern}", path.read_text(), re.MULTILINE):
            missing.append(f"{doc}: tests/{file}::{name}")
    assert not missing, "docs point to tests that do not exist:\n" + "\n".join(missing)
