"""The README's library example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def run_example(heading: str) -> dict:
    """Run the first Python block under ``heading`` in the README; return its variables."""
    section = README.read_text().split(heading, 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def test_own_loop_example_runs():
    namespace = run_example("### In your own training loop")
    buffer = namespace["previous"]
    assert bool(buffer.filled.all())  # every sample was written
    assert namespace["loss"].isfinite()


def test_online_aikd_example_runs():
    namespace = run_example("#### Online AI-KD in your own loop")
    criterion, ema, student = namespace["criterion"], namespace["ema"], namespace["student"]
    assert bool(criterion.buffer.filled.all()) and namespace["loss"].isfinite()
    assert set(criterion.last_terms) == {"ce", "progressive", "guide", "adv"}  # the superior was on at the end
    steps = {int(s["step"]) for s in criterion.adversary.optimizer.state_dict()["state"].values()}
    assert steps == {24}  # one critic step per batch of the last three epochs (8 batches each)
    assert not torch.equal(ema.model[1].weight, student[1].weight)  # the EMA lags the student
