"""The README's library example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_own_loop_example_runs():
    text = README.read_text()
    section = text.split("### In your own training loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    buffer = namespace["previous"]
    assert bool(buffer.filled.all())  # every sample was written
    assert namespace["loss"].isfinite()
