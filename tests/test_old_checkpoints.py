"""Checkpoints written before issue 34 moved the methods' extra state into ``state_dict()`` still resume.

The files in tests/data/before_i34/ were written by tests/data/before_i34/make.py at commit 81a26c9, when the
engine saved a method's extra state beside its ``state_dict()`` (``method_extra``: AI-KD's critic optimizer
under ``disc_opt``) and ``AIKDLoss`` kept its critic optimizer at the top of its own ``state_dict()``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from aikd.config import load_config
from aikd.engine import Trainer
from aikd.engine.checkpoint import load_checkpoint
from aikd.methods.aikd import AIKDLoss

BEFORE = Path(__file__).parent / "data" / "before_i34"
# The run tests/data/before_i34/make.py stopped after its first epoch (an EMA superior from epoch 0, so the
# critic and its Adam have state by then).
RUN = ["data.name=digits", "model.name=small_cnn", "data.batch_size=64", "deterministic=true", "train.epochs=2",
       "data.train_limit=200", "data.test_limit=50", "method=aikd", "aikd.superior=ema", "aikd.superior_start=0"]
TIMING = {"time_per_epoch_s", "train_time_s"}


def test_an_aikd_checkpoint_from_before_resumes_to_the_run_without_a_break(tmp_path):
    saved = load_checkpoint(BEFORE / "aikd_ema_epoch1.safetensors").state
    assert saved["method_extra"]["disc_opt"]["state"], "the file should hold the critic's Adam state"
    straight = Trainer(load_config(None, RUN), tmp_path / "straight", quiet=True)
    expected = straight.fit()
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copy(BEFORE / "aikd_ema_epoch1.safetensors", tmp_path / "resumed" / "checkpoints" / "last.safetensors")
    resumed = Trainer(load_config(None, RUN), tmp_path / "resumed", quiet=True)
    summary = resumed.fit(resume=True)
    assert {k: v for k, v in summary.items() if k not in TIMING} == \
        {k: v for k, v in expected.items() if k not in TIMING}
    for key, value in straight.method.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(resumed.method.state_dict()[key], value), key
    before = straight.method.adversary.optimizer.state_dict()["state"][0]
    after = resumed.method.adversary.optimizer.state_dict()["state"][0]
    assert all(torch.equal(before[k], after[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_an_aikd_loss_state_dict_from_before_loads():
    state = torch.load(BEFORE / "aikd_loss_state.pt", weights_only=True)
    criterion = AIKDLoss(3, 8)
    criterion.load_state_dict(state)
    adam = criterion.adversary.optimizer.state_dict()["state"][0]
    old = state["_extra_state"]["critic_opt"]["state"][0]
    assert int(adam["step"]) == 1 and all(torch.equal(adam[k], old[k]) for k in ("exp_avg", "exp_avg_sq"))
    assert torch.equal(criterion.buffer.logits, state["buffer.logits"])
