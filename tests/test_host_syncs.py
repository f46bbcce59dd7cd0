"""No host sync in a training step: every method and AI-KD variant, mixing on and off, one process and two.

Each run is a real Trainer (src/aikd/bench/syncs.py, ``method_syncs``: small_cnn on in-memory data, batch 8) whose
epochs are counted by a ``TorchDispatchMode`` that sees every op that would make the host wait for a GPU
(``.item()``, ``bool()``, ``nonzero``, boolean-mask indexing, copies to the host). Two run lengths leave out
what an epoch does once (its sums, the divergence check at its end); the rest is per step, and must be the
documented number: 0 for every method, on every device but the CPU for BSS and AMKD (below). The periodic
syncs outside the step, each with its period, are listed in docs/results/meta_device.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from aikd.bench.syncs import SyncCounter, method_syncs
from aikd.data.mixing import BatchMixer
from aikd.methods import METHODS
from test_meta_device import VARIANTS, Variant

pytestmark = pytest.mark.usefixtures("one_thread")

MIXING = {"mixup": ["data.mix=mixup"], "cutmix-cutout": ["data.mix=cutmix", "data.cutout=4"]}
MIXED_METHODS = ("ce", "cskd", "pskd", "aikd")  # plain, paired batches, the buffer, AI-KD's buffer and critic


def allowed_per_step(variant: Variant) -> float:
    """The documented syncs per step on the CPU: none, but for BSS's and AMKD's attack, which on the CPU alone
    asks after each of its steps whether a sample still moves (src/aikd/methods/bss.py, ``bss_attack``:
    reading a value there waits for nothing). On any other device all its steps run without asking:
    tests/test_meta_device.py trains both on the meta device, where a read raises."""
    if variant.method in ("bss", "amkd"):
        return float(variant.hparams().attack_steps)
    return 0.0


def overrides(variant: Variant) -> list[str]:
    hparams = variant.hparams()
    settings = {**variant.settings, **({"attack_steps": hparams.attack_steps} if variant.method in ("bss", "amkd")
                                      else {})}
    return [f"{variant.method}.{key}={value if isinstance(value, str) else json.dumps(value)}"
            for key, value in settings.items()]


def explain(facts: dict[str, Any]) -> str:
    return f"{facts['per_step']:.2f} syncs per step, by op {facts['by_op']}, at {facts['sites']}"


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_a_training_step_has_no_host_sync(variant):
    facts = method_syncs(variant.method, overrides(variant))
    assert facts["per_step"] <= allowed_per_step(variant), explain(facts)


@pytest.mark.parametrize("mixing", MIXING, ids=list(MIXING))
@pytest.mark.parametrize("method", MIXED_METHODS)
def test_a_mixed_batch_adds_no_host_sync(method, mixing):
    facts = method_syncs(method, MIXING[mixing])
    assert facts["per_step"] == 0, explain(facts)


def test_a_data_parallel_step_has_no_host_sync(tmp_path):
    """Two gloo processes: the buffer's write gathers every rank's rows without first exchanging their counts."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
               "aikd.bench.syncs", "--work", str(tmp_path), "--set", "data.mix=cutmix", *MIXED_METHODS]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=_one_thread_env())
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["method"] for r in rows] == list(MIXED_METHODS) and all(r["world_size"] == 2 for r in rows)
    for row in rows:
        assert row["per_step"] == 0, (row["method"], explain(row))


def _one_thread_env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_the_counter_counts_a_planted_sync_per_step(monkeypatch):
    """The measurement can fail: one ``.item()`` planted in CE's step is one sync per step."""
    ce = METHODS.get("ce")
    original = ce.training_step

    def step(self, model, batch):
        out = original(self, model, batch)
        float(out.losses["ce"].detach())
        return out

    monkeypatch.setattr(ce, "training_step", step)
    facts = method_syncs("ce")
    assert facts["per_step"] == 1 and facts["by_op"] == {"_local_scalar_dense": 1}
    assert list(facts["sites"]) == [f"aikd/engine/loop.py:{_line_of('out = p.method.training_step(')}"]


def _line_of(code: str) -> int:
    import aikd.engine.loop as loop

    lines = Path(loop.__file__).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if code in line)


def test_the_mixing_draws_depend_on_seed_step_and_rank_only():
    """A resumed run draws a step's mixing again: the same (seed, step, rank), the same ratio and box."""
    from aikd.config import load_config

    mixer = BatchMixer(load_config(None, ["data.mix=cutmix"]).data, 10, seed=3)
    images, labels = torch.randn(8, 1, 12, 12), torch.arange(8)
    first = mixer(images, labels, None, step=5, rank=1)
    again = mixer(images, labels, None, step=5, rank=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    others = [mixer(images, labels, None, step=s, rank=r)[1] for s, r in ((6, 1), (5, 0))]
    assert not any(torch.equal(first[1], o) for o in others)
    with SyncCounter() as counter:
        mixer(images, labels, None, step=5, rank=1)
    assert counter.total == 0
