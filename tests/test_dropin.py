"""The drop-in losses (AIKDLoss, PSKDLoss) against the method classes, and the Lightning example run for an epoch."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from aikd.methods.aikd import AIKD, AIKDConfig, AIKDLoss
from aikd.methods.base import Batch, MethodContext
from aikd.methods.pskd import PSKD, PSKDConfig, PSKDLoss

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lightning_aikd.py"


def test_pskd_loss_equals_the_pskd_method_step_by_step():
    torch.manual_seed(0)
    student, n, c, epochs = nn.Linear(6, 4), 12, 4, 3
    x, y = torch.randn(n, 6), torch.arange(n) % c
    method, criterion = PSKD(PSKDConfig(), MethodContext(num_classes=c, num_train=n, epochs=epochs)), \
        PSKDLoss(c, n, epochs)
    for epoch in range(epochs):
        for idx in torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).split(5):
            out = method.training_step(student, Batch(x[idx], y[idx], idx, epoch, 0))
            loss = criterion(student(x[idx]), y[idx], idx, epoch)
            assert loss.item() == pytest.approx(out.losses["soft_ce"].item(), rel=1e-6)
            method.on_step_end(student, Batch(x[idx], y[idx], idx, epoch, 0), out)
            with torch.no_grad():
                student.weight.add_(0.05)  # the student moves between steps
    assert torch.equal(criterion.buffer.logits, method.buffer.logits)


def test_aikd_loss_equals_the_aikd_method_with_a_pretrained_superior():
    torch.manual_seed(1)
    student, superior, n, c = nn.Linear(6, 4), nn.Linear(6, 4).requires_grad_(False), 10, 4
    x, y = torch.randn(n, 6), torch.arange(n) % c
    ctx = MethodContext(num_classes=c, num_train=n, epochs=2, teacher=superior)
    torch.manual_seed(5)
    method = AIKD(AIKDConfig(), ctx)
    torch.manual_seed(5)
    criterion = AIKDLoss(c, n)
    criterion.adversary.critic.load_state_dict(method.adversary.critic.state_dict())  # same critic start
    for epoch in range(2):
        for idx in (torch.arange(0, 5), torch.arange(5, 10)):
            batch = Batch(x[idx], y[idx], idx, epoch, 0)
            torch.manual_seed(7)  # the gradient penalty's interpolation draws
            out = method.training_step(student, batch)
            method.update_auxiliary(batch, out)
            torch.manual_seed(7)
            loss = criterion(student(x[idx]), y[idx], idx, superior(x[idx]))
            assert loss.item() == pytest.approx(sum(out.losses.values()).item(), rel=1e-5)
            assert {k: round(v.item(), 5) for k, v in criterion.last_terms.items()} == \
                {k: round(v.item(), 5) for k, v in out.losses.items()}
            method.on_step_end(student, batch, out)
    for (key, a), b in zip(method.adversary.critic.state_dict().items(),
                            criterion.adversary.critic.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=key)


def test_aikd_loss_state_dict_carries_buffer_critic_and_its_optimizer(tmp_path):
    criterion = AIKDLoss(3, 8)
    logits, sup = torch.randn(8, 3, requires_grad=True), torch.randn(8, 3)
    criterion(logits, torch.arange(8) % 3, torch.arange(8), sup).backward()
    torch.save(criterion.state_dict(), tmp_path / "loss.pt")
    restored = AIKDLoss(3, 8)
    restored.load_state_dict(torch.load(tmp_path / "loss.pt", weights_only=False))
    assert torch.equal(restored.buffer.logits, criterion.buffer.logits)
    moments = [s["exp_avg"] for s in restored.adversary.optimizer.state_dict()["state"].values()]
    assert moments and all(torch.equal(a, s["exp_avg"]) for a, s in
                           zip(moments, criterion.adversary.optimizer.state_dict()["state"].values(), strict=True))


def test_aikd_loss_loads_a_state_dict_saved_before_the_critic_was_renamed(tmp_path):
    """Saved before issue 34: the critic's weights under adversary.disc.*, the buffer under buffer.logits and the
    critic's Adam as the loss's own extra state (already "critic_opt")."""
    criterion = AIKDLoss(3, 8)
    logits, sup = torch.randn(8, 3, requires_grad=True), torch.randn(8, 3)
    criterion(logits, torch.arange(8) % 3, torch.arange(8), sup).backward()
    renamed = {"previous.buffer.logits": "buffer.logits", "adversary._extra_state": "_extra_state"}
    old = {renamed.get(k, k.replace("adversary.critic.", "adversary.disc.")): v
           for k, v in criterion.state_dict().items()}
    assert {"buffer.logits", "_extra_state"} <= set(old)
    assert "adversary.disc.theta" in old
    torch.save(old, tmp_path / "old.pt")
    restored = AIKDLoss(3, 8)
    restored.load_state_dict(torch.load(tmp_path / "old.pt", weights_only=False))
    assert not torch.equal(AIKDLoss(3, 8).adversary.critic.theta, criterion.adversary.critic.theta)  # fresh: other
    assert torch.equal(restored.adversary.critic.theta, criterion.adversary.critic.theta)
    moments = [s["exp_avg"] for s in restored.adversary.optimizer.state_dict()["state"].values()]
    assert moments and all(torch.equal(a, s["exp_avg"]) for a, s in
                           zip(moments, criterion.adversary.optimizer.state_dict()["state"].values(), strict=True))


def test_lightning_example_trains_an_epoch_and_checkpoints(tmp_path, one_thread):
    pytest.importorskip("lightning")
    spec = importlib.util.spec_from_file_location("lightning_aikd", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    trainer, module = example.main(epochs=1, limit=400, out=str(tmp_path / "out"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics["val/top1_err"] < 90 and all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert int(module.criterion.buffer.filled.sum()) == 320  # every training sample written once
    [checkpoint] = list(tmp_path.rglob("*.ckpt"))
    assert checkpoint.is_relative_to(tmp_path / "out")  # its own folder, never the current one
    again = example.AIKDModule.load_from_checkpoint(checkpoint, num_classes=10, num_train=400)
    for key, value in module.state_dict().items():
        if isinstance(value, torch.Tensor):  # the buffer's unseen (validation) samples are NaN rows
            torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    steps = {int(s["step"]) for s in again.criterion.adversary.optimizer.state_dict()["state"].values()}
    assert steps == {5}  # the critic's Adam state came back: one step per batch of 320 / 64


def test_lightning_is_not_a_core_dependency():
    done = subprocess.run([sys.executable, "-c", "import aikd.methods, aikd.engine, sys; "
                           "print('lightning' in sys.modules, 'timm' in sys.modules)"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]


def _deeper_critic(num_classes: int) -> nn.Module:
    """The paper's critic with a second hidden layer: no closed form, so it trains by autograd."""
    return nn.Sequential(nn.Linear(num_classes, 32), nn.LayerNorm(32), nn.LeakyReLU(0.2), nn.Linear(32, 32),
                         nn.LeakyReLU(0.2), nn.Linear(32, 1), nn.Flatten(0))


def test_aikd_loss_trains_a_critic_of_ones_own_and_checkpoints_its_optimizer(tmp_path):
    torch.manual_seed(0)
    c, n = 5, 64
    criterion = AIKDLoss(c, n, critic_lr=1e-2, critic_steps=3, critic=_deeper_critic(c))
    superior = torch.randn(n, c) * 3 + 2.0  # a superior the student's logits are far from
    student = torch.randn(n, c, requires_grad=True)
    critic = criterion.adversary.critic

    def gap() -> float:  # E[D(superior)] - E[D(student)], the critic's Wasserstein estimate
        with torch.no_grad():
            return (critic(superior).mean() - critic(student).mean()).item()

    gaps = [gap()]
    for _ in range(5):
        criterion(student, torch.arange(n) % c, torch.arange(n), superior).backward()
        gaps.append(gap())
    assert gaps[-1] > gaps[0] + 0.5, gaps  # it learns to tell the superior's logits from the student's
    assert criterion.last_terms["adv"].item() != 0 and student.grad.abs().sum() > 0
    assert all(p.grad is None for p in criterion.adversary.critic.parameters())  # L_A moves the student only
    torch.save(criterion.state_dict(), tmp_path / "loss.pt")
    restored = AIKDLoss(c, n, critic=_deeper_critic(c))
    restored.load_state_dict(torch.load(tmp_path / "loss.pt", weights_only=False))
    pairs = zip(restored.adversary.critic.parameters(), criterion.adversary.critic.parameters(), strict=True)
    for mine, saved in pairs:
        assert torch.equal(mine, saved)
    states = [o.state_dict()["state"] for o in (restored.adversary.optimizer, criterion.adversary.optimizer)]
    assert len(states[0]) == 8 and all(torch.equal(states[0][i]["exp_avg"], states[1][i]["exp_avg"])
                                       for i in states[1])
