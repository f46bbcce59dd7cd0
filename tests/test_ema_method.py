"""A method defined here alone, with no engine change: a student distilled from an EMA copy of itself.

It exercises what the method interface promises a new method: the bare student at
construction (``ctx.student``), a hook after every optimizer step with the model
(``on_step_end``), and an extra model that is ordinary state (a sub-module, saved and
resumed with ``state_dict()``). The test trains it, resumes it exactly, and runs it
under torchrun with two ranks, whose entry point is this file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aikd.config import load_config
from aikd.engine import Trainer
from aikd.engine.checkpoint import load_checkpoint
from aikd.methods import METHODS, Batch, Method, MethodContext, StepOutput, register_method
from aikd.methods.base import positive, weight
from aikd.methods.ema import EMAModel, ema_update
from aikd.methods.functional import distillation_kl

NAME = "ema_teacher_test"
DIGITS = ["data.name=digits", "model.name=small_cnn", "data.batch_size=64", "data.train_limit=512",
          "data.test_limit=128", "deterministic=true", "device=cpu", "train.epochs=2", f"method={NAME}"]


@dataclass
class EMATeacherConfig:
    decay: float = 0.9  # EMA <- decay EMA + (1 - decay) student, after every optimizer step
    weight: float = 0.5  # of the distillation term; CE gets 1 - weight
    temperature: float = 2.0

    def __post_init__(self) -> None:
        weight(f"{NAME}.decay", self.decay)
        weight(f"{NAME}.weight", self.weight)
        positive(f"{NAME}.temperature", self.temperature)


class EMATeacher(Method):
    """(1 - w) CE + w T^2 KL(p(z_ema; T) || p(z; T)), the EMA teacher updated after each step."""

    def __init__(self, hparams: EMATeacherConfig, ctx: MethodContext) -> None:
        super().__init__(hparams, ctx)
        self.ema = EMAModel(ctx.student, hparams.decay)  # the shared EMA part: ordinary state, in state_dict()

    @classmethod
    def loss_terms(cls, hparams: EMATeacherConfig) -> set[str]:
        return {"ce", "ema"}

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        h = self.hparams
        logits = model(batch.images)
        target = self.ema.logits(batch.images)
        return StepOutput(logits, {"ce": (1 - h.weight) * F.cross_entropy(logits, batch.targets),
                                   "ema": h.weight * distillation_kl(target, logits.float(), h.temperature)})

    def on_step_end(self, model: nn.Module, batch: Batch, output: StepOutput) -> None:
        self.ema.update(model)


def register() -> None:
    if NAME not in METHODS:
        register_method(NAME, EMATeacherConfig)(EMATeacher)


@pytest.fixture
def ema_method():
    register()
    yield
    METHODS.remove(NAME)  # keep the registry-driven tests of other files to the shipped methods


def linear_bn(weight: float, bias: float, mean: float, var: float, batches: int) -> nn.Sequential:
    """Linear(1, 1) then BatchNorm1d(1), every tensor set to a known number."""
    model = nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.fill_(weight)
        model[0].bias.fill_(bias)
        model[1].running_mean.fill_(mean)
        model[1].running_var.fill_(var)
        model[1].num_batches_tracked.fill_(batches)
    return model


def test_ema_update_by_hand_and_after_loads_and_moves():
    average, live = linear_bn(1.0, 2.0, 10.0, 4.0, 3), linear_bn(3.0, -2.0, 0.0, 1.0, 7)
    ema_update(average, live, 0.9)  # 0.9 average + 0.1 live; an update with the weights swapped gives 2.8, 9.0
    assert average[0].weight.item() == pytest.approx(1.2, abs=1e-6)
    assert average[0].bias.item() == pytest.approx(1.6, abs=1e-6)
    assert average[1].running_mean.item() == pytest.approx(9.0, abs=1e-5)
    assert average[1].running_var.item() == pytest.approx(3.7, abs=1e-6)
    assert average[1].num_batches_tracked.item() == 7  # integer buffers are copied
    # load_state_dict() copies into the same tensors, which the next update must read
    live.load_state_dict(linear_bn(5.0, 0.0, 20.0, 2.0, 8).state_dict())
    ema_update(average, live, 0.5)
    assert average[0].weight.item() == pytest.approx(3.1, abs=1e-6)
    assert average[1].running_mean.item() == pytest.approx(14.5, abs=1e-5)
    assert average[1].num_batches_tracked.item() == 8
    # .to() replaces the buffers (and parameters' data): the update must follow the new tensors
    average.to(torch.float64)
    live[1].running_mean = torch.tensor([30.0])  # a replaced buffer of the live model
    ema_update(average, live, 0.5)
    assert average[1].running_mean.dtype == torch.float64
    assert average[1].running_mean.item() == pytest.approx(22.25, abs=1e-5)
    assert average[0].weight.item() == pytest.approx(4.05, abs=1e-6)


def test_ema_teacher_follows_the_student_after_every_step(tmp_path, ema_method, one_thread):
    trainer = Trainer(load_config(None, [*DIGITS, "train.epochs=1"]), tmp_path, quiet=True)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    seen = []
    original = trainer.method.on_step_end

    def watch(model, batch, output):
        before = {k: v.clone() for k, v in trainer.method.ema.model.state_dict().items()}
        original(model, batch, output)
        seen.append((before, {k: v.clone() for k, v in model.state_dict().items()},
                     {k: v.clone() for k, v in trainer.method.ema.model.state_dict().items()}))

    trainer.method.on_step_end = watch
    trainer.fit()
    assert len(seen) == len(trainer.train_loader) == trainer.step
    before, student, after = seen[0]
    for key, value in before.items():
        assert torch.equal(value, start[key]), key  # the EMA starts as the initial student
    weight_key = next(k for k in after if k.endswith("weight") and after[k].ndim == 4)
    expected = 0.9 * before[weight_key] + 0.1 * student[weight_key]  # by hand, one EMA step
    torch.testing.assert_close(after[weight_key], expected, rtol=0, atol=1e-7)
    assert not torch.equal(after[weight_key], student[weight_key])
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert {k for k in record if k.startswith("loss.")} == {"loss.ce", "loss.ema"}


def test_ema_teacher_is_saved_and_resumes_exactly(tmp_path, ema_method, one_thread):
    cfg = load_config(None, DIGITS)
    straight = Trainer(cfg, tmp_path / "straight", quiet=True)
    expected = straight.fit()
    split = Trainer(cfg, tmp_path / "split", quiet=True)
    split.fit(stop_after=1)
    saved = load_checkpoint(tmp_path / "split/checkpoints/last.safetensors").state["method"]
    assert any(k.startswith("ema.model.") for k in saved)  # the EMA copy travels in the method's state_dict()
    resumed = Trainer(cfg, tmp_path / "split", quiet=True).fit(resume=True)
    timing = {"time_per_epoch_s", "train_time_s"}
    assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in expected.items()
                                                                      if k not in timing}
    final = load_checkpoint(tmp_path / "split/checkpoints/last.safetensors").state["method"]
    for key, value in straight.method.state_dict().items():
        assert torch.equal(final[key], value), key


@pytest.mark.slow
def test_ema_teacher_trains_under_torchrun_with_two_ranks(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
               str(tmp_path / "run")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["world_size"] == 2 and summary["method"] == NAME and summary["top1_err"] < 50
    state = load_checkpoint(tmp_path / "run/checkpoints/last.safetensors").state["method"]
    ema = {k.removeprefix("ema.model."): v for k, v in state.items() if k.startswith("ema.model.")}
    model = load_checkpoint(tmp_path / "run/checkpoints/last.safetensors").model
    assert ema.keys() == model.keys() and any(not torch.equal(ema[k], model[k]) for k in ema)


if __name__ == "__main__":  # the torchrun entry point of the test above: one rank of the run
    from aikd.engine import train

    register()
    train(load_config(None, [*DIGITS, "deterministic=false"]), sys.argv[1], quiet=True)
