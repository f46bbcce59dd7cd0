"""Runs that survive kills and divergence: exact resume, signals, kept checkpoints, non-finite losses.

The kill tests use real `aikd train` subprocesses and real signals; "exact" means
the final weights and method state are bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from aikd.config import load_config
from aikd.engine import Trainer
from aikd.engine.checkpoint import load_checkpoint
from aikd.errors import AikdError
from helpers import same_state, tensors_of

# Fashion-MNIST subset: 32 batches of 64 per epoch, long enough for a signal to land mid-epoch.
DATA = {"name": "fashion-mnist", "batch_size": 64, "train_limit": 2048, "test_limit": 200}
RUN = {"data": DATA, "model": {"name": "small_cnn"}, "deterministic": True, "train": {"epochs": 2}}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def superior(tmp_path_factory):
    out = tmp_path_factory.mktemp("superior")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    overrides = [f"data.{k}={v}" for k, v in DATA.items()]
    Trainer(load_config(None, [*overrides, "model.name=small_cnn", "train.epochs=1"]), out, quiet=True).fit()
    torch.set_num_threads(before)
    return out / "checkpoints" / "last.safetensors"


def config_file(tmp_path: Path, method: str, superior: Path, **section) -> Path:
    data = {**RUN, "method": method}
    if method == "aikd":
        data["teacher"] = {"checkpoint": str(superior)}
        data["aikd"] = section
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run(config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aikd", "train", "-q", "-c", str(config), "-o", str(out), *extra],
                          env=ENV, capture_output=True, text=True, timeout=300)


def interrupt(config: Path, out: Path, signum: int) -> subprocess.CompletedProcess:
    """Start a run and send ``signum`` shortly after its first epoch is logged (early in epoch 2)."""
    proc = subprocess.Popen([sys.executable, "-m", "aikd", "train", "-q", "-c", str(config), "-o", str(out)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if metrics.is_file() and metrics.read_text().count("\n") >= 1:
            time.sleep(0.15)  # past the end-of-epoch bookkeeping, a few batches into epoch 2
            proc.send_signal(signum)
            break
        time.sleep(0.005)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def final_state(out: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(out / "checkpoints" / "last.safetensors")
    method = {f"method.{k}": v for k, v in ckpt.state["method"].items()}
    return {**ckpt.model, **method}


def assert_same_run(a: Path, b: Path) -> None:
    sa, sb = final_state(a), final_state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert same_state(sa[key], sb[key]), key  # the critic's Adam among them (the adversary's extra state)
    summary_a, summary_b = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    for key in ("top1_err", "top5_err", "macro_f1", "ece", "nll"):
        assert summary_a[key] == summary_b[key], key
    epochs = [[json.loads(x)["epoch"] for x in (p / "metrics.jsonl").read_text().splitlines()] for p in (a, b)]
    assert epochs[0] == epochs[1] == [1, 2]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, superior):
    """reference(method, section): the folder of an uninterrupted run, made once per case on first use."""
    root, outs = tmp_path_factory.mktemp("reference"), {}

    def get(method: str, section: dict) -> Path:
        name = method + "".join(f"_{v}" for v in section.values())
        if name not in outs:
            done = run(config_file(root, method, superior, **section), root / name)
            assert done.returncode == 0, done.stderr
            outs[name] = root / name
        return outs[name]

    return get


# The default suite kills CE, PS-KD and AI-KD (buffer) with SIGKILL, and stops PS-KD and AI-KD
# (snapshot) with a signal; the other combinations run with the slow checks.
SLOW = pytest.mark.slow


@pytest.mark.parametrize(("method", "section"), [("ce", {}), ("pskd", {}), ("aikd", {}),
                                                 pytest.param("aikd", {"previous": "snapshot"}, marks=SLOW)],
                         ids=["ce", "pskd", "aikd", "aikd-snapshot"])
def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path, superior, reference, method, section):
    config = config_file(tmp_path, method, superior, **section)
    killed = interrupt(config, tmp_path / "run", signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "summary.json").exists()
    resumed = run(config, tmp_path / "run", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path / "run", reference(method, section))


@pytest.mark.parametrize(("method", "section", "signum"),
                         [pytest.param("ce", {}, signal.SIGTERM, marks=SLOW), ("pskd", {}, signal.SIGINT),
                          pytest.param("aikd", {}, signal.SIGTERM, marks=SLOW),
                          ("aikd", {"previous": "snapshot"}, signal.SIGTERM)],
                         ids=["ce-term", "pskd-int", "aikd-term", "aikd-snapshot-term"])
def test_signal_saves_a_mid_epoch_checkpoint_and_resume_is_exact(tmp_path, superior, reference, method, section,
                                                                 signum):
    config = config_file(tmp_path, method, superior, **section)
    stopped = interrupt(config, tmp_path / "run", signum)
    assert stopped.returncode == 128 + signum, stopped.stderr
    assert f"Stopped by {signal.Signals(signum).name} in epoch 2 after batch" in stopped.stderr
    assert "--resume" in stopped.stderr and "Traceback" not in stopped.stderr
    position = load_checkpoint(tmp_path / "run/checkpoints/last.safetensors").state["position"]
    assert position["epoch"] == 1 and 1 <= position["batch"] < 32
    resumed = run(config, tmp_path / "run", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path / "run", reference(method, section))


# ---------------------------------------------------------------------- kept checkpoints and --resume auto

TINY = ["data.name=digits", "model.name=small_cnn", "data.batch_size=64", "deterministic=true",
        "data.train_limit=256", "data.test_limit=100"]


def test_keep_last_keeps_that_many_epoch_checkpoints(tmp_path, one_thread):
    Trainer(load_config(None, [*TINY, "train.epochs=4", "train.keep_last=3"]), tmp_path, quiet=True).fit()
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.glob("epoch-*")) == ["epoch-0002.safetensors", "epoch-0003.safetensors"]
    for name, epoch in (("epoch-0002.safetensors", 2), ("epoch-0003.safetensors", 3), ("last.safetensors", 4)):
        assert load_checkpoint(folder / name).meta["epoch"] == epoch


def test_resume_auto_skips_a_damaged_last_checkpoint(tmp_path, one_thread):
    cfg = [*TINY, "train.epochs=3", "train.keep_last=2"]
    reference = Trainer(load_config(None, cfg), tmp_path / "reference", quiet=True)
    reference.fit()
    Trainer(load_config(None, cfg), tmp_path / "run", quiet=True).fit(stop_after=2)
    last = tmp_path / "run/checkpoints/last.safetensors"
    last.write_bytes(last.read_bytes()[:1000])  # a torn write
    resumed = Trainer(load_config(None, cfg), tmp_path / "run", quiet=True)
    resumed.fit(resume="auto")  # falls back to epoch-0001 and replays epoch 2
    for a, b in zip(reference.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_resume_auto_in_an_empty_folder_starts_fresh(tmp_path, one_thread):
    summary = Trainer(load_config(None, [*TINY, "train.epochs=1"]), tmp_path, quiet=True).fit(resume="auto")
    assert summary["epochs"] == 1


# ---------------------------------------------------------------------- non-finite losses


def poison_batches(trainer: Trainer, numbers: set[int]) -> None:
    """Make the input of the given batches (1-based, over the run) NaN, as a blown-up layer would."""
    original, count = trainer.parts.to_batch, [0]

    def to_batch(*args, **kwargs):
        batch = original(*args, **kwargs)
        count[0] += 1
        if count[0] in numbers:
            batch.images = torch.full_like(batch.images, float("nan"))
        return batch

    trainer.parts.to_batch = to_batch


def test_nonfinite_loss_stops_naming_the_term_and_the_step(tmp_path, one_thread):
    trainer = Trainer(load_config(None, [*TINY, "train.epochs=2"]), tmp_path, quiet=True)
    poison_batches(trainer, {7})  # batch 3 of epoch 2 (4 batches per epoch)
    with pytest.raises(AikdError, match=r"diverged in epoch 2, batch 3 of 4 \(optimizer step 7\): loss term ce = nan"):
        trainer.fit()
    assert load_checkpoint(tmp_path / "checkpoints/last.safetensors").meta["epoch"] == 1  # the good one is intact


def test_skip_policy_skips_counts_and_keeps_the_model_finite(tmp_path, one_thread):
    Trainer(load_config(None, [*TINY, "train.epochs=1"]), tmp_path / "teacher", quiet=True).fit()
    teacher = tmp_path / "teacher/checkpoints/last.safetensors"
    cfg = load_config(None, [*TINY, "train.epochs=2", "method=aikd", f"teacher.checkpoint={teacher}",
                             "train.on_nonfinite=skip"])
    trainer = Trainer(cfg, tmp_path / "run", quiet=True)
    poison_batches(trainer, {2, 6})
    summary = trainer.fit()
    assert summary["skipped_steps"] == 2
    records = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [1, 1]
    buffer = trainer.method.state_dict()["previous.buffer.logits"]
    assert bool((buffer.isfinite().all(1) | buffer.isnan().all(1)).all())  # whole rows: written, or unseen (NaN)
    for key, tensor in [*tensors_of(trainer.model.state_dict()), *tensors_of(trainer.method.state_dict())]:
        if tensor.is_floating_point() and key != "previous.buffer.logits":
            assert torch.isfinite(tensor).all(), key  # weights, BatchNorm statistics, critic and its Adam
    assert trainer.step == 8  # the schedule moved on through the skipped steps
    # The critic learns only from steps that stand: 6 Adam steps for the 6 applied student steps.
    critic_steps = [int(s["step"]) for s in trainer.method.adversary.optimizer.state_dict()["state"].values()]
    assert critic_steps and set(critic_steps) == {6}


def test_skip_policy_gives_up_after_max_skipped_steps(tmp_path, one_thread):
    trainer = Trainer(load_config(None, [*TINY, "train.epochs=2", "train.on_nonfinite=skip",
                                         "train.max_skipped_steps=2"]), tmp_path, quiet=True)
    poison_batches(trainer, {1, 2, 3})
    with pytest.raises(AikdError, match=r"after 2 skipped steps \(train.max_skipped_steps\)"):
        trainer.fit()




# ---------------------------------------------------------------------- aikd demo: never destroys, always continues

DEMO_TINY = ["data.name=digits", "data.train_limit=384", "data.test_limit=128", "data.batch_size=64",
             "train.epochs=12", "deterministic=true", "device=cpu"]


def test_demo_stopped_by_sigterm_continues_when_run_again_and_never_replaces_another_configs_run(tmp_path):
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "aikd", "demo", "-q", "-o", str(out), *DEMO_TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "student" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # the student is training: phase 1 is done
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Continue it by running the same command again" in stderr and "--resume" not in stderr
    epochs_before = len(metrics.read_text().splitlines())
    assert 2 <= epochs_before < 12

    again = subprocess.run(command[:4] + command[5:], env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"resuming the unfinished run in {out / 'student'}" in again.stderr
    assert "reusing the finished run" in again.stderr  # phase 1 is not trained again
    epochs = [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()]
    assert epochs == list(range(1, 13))  # continued where it stopped: each epoch once
    summary = out / "student" / "summary.json"
    stamp = summary.stat().st_mtime_ns

    other = subprocess.run([*command, "seed=1"], env=env, capture_output=True, text=True, timeout=600)
    assert other.returncode == 2
    assert "holds a finished run made with another config" in other.stderr and "--overwrite" in other.stderr
    assert "Traceback" not in other.stderr
    assert summary.stat().st_mtime_ns == stamp  # the finished run is untouched
