"""What each rank of a distributed run keeps to itself: its random streams and its own loss terms.

Two methods defined here alone draw on what differs between ranks. ``noisy_ce_test`` adds noise from the
global torch RNG to every logit, so each rank draws as many values as its share of the batch holds; with a
last batch that does not split evenly, the ranks' streams part after the first epoch (as AI-KD's critic
interpolation weights do on a GPU). ``rank_term_test`` adds a loss term and a statistic on rank 1 only, as
BSS and AMKD add theirs only where their attack ran. The 2-rank runs are real torchrun jobs on gloo whose
entry point is this file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aikd.config import load_config
from aikd.engine import Trainer
from aikd.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from aikd.errors import RunInterrupted
from aikd.methods import METHODS, Batch, Method, MethodContext, StepOutput, register_method

NOISY, RANK_TERM = "noisy_ce_test", "rank_term_test"
# 205 training images in batches of 64: the last batch of 13 splits 7 / 6 over two ranks.
TINY = ["data.name=digits", "model.name=small_cnn", "data.batch_size=64", "data.train_limit=205",
        "data.test_limit=64", "deterministic=true", "device=cpu", "train.epochs=2"]
TIMING = {"time_s"}


@dataclass
class NoisyConfig:
    noise: float = 0.5  # standard deviation of the noise added to every logit


class NoisyCE(Method):
    """Cross-entropy of logits plus noise drawn from the global torch RNG: a rank's stream moves with its share."""

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        logits = model(batch.images)
        noisy = logits + self.hparams.noise * torch.randn_like(logits)
        return StepOutput(logits, {"ce": F.cross_entropy(noisy, batch.targets)})


@dataclass
class RankTermConfig:
    extra: float = 2.0  # the term rank 1 adds to each of its steps


class RankTerm(Method):
    """Cross-entropy, plus a constant term and a statistic that only rank 1 reports."""

    def __init__(self, hparams: RankTermConfig, ctx: MethodContext) -> None:
        super().__init__(hparams, ctx)
        self.rank = ctx.strategy.rank

    @classmethod
    def loss_terms(cls, hparams: RankTermConfig) -> set[str]:
        return {"ce", "extra"}

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        logits = model(batch.images)
        losses, stats = {"ce": F.cross_entropy(logits, batch.targets)}, {}
        if self.rank == 1:
            losses["extra"] = torch.tensor(self.hparams.extra, device=logits.device)
            stats["rare"] = torch.tensor(1.0, device=logits.device)
        return StepOutput(logits, losses, stats)


def register() -> None:
    for name, config, method in ((NOISY, NoisyConfig, NoisyCE), (RANK_TERM, RankTermConfig, RankTerm)):
        if name not in METHODS:
            register_method(name, config)(method)


@pytest.fixture
def rank_methods():
    register()
    yield
    for name in (NOISY, RANK_TERM):
        METHODS.remove(name)  # keep the registry-driven tests of other files to the shipped methods


def torchrun(method: str, *jobs: str) -> subprocess.CompletedProcess:
    """This file as the entry point of a 2-rank gloo job that runs ``jobs`` ("fit:OUT", "stop1:OUT" or
    "resume:OUT") one after the other, and config overrides, in one process group (torchrun starts slowly)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
               method, *jobs]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def records(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- per-rank random streams


@pytest.fixture(scope="module")
def noisy_runs(tmp_path_factory) -> tuple[Path, Path]:
    """(uninterrupted, stopped after epoch 1) 2-rank runs of ``noisy_ce_test``."""
    root = tmp_path_factory.mktemp("noisy")
    torchrun(NOISY, f"fit:{root / 'straight'}", f"stop1:{root / 'split'}")
    return root / "straight", root / "split"


def test_two_rank_resume_restores_each_ranks_random_streams(noisy_runs, tmp_path):
    """Stopped after epoch 1 and resumed, the run equals the uninterrupted one in every epoch's record."""
    straight, split = noisy_runs[0], tmp_path / "split"
    shutil.copytree(noisy_runs[1], split)
    streams = load_checkpoint(split / "checkpoints" / "last.safetensors").state["rng"]
    torchrun(NOISY, f"resume:{split}")
    assert len(records(straight)) == 2
    assert records(split) == records(straight)
    assert len(streams) == 2 and not torch.equal(streams[0]["torch"], streams[1]["torch"])  # the ranks' differ


def test_resume_with_another_world_size_warns_and_continues(noisy_runs, tmp_path, rank_methods, one_thread):
    """A 2-rank checkpoint resumed by one process: the random streams cannot all be restored; a warning says so."""
    out = tmp_path / "run"
    shutil.copytree(noisy_runs[1], out)
    with pytest.warns(UserWarning, match="random streams of 2 processes and this run has 1"):
        summary = Trainer(load_config(None, [*TINY, f"method={NOISY}"]), out, quiet=True).fit(resume=True)
    assert summary["epochs"] == 2


def test_resume_without_the_saved_gpu_stream_warns_and_continues(tmp_path, rank_methods, one_thread):
    """A checkpoint written on a GPU (edited here: a CUDA stream in the saved state) resumed on the CPU."""
    cfg = load_config(None, [*TINY, f"method={NOISY}"])
    out = tmp_path / "run"
    Trainer(cfg, out, quiet=True).fit(stop_after=1)
    path = out / "checkpoints" / "last.safetensors"
    ckpt = load_checkpoint(path)
    streams = ckpt.state["rng"]
    (streams[0] if isinstance(streams, list) else streams)["cuda"] = torch.zeros(16, dtype=torch.uint8)  # Philox
    save_checkpoint(path, ckpt.model, ckpt.meta, ckpt.state)
    with pytest.warns(UserWarning, match="CUDA random stream and this run has no GPU"):
        summary = Trainer(cfg, out, quiet=True).fit(resume=True)
    assert summary["epochs"] == 2


def test_gpu_streams_that_do_not_fit_are_reported_not_raised():
    """A checkpoint from before per-rank streams (every visible GPU's stream, a list) restored on the CPU, and a
    CPU checkpoint restored on a GPU: the CPU streams are restored, the GPU one is named as missing."""
    torch.manual_seed(5)
    state = rng_state()
    expected = torch.rand(3)
    legacy = {**state, "cuda": [torch.zeros(16, dtype=torch.uint8)] * 8}
    assert "this run has no GPU" in set_rng_state(legacy)
    assert torch.equal(torch.rand(3), expected)
    assert "holds no CUDA random stream for this GPU" in set_rng_state(state, torch.device("cuda", 1))
    assert torch.equal(torch.rand(3), expected)


# ----------------------------------------------------------------------------- a mid-epoch generator on another device


def stopped_mid_epoch(out: Path, cfg) -> Path:
    """A single-process run stopped by SIGTERM after batch 2 of its first epoch; its checkpoint."""
    trainer = Trainer(cfg, out, quiet=True)
    original, steps = trainer.method.on_step_end, []

    def signal_at_batch_two(model, batch, output):
        original(model, batch, output)
        steps.append(1)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the run, which stops at the next step boundary

    trainer.method.on_step_end = signal_at_batch_two
    with pytest.raises(RunInterrupted):
        trainer.fit()
    return out / "checkpoints" / "last.safetensors"


@pytest.mark.parametrize("device", ["cuda", None], ids=["recorded", "older-checkpoint"])
def test_mid_epoch_generator_of_another_device_warns_and_continues(tmp_path, one_thread, device):
    """A CPU run resumes a checkpoint whose augmentation generator was a GPU's (edited here: a Philox state of 16
    bytes, its device recorded or, as before aikd recorded it, not)."""
    cfg = load_config(None, [*TINY, "method=ce", "train.epochs=1"])
    path = stopped_mid_epoch(tmp_path / "run", cfg)
    ckpt = load_checkpoint(path)
    position = ckpt.state["position"]
    assert position["batch"] == 2 and position.get("generator_device", "cpu") == "cpu"
    position["generators"] = [torch.zeros(16, dtype=torch.uint8)]
    position.pop("generator_device", None)
    if device:
        position["generator_device"] = device
    save_checkpoint(path, ckpt.model, ckpt.meta, ckpt.state)
    with pytest.warns(UserWarning, match="the rest of this epoch draws other augmentations"):
        summary = Trainer(cfg, tmp_path / "run", quiet=True).fit(resume=True)
    assert summary["epochs"] == 1


# ----------------------------------------------------------------------------- terms on some ranks only


def test_a_term_on_one_rank_only_is_averaged_over_every_sample(tmp_path):
    """Rank 1 adds 2.0 to each step and reports a statistic of 1.0; rank 0 reports neither. Every batch splits
    evenly (256 images in batches of 64), so the run's averages are 2.0 / 2 and 1.0 / 2."""
    out = tmp_path / "run"
    torchrun(RANK_TERM, f"fit:{out}", "data.train_limit=256", "train.epochs=1")
    (record,) = records(out)
    assert record["loss.extra"] == pytest.approx(1.0)
    assert record["stat.rare"] == pytest.approx(0.5)
    assert record["train.loss"] == pytest.approx(record["loss.ce"] + record["loss.extra"], rel=1e-5)


if __name__ == "__main__":  # the torchrun entry point of the tests above: one rank of each run in turn
    name, *args = sys.argv[1:]
    jobs = [arg.split(":", 1) for arg in args if arg.split(":", 1)[0] in ("fit", "stop1", "resume")]
    overrides = [arg for arg in args if "=" in arg and ":" not in arg]
    register()
    warnings.simplefilter("ignore", UserWarning)
    for mode, out_dir in jobs:
        trainer = Trainer(load_config(None, [*TINY, f"method={name}", *overrides]), out_dir, quiet=True)
        trainer.fit(resume=mode == "resume", stop_after=1 if mode == "stop1" else None)
