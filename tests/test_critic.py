"""The closed-form critic (aikd.methods.critic) against double-backward autograd, and against hand values.

The reference is the package's general path, the critic as aikd trained it before: ordinary layers
(``LayeredCritic``) and ``torch.autograd.grad(create_graph=True)`` (``critic_loss``), stepped here by a plain
torch.optim.Adam (``reference_steps``) and in the package by ``train_critic``. Every comparison runs in
float64 on random inputs, with BatchNorm in training mode, so that a wrong sign, a missing square or a dropped
BatchNorm term shows as a difference many orders of magnitude above rounding.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from aikd.methods.aikd import adversarial_loss
from aikd.methods.critic import Critic, LayeredCritic, critic_loss, critic_optimizer, train_critic

F64 = torch.float64
ReferenceCritic = LayeredCritic.from_critic  # the same function and weights, from ordinary layers


def reference_steps(critic: LayeredCritic, real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor,
                    gp_weight: float, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> list[tuple]:
    """len(eps) steps of a plain torch.optim.Adam on autograd's L_D; each step's (L_D, gap, gp, gradient) before
    its update (independent of train_critic's loop: its own Adam, the interpolation weights given)."""
    optimizer = torch.optim.Adam(critic.parameters(), lr=lr, betas=betas)
    out = []
    for e in eps:
        optimizer.zero_grad(set_to_none=True)
        stats = critic_loss(critic, real, fake, e, gp_weight)
        stats.loss.backward()
        out.append((stats.loss.detach(), stats.gap, stats.gp, critic.flat_grad().clone()))
        optimizer.step()
    return out


def random_critic(num_classes: int, norm: str, reduce: str = "mean", seed: int = 0) -> Critic:
    """A critic whose weights are moved off their initialisation (gamma away from 1, beta away from 0)."""
    torch.manual_seed(seed)
    critic = Critic(num_classes, norm=norm, reduce=reduce).to(F64)
    with torch.no_grad():
        critic.theta.add_(0.3 * torch.randn_like(critic.theta))
    return critic


def logits(n: int, c: int, scale: float, seed: int) -> torch.Tensor:
    return scale * torch.randn(n, c, dtype=F64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_loss_penalty_and_gradient_equal_double_backward_autograd(num_classes, norm, reduce):
    critic = random_critic(num_classes, norm, reduce)
    reference = ReferenceCritic(critic)
    real, fake = logits(48, num_classes, 3.0, 1), logits(48, num_classes, 1.0, 2)
    eps = torch.rand(48, 1, dtype=F64, generator=torch.Generator().manual_seed(3))

    grad, stats = critic.loss_and_grad(real, fake, eps, 10.0)
    stats = critic_loss(reference, real, fake, eps, 10.0)
    loss, gap, gp = stats.loss, stats.gap, stats.gp
    loss.backward()

    assert gp.item() > 1e-3  # a penalty far from 0, so its gradient matters
    torch.testing.assert_close(stats.gp, gp.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.loss, loss.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.gap, gap.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, reference.flat_grad(), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_critic_after_k_adam_steps_equals_the_autograd_critic(num_classes, norm):
    critic = random_critic(num_classes, norm, seed=4)
    reference = ReferenceCritic(critic)
    real, fake = logits(32, num_classes, 2.0, 5), logits(32, num_classes, 1.0, 6)
    steps, lr = 6, 1e-2  # a large learning rate, so the weights move far from where they started
    torch.manual_seed(11)
    eps = torch.rand(steps, 32, 1, dtype=F64)  # what train_critic draws: one (N, 1) per step, all at once
    expected = reference_steps(reference, real, fake, eps, 10.0, lr, betas=(0.5, 0.9))

    torch.manual_seed(11)
    stats = train_critic(critic, critic_optimizer(critic, lr, (0.5, 0.9)), real, fake, steps=steps)

    assert (critic.theta - ReferenceCritic(random_critic(num_classes, norm, seed=4)).flat()).abs().max() > 1e-2
    torch.testing.assert_close(critic.theta.detach(), reference.flat(), rtol=0, atol=1e-9)
    last_loss, last_gap, last_gp, _ = expected[-1]
    torch.testing.assert_close(stats.loss, last_loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.gap, last_gap, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.gp, last_gp, rtol=1e-9, atol=1e-12)


def linear_critic(w: list[float], b: float, slope: float = 1.0) -> Critic:
    """D(x) = LeakyReLU(w.x + b): one hidden unit, no normalisation, one output, so gradients can be written by hand.

    With slope 1 it is the linear critic w.x + b, whose input gradient is w everywhere.
    """
    critic = Critic(len(w), hidden=1, out_features=1, negative_slope=slope, reduce="sum", norm="none").to(F64)
    with torch.no_grad():
        critic.weight1.copy_(torch.tensor([w], dtype=F64))
        critic.bias1.fill_(b)
        critic.weight2.fill_(1.0)
        critic.bias2.fill_(0.0)
    return critic


REAL = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0], [-2.0, 0.5, 0.0], [1.0, 1.0, -3.0]], dtype=F64)
FAKE = torch.tensor([[-1.0, 0.0, 2.0], [1.0, -2.0, 0.0], [0.5, 0.5, 4.0], [0.0, -1.0, 1.0]], dtype=F64)
HALF = torch.full((4, 1), 0.5, dtype=F64)


def test_penalty_of_a_linear_critic_is_its_norm_minus_one_squared():
    assert linear_critic([0.6, 0.8, 0.0], 0.1).loss_and_grad(REAL, FAKE, HALF, 10.0)[1].gp.item() == \
        pytest.approx(0.0, abs=1e-14)  # ||w|| = 1: no penalty anywhere
    # ||w|| = 2: (2 - 1)^2 = 1 at every interpolate; ||w|| = 0.5: (0.5 - 1)^2 = 0.25.
    assert linear_critic([1.2, 1.6, 0.0], 0.1).loss_and_grad(REAL, FAKE, HALF, 10.0)[1].gp.item() == \
        pytest.approx(1.0, rel=1e-12)
    assert linear_critic([0.3, 0.4, 0.0], 0.1).loss_and_grad(REAL, FAKE, HALF, 10.0)[1].gp.item() == \
        pytest.approx(0.25, rel=1e-12)


def test_critic_loss_and_gradient_of_a_linear_critic_by_hand():
    w, b, lam = [0.6, -1.2, 2.0], 0.3, 10.0
    critic = linear_critic(w, b)
    grad, stats = critic.loss_and_grad(REAL, FAKE, HALF, lam)
    wt = torch.tensor(w, dtype=F64)
    d_real, d_fake = (REAL @ wt).mean().item() + b, (FAKE @ wt).mean().item() + b
    norm = math.sqrt(sum(x * x for x in w))  # 2.41: a penalty of 1.99
    assert stats.loss.item() == pytest.approx(d_fake - d_real + lam * (norm - 1) ** 2, rel=1e-12)
    assert stats.gap.item() == pytest.approx(d_real - d_fake, rel=1e-12)
    # dL/dw = mean(fake) - mean(real) + lam 2 (||w|| - 1) w / ||w||; the bias cancels out of L_D; with W2 = 1
    # dL/dW2 = mean(fake) w - mean(real) w + ... = the same terms seen from the second layer.
    d_w = FAKE.mean(0) - REAL.mean(0) + lam * 2 * (norm - 1) * wt / norm
    torch.testing.assert_close(grad[:3], d_w, rtol=1e-12, atol=1e-12)
    assert grad[3].item() == pytest.approx(0.0, abs=1e-12)  # b1
    assert grad[5].item() == pytest.approx(0.0, abs=1e-12)  # b2
    d_w2 = d_fake - d_real + lam * 2 * (norm - 1) * norm  # D = W2 (w.x + b): dD/dW2 = w.x + b, d||G||/dW2 = ||w||
    assert grad[4].item() == pytest.approx(d_w2, rel=1e-12)


def test_penalty_is_taken_at_the_interpolates_of_the_given_weights():
    # D = LeakyReLU_0.25(x_0): slope 1 where the interpolate's first coordinate is positive, 0.25 elsewhere, so
    # the penalty is (1 - 1)^2 = 0 at those rows and (0.25 - 1)^2 = 0.5625 at the others.
    critic = linear_critic([1.0, 0.0, 0.0], 0.0, slope=0.25)
    real = torch.tensor([[2.0, 0, 0], [2.0, 0, 0], [2.0, 0, 0], [2.0, 0, 0]], dtype=F64)
    fake = torch.tensor([[-2.0, 0, 0], [-2.0, 0, 0], [-2.0, 0, 0], [-2.0, 0, 0]], dtype=F64)
    eps = torch.tensor([[0.9], [0.8], [0.3], [0.1]], dtype=F64)  # x_hat_0 = 4 eps - 2: +1.6, +1.2, -0.8, -1.6
    gp = critic.loss_and_grad(real, fake, eps, 10.0)[1].gp.item()
    assert gp == pytest.approx(2 * 0.5625 / 4, rel=1e-12)
    # Swapping real and fake moves the interpolates to 2 - 4 eps: -1.6, -1.2, +0.8, +1.6 (the same count each side),
    # and the weights 1 - eps: +1.6 +1.2 -0.8 -1.6 again; a lopsided eps tells them apart.
    lopsided = torch.tensor([[0.9], [0.8], [0.7], [0.1]], dtype=F64)
    assert critic.loss_and_grad(real, fake, lopsided, 10.0)[1].gp.item() == pytest.approx(0.5625 / 4, rel=1e-12)
    assert critic.loss_and_grad(fake, real, lopsided, 10.0)[1].gp.item() == pytest.approx(3 * 0.5625 / 4, rel=1e-12)


def test_adversarial_loss_is_minus_the_critics_mean_score():
    critic = linear_critic([1.0, -2.0, 0.5], 0.7)
    expected = -((REAL @ torch.tensor([1.0, -2.0, 0.5], dtype=F64)).mean().item() + 0.7)
    assert adversarial_loss(critic.float(), REAL.float()).item() == pytest.approx(expected, rel=1e-6)


def test_adversarial_gradient_reaches_the_student_not_the_critic():
    critic = random_critic(3, "batch").float()
    student = torch.randn(8, 3, requires_grad=True)
    adversarial_loss(critic, student).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert critic.theta.grad is None


def test_train_critic_runs_in_float32_inside_a_bf16_autocast():
    critic = random_critic(5, "batch").float()
    twin = copy.deepcopy(critic)
    real, fake = logits(16, 5, 2.0, 1).float(), logits(16, 5, 1.0, 2).float()
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = train_critic(critic, critic_optimizer(critic, 1e-2), real, fake, steps=2)
    torch.manual_seed(3)
    outside = train_critic(twin, critic_optimizer(twin, 1e-2), real, fake, steps=2)
    assert inside.loss.dtype == torch.float32
    torch.testing.assert_close(critic.theta, twin.theta, rtol=0, atol=0)
    torch.testing.assert_close(inside.loss, outside.loss, rtol=0, atol=0)


def test_a_nonfinite_step_leaves_the_critic_and_its_optimizer_as_they_were():
    critic = random_critic(5, "batch").float()
    optimizer = critic_optimizer(critic, 0.1)
    before = critic.theta.detach().clone()
    stats = train_critic(critic, optimizer, torch.randn(8, 5), torch.full((8, 5), float("nan")), steps=3)
    assert not torch.isfinite(stats.loss)
    assert torch.equal(critic.theta, before)
    assert all(int(state["step"]) == 0 for state in optimizer.state.values())


def test_weight_views_follow_copies_moves_and_loaded_weights():
    critic = random_critic(4, "batch")
    for other in (copy.deepcopy(critic), critic.float()):
        with torch.no_grad():
            other.theta.zero_()
        assert other.weight1.abs().sum() == 0 and other.gamma.abs().sum() == 0
    fresh = Critic(4).to(F64)
    fresh.load_state_dict(random_critic(4, "batch", seed=9).state_dict())
    torch.testing.assert_close(fresh.weight2, random_critic(4, "batch", seed=9).weight2)


def test_initialisation_is_pytorchs_for_the_same_layers():
    torch.manual_seed(0)
    critic = Critic(10)
    torch.manual_seed(0)
    first, second = torch.nn.Linear(10, 64), torch.nn.Linear(64, 32)
    torch.testing.assert_close(critic.weight1, first.weight.detach(), rtol=0, atol=0)
    torch.testing.assert_close(critic.bias2, second.bias.detach(), rtol=0, atol=0)
    assert torch.equal(critic.gamma, torch.ones(64)) and torch.equal(critic.beta, torch.zeros(64))


@pytest.mark.slow
def test_compiled_critic_step_equals_eager():
    from aikd.compiling import compiled_or_eager

    critic = random_critic(10, "batch").float()
    compiled = compiled_or_eager(critic.loss_and_grad, "test")
    real, fake = logits(64, 10, 2.0, 1).float(), logits(64, 10, 1.0, 2).float()
    eps = torch.rand(64, 1)
    grad, stats = compiled(real, fake, eps, 10.0)
    assert compiled.failed is None  # this machine has the toolchain: it really compiled
    expected_grad, expected = critic.loss_and_grad(real, fake, eps, 10.0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats.loss, expected.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_explicit_adam_update_equals_torch_adam_and_skips_where_not_ok(weight_decay):
    """adam_update (the compiled critic's Adam) against torch.optim.Adam's own step, in float64; a step that is
    not ok changes nothing, the step count included."""
    from aikd.methods.critic import adam_settings, adam_update

    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(50, dtype=F64, generator=gen)
    grads = [torch.randn(50, dtype=F64, generator=gen) for _ in range(4)]
    reference = theta.clone().requires_grad_(True)
    adam = torch.optim.Adam([reference], lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay,
                            foreach=False)
    reference.grad = grads[0]
    adam.step()  # the state, in torch's format
    settings = adam_settings(adam, reference)
    values = reference.detach().clone(), settings.exp_avg.clone(), settings.exp_avg_sq.clone(), settings.step.clone()
    for i, grad in enumerate(grads[1:]):
        ok = torch.tensor(i != 1)  # the second of these steps is skipped
        values = adam_update(values[0], grad, *values[1:], ok, settings)
        if i != 1:
            reference.grad = grad
            adam.step()
    state = adam.state[reference]
    assert float(values[3]) == float(state["step"]) == 3
    torch.testing.assert_close(values[0], reference.detach(), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(values[1], state["exp_avg"], rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(values[2], state["exp_avg_sq"], rtol=1e-13, atol=1e-14)
    assert (values[0] - theta).abs().max() > 0.05  # it moved


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_critic_steps_in_one_function_equal_the_autograd_critic(norm):
    """critic_steps (what train.compile compiles; here eager) after a first step through torch.optim.Adam: the
    same weights as double-backward autograd with torch's Adam, and the interpolation weights drawn in the same
    order from the global generator. The optimizer's state keeps torch's format and count."""
    from functools import partial

    from aikd.methods.critic import critic_steps

    critic = random_critic(10, norm, seed=4)
    reference = ReferenceCritic(critic)
    real, fake = logits(32, 10, 2.0, 5), logits(32, 10, 1.0, 6)
    steps, lr = 6, 1e-2
    torch.manual_seed(11)
    expected = reference_steps(reference, real, fake, torch.rand(steps, 32, 1, dtype=F64), 10.0, lr, betas=(0.5, 0.9))

    optimizer = critic_optimizer(critic, lr, (0.5, 0.9))
    torch.manual_seed(11)
    train_critic(critic, optimizer, real, fake, steps=1)
    state_keys = set(optimizer.state_dict()["state"][0])
    stats = train_critic(critic, optimizer, real, fake, steps=steps - 1, fused_steps=partial(critic_steps, critic))

    torch.testing.assert_close(critic.theta.detach(), reference.flat(), rtol=0, atol=1e-9)
    torch.testing.assert_close(stats.loss, expected[-1][0], rtol=1e-9, atol=1e-12)
    assert set(optimizer.state_dict()["state"][0]) == state_keys and float(optimizer.state[critic.theta]["step"]) == 6
    # a non-finite batch: every step skipped, on the device, nothing changed
    before = critic.theta.detach().clone(), optimizer.state[critic.theta]["exp_avg"].clone()
    nan = torch.full_like(fake, float("nan"))
    stats = train_critic(critic, optimizer, real, nan, steps=3, fused_steps=partial(critic_steps, critic))
    assert not torch.isfinite(stats.loss) and float(optimizer.state[critic.theta]["step"]) == 6
    assert torch.equal(critic.theta, before[0]) and torch.equal(optimizer.state[critic.theta]["exp_avg"], before[1])


@pytest.mark.slow
def test_compiled_critic_steps_equal_eager():
    """The K critic steps and Adam's updates compiled as one region (train.compile, Adversary): really compiled,
    and the same weights as the eager step-by-step loop with the fused Adam kernel. In float64: Adam divides by
    the root of the squared gradients, so a weight whose gradient is near zero (BatchNorm's first bias: zero
    but for rounding) steps by about lr whatever the gradient's rounding; float64 keeps that rounding far
    below any gradient here."""
    from aikd.methods.critic import Adversary

    critic = random_critic(10, "batch")
    compiled, eager = Adversary(critic, 1e-2, steps=3, compile=True), Adversary(copy.deepcopy(critic), 1e-2, steps=3)
    real, fake = logits(64, 10, 2.0, 1), logits(64, 10, 1.0, 2)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for _ in range(3):  # the first call creates Adam's state step by step; the next two are compiled
        torch.manual_seed(5)
        got = compiled.learn(real, fake)
        torch.manual_seed(5)
        expected = eager.learn(real, fake)
    assert compiled.fused_steps.failed is None
    assert (compiled.critic.theta - random_critic(10, "batch").theta).abs().max() > 1e-2  # it moved
    torch.testing.assert_close(compiled.critic.theta, eager.critic.theta, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-9, atol=1e-9)
    assert compiled.optimizer.state_dict()["state"][0]["step"] == eager.optimizer.state_dict()["state"][0]["step"] == 9


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_the_general_path_and_the_closed_form_train_alike_through_train_critic(norm):
    """train_critic picks the closed form for a Critic and autograd for its LayeredCritic twin: from the same weights
    and the same draws, the same L_D, gap, penalty and weights after several Adam steps (a large learning rate,
    real and fake logits of different scales, so a sign or a square slip in either path would show)."""
    from aikd.methods.critic import has_closed_form

    critic = random_critic(10, norm, seed=7)
    layered = LayeredCritic.from_critic(critic)
    assert has_closed_form(critic) and not has_closed_form(layered)
    real, fake = logits(32, 10, 3.0, 8), logits(32, 10, 0.5, 9)
    fast_opt, slow_opt = critic_optimizer(critic, 1e-2, (0.5, 0.9)), critic_optimizer(layered, 1e-2, (0.5, 0.9))
    for steps in (1, 4):  # the first call creates Adam's state (the fused kernel's path after it)
        torch.manual_seed(steps)
        fast = train_critic(critic, fast_opt, real, fake, steps=steps)
        torch.manual_seed(steps)
        slow = train_critic(layered, slow_opt, real, fake, steps=steps)
        for got, want in ((slow.loss, fast.loss), (slow.gap, fast.gap), (slow.gp, fast.gp)):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert fast.gp.item() > 1e-3 and not slow.loss.requires_grad
    assert (critic.theta - random_critic(10, norm, seed=7).theta).abs().max() > 1e-2  # it moved
    torch.testing.assert_close(layered.flat(), critic.theta.detach(), rtol=0, atol=1e-9)
    assert all(not p.requires_grad for p in critic.parameters())
    assert all(p.requires_grad for p in layered.parameters())  # as it came: train_critic gives the flags back


def deeper_critic(num_classes: int) -> torch.nn.Module:
    """A critic of another architecture: the paper's with a second hidden layer (no closed form for it)."""
    return torch.nn.Sequential(torch.nn.Linear(num_classes, 32), torch.nn.LayerNorm(32), torch.nn.LeakyReLU(0.2),
                               torch.nn.Linear(32, 32), torch.nn.LeakyReLU(0.2), torch.nn.Linear(32, 1),
                               torch.nn.Flatten(0))


def test_a_critic_with_an_extra_layer_trains_as_plain_autograd_does_and_learns():
    from aikd.methods.critic import Adversary

    torch.manual_seed(0)
    critic = deeper_critic(5).to(F64)
    twin = copy.deepcopy(critic)
    adversary = Adversary(critic, 1e-2, betas=(0.5, 0.9), steps=5)
    real, fake = logits(64, 5, 1.0, 1) + 2.0, logits(64, 5, 1.0, 2)  # two clouds a critic can tell apart
    gaps = []
    for call in range(4):
        torch.manual_seed(100 + call)
        gaps.append(adversary.learn(real, fake).gap.item())
    draws = []  # independently: a plain Adam on autograd's L_D with the same interpolation draws
    for call in range(4):
        torch.manual_seed(100 + call)
        draws.append(torch.rand(5, 64, 1, dtype=F64))
    eps = torch.cat(draws)
    optimizer = torch.optim.Adam(twin.parameters(), lr=1e-2, betas=(0.5, 0.9))
    for e in eps:
        optimizer.zero_grad()
        critic_loss(twin, real, fake, e, 10.0).loss.backward()
        optimizer.step()
    for mine, theirs in zip(critic.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)
    assert gaps[-1] > gaps[0] + 0.5, gaps  # the Wasserstein estimate grows as the critic learns
    assert not any(p.requires_grad for p in critic.parameters())  # constants outside its steps


def test_l_a_through_a_critic_module_moves_the_student_only_and_in_float32():
    from aikd.methods.critic import Adversary

    critic = deeper_critic(4)
    Adversary(critic, 1e-3)  # takes the critic's weights out of the student's graph
    student = torch.randn(8, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = adversarial_loss(critic, student)
    assert loss.dtype == torch.float32
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert all(p.grad is None for p in critic.parameters())


def test_a_critic_subclass_that_changes_the_function_but_not_its_derivatives_is_refused():
    with pytest.raises(TypeError, match=r"overrides Critic\.forward but not Critic\.loss_and_grad"):
        class Squared(Critic):
            def forward(self, logits):
                return super().forward(logits) ** 2
