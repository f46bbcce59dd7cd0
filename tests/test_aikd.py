"""AI-KD: its losses against independent formulas, the critic, the buffer, the pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aikd.config import load_config
from aikd.engine import Trainer
from aikd.engine.checkpoint import load_checkpoint, save_checkpoint
from aikd.engine.model_io import model_meta
from aikd.engine.pipeline import run_pipeline
from aikd.errors import AikdError, CheckpointError, ConfigError
from aikd.methods.aikd import (
    AIKD,
    AIKDConfig,
    adversarial_loss,
    critic_schedule,
    guide_loss,
    progressive_loss,
)
from aikd.methods.base import Batch, MethodContext, Source, Targets
from aikd.methods.critic import Critic, critic_optimizer, train_critic
from aikd.methods.ema import ema_update
from aikd.methods.previous import BufferPrevious, SnapshotPrevious
from aikd.methods.superior import EMASuperior, MilestoneSuperior, PretrainedSuperior
from aikd.models import build_model

DIGITS = ["data.name=digits", "model.name=small_cnn", "data.batch_size=64", "deterministic=true", "train.epochs=2"]
STUDENT = torch.tensor([[2.0, 1.0, 0.1], [0.5, 2.5, -1.0]])
OTHER = torch.tensor([[1.5, 0.2, 0.3], [-0.3, 3.0, 0.0]])


def numpy_kd(target: np.ndarray, student: np.ndarray, t: float) -> float:
    """T^2 * mean over samples of sum_c p_c log(p_c / q_c), from explicit probabilities."""
    def softmax(z):
        e = np.exp(z / t - (z / t).max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p, q = softmax(target), softmax(student)
    per_sample = [sum(p[i, c] * np.log(p[i, c] / q[i, c]) for c in range(p.shape[1])) for i in range(len(p))]
    return t * t * float(np.mean(per_sample))


@pytest.mark.parametrize("t", [1.0, 3.0, 4.0])
def test_guide_and_progressive_losses_match_an_explicit_computation(t):
    expected = numpy_kd(OTHER.numpy().astype(np.float64), STUDENT.numpy().astype(np.float64), t)
    assert guide_loss(STUDENT, OTHER, t).item() == pytest.approx(expected, rel=1e-5)
    assert progressive_loss(STUDENT, OTHER, t).item() == pytest.approx(expected, rel=1e-5)


def test_guide_loss_by_hand_for_two_classes():
    # Target logits (0, 0) -> p = (1/2, 1/2); student (ln 3, 0) at T = 1 -> q = (3/4, 1/4).
    # KL = 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3).
    student = torch.tensor([[np.log(3.0), 0.0]], dtype=torch.float32)
    target = torch.zeros(1, 2)
    assert guide_loss(student, target, 1.0).item() == pytest.approx(0.5 * np.log(4 / 3), rel=1e-5)
    # At T = 2 the student's logits halve: q = softmax(ln 3 / 2, 0) = (sqrt3, 1) / (sqrt3 + 1); times T^2 = 4.
    s3 = np.sqrt(3.0)
    kl = 0.5 * np.log(0.5 / (s3 / (s3 + 1))) + 0.5 * np.log(0.5 / (1 / (s3 + 1)))
    assert guide_loss(student, target, 2.0).item() == pytest.approx(4 * kl, rel=1e-5)


def test_batch_mean_not_sum():
    one = guide_loss(STUDENT[:1], OTHER[:1], 3.0)
    doubled = guide_loss(STUDENT[:1].repeat(2, 1), OTHER[:1].repeat(2, 1), 3.0)
    assert doubled.item() == pytest.approx(one.item(), rel=1e-6)


def test_adversarial_gradient_reaches_the_student_not_the_superior():
    torch.manual_seed(0)
    student, superior = nn.Linear(4, 3), nn.Linear(4, 3).requires_grad_(False)
    critic = Critic(3)
    x = torch.randn(8, 4)
    with torch.no_grad():
        sup_logits = superior(x)
    train_critic(critic, critic_optimizer(critic, 1e-3), sup_logits, student(x))
    assert student.weight.grad is None  # the critic learns from detached logits
    adversarial_loss(critic, student(x)).backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert superior.weight.grad is None


def _train_aikd(tmp_path, *extra, teacher=None):
    overrides = [*DIGITS, "method=aikd", *extra]
    if teacher is not None:
        overrides.append(f"teacher.checkpoint={teacher}")
    return load_config(None, overrides)


@pytest.fixture(scope="module")
def superior(tmp_path_factory):
    out = tmp_path_factory.mktemp("superior")
    Trainer(load_config(None, DIGITS), out, quiet=True).fit()
    return out / "checkpoints" / "last.safetensors"


def test_superior_model_never_changes_and_every_term_is_logged(tmp_path, superior):
    trainer = Trainer(_train_aikd(tmp_path, teacher=superior), tmp_path, quiet=True)
    before = {k: v.clone() for k, v in trainer.method.ctx.teacher.state_dict().items()}
    trainer.fit()
    for key, value in trainer.method.ctx.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss.ce", "loss.guide", "loss.progressive", "loss.adv", "stat.L_G", "stat.L_P", "stat.L_A", "stat.L_D",
                "stat.critic_gap", "stat.gp"):
        assert key in record and np.isfinite(record[key]), key
    # The weighted terms are the raw terms times the paper's weights.
    assert record["loss.guide"] == pytest.approx(0.1 * record["stat.L_G"], rel=1e-4)
    assert record["loss.progressive"] == pytest.approx(0.3 * record["stat.L_P"], rel=1e-4)


def test_buffer_holds_last_epochs_logits_and_survives_resume(tmp_path):
    cfg = _train_aikd(tmp_path, "aikd.alpha_g=0", "aikd.adv_weight=0")  # Only Progressive: no superior
    trainer = Trainer(cfg, tmp_path, quiet=True)
    method = trainer.method
    written, read = {}, {}
    original_step, original_end = method.training_step, method.on_step_end

    def step(model, batch):
        if batch.epoch == 1:
            logits, filled = method.previous.buffer.read(batch.indices)
            read.update({i: (row.clone(), bool(f)) for i, row, f in zip(batch.indices.tolist(), logits, filled,
                                                                       strict=True)})
        return original_step(model, batch)

    def end(model, batch, out):
        if batch.epoch == 0:
            written.update(zip(batch.indices.tolist(), out.logits.detach().half().float(), strict=True))
        original_end(model, batch, out)

    method.training_step, method.on_step_end = step, end
    trainer.fit(stop_after=1)
    assert len(written) >= len(trainer.data.train) - 1  # all but a dropped single-sample batch
    saved = load_checkpoint(tmp_path / "checkpoints/last.safetensors").state["method"]
    assert torch.equal(saved["previous.buffer.logits"], method.previous.buffer.logits.cpu())
    resumed = Trainer(cfg, tmp_path, quiet=True)
    resumed.resume()
    assert torch.equal(resumed.method.previous.buffer.logits, method.previous.buffer.logits)
    assert torch.equal(resumed.method.previous.buffer.filled, method.previous.buffer.filled)
    trainer.fit(resume=True)
    assert read, "epoch 1 never ran"
    for index, (logits, filled) in read.items():
        if index in written:
            assert filled and torch.equal(logits, written[index]), index


def test_discriminator_and_its_optimizer_are_restored(tmp_path, superior):
    cfg = _train_aikd(tmp_path, teacher=superior)
    first = Trainer(cfg, tmp_path, quiet=True)
    first.fit(stop_after=1)
    again = Trainer(cfg, tmp_path, quiet=True)
    again.resume()
    for (key, a), b in zip(first.method.adversary.critic.state_dict().items(),
                           again.method.adversary.critic.state_dict().values(),
                           strict=True):
        assert torch.equal(a, b), key
    exp_avg = [s["exp_avg"] for s in first.method.adversary.optimizer.state_dict()["state"].values()]
    got = [s["exp_avg"] for s in again.method.adversary.optimizer.state_dict()["state"].values()]
    assert exp_avg and all(torch.equal(a, b) for a, b in zip(exp_avg, got, strict=True))


def _write_in_the_old_layout(run: Path) -> None:
    """Rewrite a run's last checkpoint and config.yaml as aikd wrote them before the critic and the previous
    predictions had one name each: the critic's weights under ``adversary.disc.*``, its Adam under ``disc_opt`` in
    the method's extra state,
    the config's keys ``aikd.disc_*`` and ``aikd.prev``."""
    import yaml

    old_name = {new: old for old, new in AIKDConfig.RENAMED_KEYS.items()}
    path = run / "checkpoints" / "last.safetensors"
    ckpt = load_checkpoint(path)
    state = dict(ckpt.state)
    method = dict(state["method"])
    state["method_extra"] = {"disc_opt": method.pop("adversary._extra_state")["critic_opt"]}  # the method's, then
    state["method"] = {k.replace("adversary.critic.", "adversary.disc."): v for k, v in method.items()}
    meta = {k: v for k, v in ckpt.meta.items() if k != "format"}
    meta["config"]["aikd"] = {old_name.get(k, k): v for k, v in meta["config"]["aikd"].items()}
    save_checkpoint(path, ckpt.model, meta, state)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["aikd"] = {old_name.get(k, k): v for k, v in config["aikd"].items()}
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    written = load_checkpoint(path)
    assert "adversary.disc.theta" in written.state["method"] and "disc_opt" in written.state["method_extra"]
    assert "disc_lr" in written.meta["config"]["aikd"] and "prev" in written.meta["config"]["aikd"]


def test_a_checkpoint_in_the_old_layout_resumes_exactly(tmp_path, superior):
    straight = Trainer(_train_aikd(tmp_path, teacher=superior), tmp_path / "straight", quiet=True)
    expected = straight.fit()
    cfg = _train_aikd(tmp_path, teacher=superior)
    Trainer(cfg, tmp_path / "split", quiet=True).fit(stop_after=1)
    _write_in_the_old_layout(tmp_path / "split")
    again = Trainer(cfg, tmp_path / "split", quiet=True)
    resumed = again.fit(resume=True)
    untimed = {"time_per_epoch_s", "train_time_s", "run_dir"}
    assert {k: v for k, v in resumed.items() if k not in untimed} == \
        {k: v for k, v in expected.items() if k not in untimed}
    for key, value in straight.method.state_dict().items():  # the critic's weights among them; its Adam below
        if isinstance(value, torch.Tensor):
            assert torch.equal(again.method.state_dict()[key], value), key
    moments = [s["exp_avg"] for s in straight.method.adversary.optimizer.state_dict()["state"].values()]
    got = [s["exp_avg"] for s in again.method.adversary.optimizer.state_dict()["state"].values()]
    assert moments and all(torch.equal(a, b) for a, b in zip(moments, got, strict=True))


@pytest.mark.parametrize(("student_steps", "expected"), [
    (117_300, (1e-4, 1)),  # the paper's CIFAR-100 run: its own values
    (300_000, (1e-4, 1)),  # longer runs never get less than the paper's
    (58_650, (2e-4, 1)),  # half as long: twice the learning rate, still one step
    (11_730, (1e-3, 1)),  # ten times shorter: the learning-rate cap is just reached
    (1_600, (1e-3, 8)),  # 73.3 times shorter: cap, then ceil(7.33) = 8 critic steps per student step
    (1_000, (1e-3, 10)),  # 117.3 times shorter: 12 steps would be needed, capped at 10
])
def test_critic_schedule_keeps_the_papers_update_budget(student_steps, expected):
    lr, steps = critic_schedule(student_steps)
    assert lr == pytest.approx(expected[0]) and steps == expected[1]


def test_critic_schedule_scales_from_the_given_base():
    # lr x steps = 2e-4 x 2 x 10_000 = 4 for a run of 1_000 steps: lr 5e-4 (capped) and 8 steps.
    lr, steps = critic_schedule(1_000, base_lr=2e-4, base_steps=2, reference_steps=10_000, max_lr=5e-4,
                                max_steps=20)
    assert lr == pytest.approx(5e-4) and steps == 8
    assert critic_schedule(20_000, base_lr=2e-4, base_steps=2, reference_steps=10_000) == (2e-4, 2)


def test_run_length_schedule_sets_the_critic_optimizer():
    ctx = MethodContext(num_classes=3, num_train=100, epochs=4, steps_per_epoch=10)
    fixed = AIKD(AIKDConfig(), ctx)
    assert (fixed.critic_lr, fixed.critic_steps) == (1e-4, 1)
    scaled = AIKD(AIKDConfig(critic_schedule="run_length", critic_reference_steps=400, critic_max_lr=4e-4), ctx)
    # 40 student steps, 10x shorter than the reference: lr 4e-4 (cap), then ceil(10 / 4) = 3 steps.
    assert scaled.critic_lr == pytest.approx(4e-4) and scaled.critic_steps == 3
    assert scaled.adversary.optimizer.param_groups[0]["lr"] == pytest.approx(4e-4)
    assert scaled.run_facts() == {"critic_lr": pytest.approx(4e-4), "critic_steps": 3}
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        AIKD(AIKDConfig(critic_schedule="run_length"), MethodContext(num_classes=3, num_train=100, epochs=4))


def test_run_length_critic_takes_that_many_steps(tmp_path, superior):
    cfg = _train_aikd(tmp_path, "aikd.critic_schedule=run_length", "aikd.critic_reference_steps=100",
                      "aikd.critic_max_lr=1e-4", "aikd.critic_max_steps=3", teacher=superior)
    trainer = Trainer(cfg, tmp_path, quiet=True)
    assert trainer.method.critic_steps == 3
    trainer.fit()
    steps = [s["step"] for s in trainer.method.adversary.optimizer.state_dict()["state"].values()]
    assert steps and all(int(s) == 3 * trainer.step for s in steps)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["critic_steps"] == 3 and summary["critic_lr"] == pytest.approx(1e-4)


def test_snapshot_source_trains(tmp_path, superior):
    summary = Trainer(_train_aikd(tmp_path, "aikd.previous=snapshot", teacher=superior), tmp_path, quiet=True).fit()
    assert summary["top1_err"] < 50


def test_teacher_with_other_class_count_is_refused(tmp_path):
    wrong = build_model("small_cnn", 7, 1, 8)
    path = save_checkpoint(tmp_path / "wrong.safetensors", wrong.state_dict(),
                           {**model_meta("small_cnn", "cifar", 7, 1, 8, list("abcdefg")), "epoch": 1})
    with pytest.raises(CheckpointError, match="7 classes"):
        Trainer(_train_aikd(tmp_path, teacher=path), tmp_path / "run", quiet=True)


def test_missing_teacher_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"teacher\.checkpoint"):
        Trainer(_train_aikd(tmp_path), tmp_path, quiet=True)


def test_pipeline_runs_both_phases_and_reuses_phase_one(tmp_path):
    config = "configs/fashion_mnist/aikd.yaml"
    logs: list[str] = []
    result = run_pipeline(config, DIGITS, tmp_path, quiet=True, log=logs.append)
    sup_dir = tmp_path / "superior"
    assert len(list(sup_dir.iterdir())) == 1
    assert result["superior"]["method"] == "ce" and result["student"]["method"] == "aikd"
    assert (tmp_path / "student/summary.json").is_file()
    # A different student (No Adv) with the same phase-1 settings reuses the superior model.
    run_pipeline(config, [*DIGITS, "aikd.adv_weight=0"], tmp_path / "no_adv", cache_dir=sup_dir, quiet=True,
                 log=logs.append)
    assert any("reusing" in line and "superior" in line for line in logs)
    assert len(list(sup_dir.iterdir())) == 1
    # Changing the recipe of phase 1 only trains a second superior model.
    run_pipeline(config, [*DIGITS, "phase1.train.lr=0.05"], tmp_path / "lr", cache_dir=sup_dir, quiet=True,
                 log=logs.append)
    assert len(list(sup_dir.iterdir())) == 2
    done = subprocess.run([sys.executable, "-m", "aikd", "eval", "-q", "-k",
                           str(tmp_path / "student/checkpoints/last.safetensors")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["method"] == "aikd"
    # A finished student made with another config is never replaced silently.
    before = (tmp_path / "student/summary.json").read_text()
    with pytest.raises(AikdError, match="another config"):
        run_pipeline(config, [*DIGITS, "aikd.alpha_p=0.2"], tmp_path, quiet=True, log=logs.append)
    assert (tmp_path / "student/summary.json").read_text() == before
    replaced = run_pipeline(config, [*DIGITS, "aikd.alpha_p=0.2"], tmp_path, quiet=True, overwrite=True,
                            log=logs.append)
    assert replaced["student"]["method"] == "aikd"


def test_only_progressive_needs_no_phase_one(tmp_path):
    result = run_pipeline("configs/fashion_mnist/aikd_only_progressive.yaml", DIGITS, tmp_path, quiet=True,
                          log=lambda m: None)
    assert result["superior"] is None and not (tmp_path / "superior").exists()


# ---------------------------------------------------------------------- online AI-KD (in-run superior model)


def test_ema_update_by_hand():
    average, live = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        average.weight.copy_(torch.tensor([1.0, 2.0]))
        live.weight.copy_(torch.tensor([3.0, -2.0]))
        live.running_mean.copy_(torch.tensor([10.0, 0.0]))
        live.num_batches_tracked.fill_(7)
    ema_update(average, live, 0.75)
    assert average.weight.tolist() == [1.5, 1.0]  # 0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * -2
    assert average.running_mean.tolist() == [2.5, 0.0] and int(average.num_batches_tracked) == 7


def test_in_run_superior_sources_need_no_phase_one(tmp_path):
    for source in ("ema", "milestone"):
        assert not AIKD.needs_teacher(AIKDConfig(superior=source))
    assert AIKD.needs_teacher(AIKDConfig()) and not AIKD.needs_teacher(AIKDConfig(alpha_g=0, adv_weight=0))
    result = run_pipeline("configs/fashion_mnist/aikd.yaml", [*DIGITS, "aikd.superior=ema", "train.epochs=1",
                                                             "data.train_limit=300"], tmp_path, quiet=True,
                          log=lambda m: None)
    assert result["superior"] is None and not (tmp_path / "superior").exists()
    with pytest.raises(ConfigError, match=r"aikd\.superior_start"):
        load_config(None, ["aikd.superior=milestone", "aikd.superior_start=0"])


def _online(tmp_path, source, *extra):
    cfg = _train_aikd(tmp_path, f"aikd.superior={source}", "aikd.superior_start=0.5", "train.epochs=2",
                      "data.train_limit=400", *extra)
    return Trainer(cfg, tmp_path / source, quiet=True)


@pytest.mark.parametrize("source", ["ema", "milestone"])
def test_online_superior_switches_on_at_its_epoch(tmp_path, source):
    trainer = _online(tmp_path, source)
    method, seen = trainer.method, {}
    original_start, original_end = method.on_epoch_start, method.on_step_end

    def start(epoch, model):
        seen[f"student at start of {epoch}"] = {k: v.clone() for k, v in model.state_dict().items()}
        original_start(epoch, model)

    def end(model, batch, out):
        if "first step" not in seen:
            seen["first step"] = ({k: v.clone() for k, v in model.state_dict().items()},
                                  {k: v.clone() for k, v in method.superior.model.state_dict().items()})
        original_end(model, batch, out)
        if "after first step" not in seen:
            seen["after first step"] = {k: v.clone() for k, v in method.superior.model.state_dict().items()}

    method.on_epoch_start, method.on_step_end = start, end
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / source / "metrics.jsonl").read_text().splitlines()]
    assert {k for k in records[0] if k.startswith("loss.")} == {"loss.ce", "loss.progressive"}  # epoch 1: not yet
    assert {k for k in records[1] if k.startswith("loss.")} == {"loss.ce", "loss.progressive", "loss.guide", "loss.adv"}
    final = method.superior.model.state_dict()
    if source == "milestone":  # a frozen copy of the student as it began epoch 2
        for key, value in seen["student at start of 1"].items():
            assert torch.equal(final[key], value), key
    else:  # the EMA moved after the very first step: 0.99 of the initial weights plus 0.01 of the student's
        student, before = seen["first step"]
        key = next(k for k, v in before.items() if v.ndim == 4)
        torch.testing.assert_close(seen["after first step"][key], 0.99 * before[key] + 0.01 * student[key],
                                   rtol=0, atol=1e-7)


def test_before_the_switch_the_guide_weight_goes_to_ce():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    ctx = MethodContext(num_classes=3, num_train=4, epochs=4, student=student)
    method = AIKD(AIKDConfig(superior="ema", superior_start=0.5), ctx)
    x, y = torch.randn(4, 1, 3, 4), torch.tensor([0, 1, 2, 0])
    early = method.training_step(student, Batch(x, y, torch.arange(4), 1, 0))  # epoch 1 < round(0.5 * 4)
    ce = F.cross_entropy(student(x), y).item()
    assert set(early.losses) == {"ce", "progressive"} and early.losses["ce"].item() == pytest.approx(0.7 * ce)
    late = method.training_step(student, Batch(x, y, torch.arange(4), 2, 0))
    assert set(late.losses) == {"ce", "progressive", "guide"} and late.losses["ce"].item() == pytest.approx(0.6 * ce)
    assert "superior_logits" in late.saved and "superior_logits" not in early.saved


def test_online_ema_resumes_exactly(tmp_path):
    straight = _online(tmp_path / "a", "ema", "deterministic=true")
    expected = straight.fit()
    split = _online(tmp_path / "b", "ema", "deterministic=true")
    split.fit(stop_after=1)
    again = _online(tmp_path / "b", "ema", "deterministic=true")
    resumed = again.fit(resume=True)
    timing = {"time_per_epoch_s", "train_time_s"}
    assert {k: v for k, v in resumed.items() if k not in timing} == {k: v for k, v in expected.items()
                                                                      if k not in timing}
    for key, value in straight.method.state_dict().items():  # the EMA model, critic and buffer
        if key != "adversary._extra_state":  # the critic's Adam: below
            assert torch.equal(again.method.state_dict()[key], value), key
    adam = [m.adversary.optimizer.state_dict()["state"][0] for m in (straight.method, again.method)]
    assert all(torch.equal(adam[0][k], adam[1][k]) for k in ("step", "exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("mix", ["mixup", "cutmix", "cutout"])
def test_online_ema_with_every_data_option(tmp_path, mix):
    option = "data.cutout=4" if mix == "cutout" else f"data.mix={mix}"
    summary = _online(tmp_path, "ema", option, "train.epochs=2").fit()
    assert summary["epochs"] == 2 and 0 <= summary["top1_err"] < 90


@pytest.mark.slow
def test_online_ema_trains_under_torchrun(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "aikd",
               "train", "-q", "-c", "configs/fashion_mnist/aikd.yaml", "-o", str(tmp_path / "run"), *DIGITS,
               "aikd.superior=ema", "data.train_limit=512"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["world_size"] == 2 and summary["teacher"] is None
    state = load_checkpoint(tmp_path / "run/checkpoints/last.safetensors").state["method"]
    assert any(k.startswith("superior.model.") for k in state)


def write_cifar100(root, n_train_per_class=2, n_test_per_class=1):
    """The official python layout: cifar-100-python/{train,test,meta} pickles with numpy arrays."""
    import pickle

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, per_class in (("train", n_train_per_class), ("test", n_test_per_class)):
        labels = [c for c in range(100) for _ in range(per_class)]
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * len(labels)}, fh)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [f"class{i}".encode() for i in range(100)]}, fh)


@pytest.mark.slow
def test_paper_config_runs_end_to_end_on_cifar_format_files(tmp_path):
    """configs/cifar100/aikd_preact_resnet18.yaml, shortened: both phases on real CIFAR-100 files."""
    write_cifar100(tmp_path / "data")
    result = run_pipeline("configs/cifar100/aikd_preact_resnet18.yaml",
                          [f"data.root={tmp_path / 'data'}", "train.epochs=1", "data.batch_size=50"],
                          tmp_path / "out", quiet=True, log=lambda m: None)
    assert result["student"]["num_train"] == 200 and result["student"]["num_test"] == 100
    assert result["student"]["model"] == "preact_resnet18"
    record = json.loads((tmp_path / "out/student/metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(record["stat.L_D"]) and np.isfinite(record["loss.adv"])


def test_teacher_of_another_architecture_is_refused(tmp_path):
    other = build_model("preact_resnet18", 10, 1, 8)
    path = save_checkpoint(tmp_path / "other.safetensors", other.state_dict(),
                           {**model_meta("preact_resnet18", "cifar", 10, 1, 8, [str(i) for i in range(10)]),
                            "epoch": 1})
    with pytest.raises(CheckpointError, match="same architecture"):
        Trainer(_train_aikd(tmp_path, teacher=path), tmp_path / "run", quiet=True)


def test_frozen_copies_stay_in_eval_mode_when_the_method_trains():
    student = nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.BatchNorm1d(3))
    ctx = MethodContext(num_classes=3, num_train=4, epochs=4, student=student)
    for config in (AIKDConfig(superior="ema"), AIKDConfig(previous="snapshot")):
        method = AIKD(config, ctx).train()
        frozen = method.superior.model if config.superior == "ema" else method.previous.model
        assert not frozen.training and not any(m.training for m in frozen.modules())
        assert method.adversary.critic.training  # the critic does train


def _superior_quality_script():
    """scripts/superior_quality.py, imported from its file (scripts/ is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "superior_quality.py"
    spec = importlib.util.spec_from_file_location("superior_quality", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_superior_quality_reads_the_in_run_superior_model_from_the_checkpoint(tmp_path):
    script = _superior_quality_script()
    for source, extra in (("ema", "aikd.ema_decay=0"), ("milestone", "aikd.ema_decay=0.99")):
        cfg = _train_aikd(tmp_path, f"aikd.superior={source}", extra, "aikd.superior_start=0.5",
                          "data.train_limit=400", "train.epochs=2")
        Trainer(cfg, tmp_path / source / "seed0" / "student", quiet=True).fit()
    assert len(script.finished_runs(tmp_path / "ema")) == 1
    # An EMA of decay 0 is the student after every step: the same model, the same numbers.
    ema = script.summarize(tmp_path / "ema")
    assert ema["superior"] == pytest.approx(ema["student"])
    # The milestone copy is the student after epoch 1 of 2: a different model with different numbers.
    milestone = script.summarize(tmp_path / "milestone")
    assert milestone["superior"] != pytest.approx(milestone["student"], abs=1e-6)


def test_phase_one_is_derived_from_the_common_settings_and_its_own_overrides_only(tmp_path):
    """phase2.* overrides shape the student only, phase1.* the superior model only; phase 1 is plain CE without a
    teacher on the student's data, model and recipe, and the student points at phase 1's cache entry."""
    from aikd.engine.pipeline import plan_pipeline

    config = "configs/fashion_mnist/aikd.yaml"
    plain = plan_pipeline(config, DIGITS, tmp_path)
    sup = plain.superior
    assert (sup.method, sup.teacher.checkpoint, sup.model, sup.data, sup.train, sup.seed) == \
        ("ce", None, plain.student.model, plain.student.data, plain.student.train, plain.student.seed)
    assert plain.student.teacher.checkpoint == str(plain.superior_dir / "checkpoints/last.safetensors")
    split = plan_pipeline(config, [*DIGITS, "phase2.train.lr=0.05", "phase1.train.epochs=3", "seed=4"], tmp_path)
    assert (split.student.train.lr, split.student.train.epochs, split.student.seed) == (0.05, 2, 4)
    assert (split.superior.train.lr, split.superior.train.epochs, split.superior.seed) == (0.1, 3, 4)
    assert split.superior_dir != plain.superior_dir
    # A phase-2-only change leaves phase 1 (and so its cache entry) as it was.
    only_student = plan_pipeline(config, [*DIGITS, "phase2.aikd.alpha_p=0.2", "phase2.train.lr=0.05"], tmp_path)
    assert only_student.superior_dir == plain.superior_dir and only_student.superior == plain.superior
    kd = plan_pipeline("configs/fashion_mnist/kd.yaml", [*DIGITS, "teacher.model=preact_resnet18"], tmp_path)
    assert kd.superior.model.name == "preact_resnet18" and kd.student.model.name == "small_cnn"


def test_in_run_copies_answer_from_their_epoch_and_a_resumed_milestone_keeps_its_copy():
    """Decided without reading ``ready`` on the host: the snapshot answers from epoch 1, the milestone copy is
    taken once as its epoch starts and kept when a run resumed inside that epoch starts it again."""
    student = nn.Linear(3, 2)
    snapshot, milestone = SnapshotPrevious(student), MilestoneSuperior(student, start_epoch=1)
    images = torch.ones(4, 3)
    assert snapshot.for_batch(Batch(images, torch.zeros(4), torch.arange(4), 0, 0)) == (None, None)
    snapshot.on_epoch_end(0, student)
    logits, filled = snapshot.for_batch(Batch(images, torch.zeros(4), torch.arange(4), 1, 0))
    assert logits.shape == (4, 2) and filled is None
    sources = (snapshot, milestone, BufferPrevious(4, 2), PretrainedSuperior(student), EMASuperior(student, 0.9, 0))
    assert all(isinstance(source, Source) for source in sources)  # one contract, one answer shape
    assert all(isinstance(source.for_batch(Batch(images, torch.zeros(4), torch.arange(4), 1, 0)), Targets)
               for source in sources)
    with torch.no_grad():
        student.weight.fill_(1.0)
    milestone.on_epoch_start(0, student)  # before its epoch: no copy
    assert not bool(milestone.ready) and not torch.equal(milestone.model.weight, student.weight)
    assert milestone.for_batch(Batch(images, torch.zeros(4), torch.arange(4), 0, 0)) == (None, None)
    milestone.on_epoch_start(1, student)
    assert bool(milestone.ready) and torch.equal(milestone.model.weight, torch.ones(2, 3))
    with torch.no_grad():
        student.weight.fill_(2.0)
    milestone.on_epoch_start(1, student)  # a run resumed inside epoch 1: the copy it resumed stays
    assert torch.equal(milestone.model.weight, torch.ones(2, 3))
    torch.testing.assert_close(milestone.for_batch(Batch(images, torch.zeros(4), torch.arange(4), 1, 0)).logits,
                               images @ torch.ones(3, 2) + milestone.model.bias)


def test_a_subclass_trains_ai_kd_with_a_critic_of_its_own():
    """AIKD.build_critic is the hook for another critic: it trains by autograd in the method's own steps."""

    class DeeperCriticAIKD(AIKD):
        def build_critic(self) -> nn.Module:
            c = self.ctx.num_classes
            return nn.Sequential(nn.Linear(c, 16), nn.LeakyReLU(0.2), nn.Linear(16, 16), nn.LeakyReLU(0.2),
                                 nn.Linear(16, 1), nn.Flatten(0))

    torch.manual_seed(0)
    student, superior = nn.Linear(6, 4), nn.Linear(6, 4).requires_grad_(False)
    with torch.no_grad():
        superior.bias.copy_(torch.tensor([3.0, -3.0, 3.0, -3.0]))  # logits the critic can tell from the student's
    method = DeeperCriticAIKD(AIKDConfig(critic_lr=1e-2, critic_steps=2),
                              MethodContext(num_classes=4, num_train=32, epochs=1, teacher=superior))
    start = [p.clone() for p in method.adversary.critic.parameters()]
    x, y = torch.randn(32, 6), torch.arange(32) % 4
    gaps = []
    for step in range(6):
        batch = Batch(x, y, torch.arange(32), 0, step)
        out = method.training_step(student, batch)
        method.update_auxiliary(batch, out)
        gaps.append(out.stats["critic_gap"].item())
        sum(out.losses.values()).backward()
        method.on_step_end(student, batch, out)
    assert "adv" in out.losses and student.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.adversary.critic.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(start, method.adversary.critic.parameters(), strict=True))
    assert gaps[-1] > gaps[0], gaps
    assert "adversary._extra_state" in method.state_dict()  # its Adam travels with the method's state


def test_aikd_rows_are_placed_in_the_order_their_names_document():
    """report_row's places (AIKDRow): Table 4's rows, an unnamed combination, then the in-run superior models."""
    from aikd.methods.aikd import AIKDRow

    settings = [{"alpha_p": 0, "adv_weight": 0}, {"alpha_g": 0, "adv_weight": 0}, {"adv_weight": 0}, {},
                {"alpha_g": 0}, {"superior": "ema"}, {"superior": "ema", "adv_weight": 0}, {"superior": "milestone"},
                {"superior": "milestone", "adv_weight": 0}]
    rows = [AIKD.report_row(AIKDConfig(**setting)) for setting in settings]
    assert [place for place, _ in rows] == list(AIKDRow)
    assert [name for _, name in rows] == [
        "Only Guide", "Only Progressive", "No Adv", "AI-KD", "AI-KD (adv, progressive)", "AI-KD online (EMA)",
        "AI-KD online (EMA), No Adv", "AI-KD online (milestone)", "AI-KD online (milestone), No Adv"]
