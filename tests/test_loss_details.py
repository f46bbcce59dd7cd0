"""Details of the losses, the critic and the schedules that the equation tests left open.

Each test here kills mutants that survived `make mutation` (mutmut over src/aikd/methods):
a default value, a sign, an argument passed on, a random generator honoured. Expected values
are computed by hand or by a formula written out here, never by calling the code under test
twice.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from aikd.errors import ConfigError
from aikd.methods.aekt import aekt_terms
from aikd.methods.aikd import adversarial_loss, critic_loss, critic_step, gradient_penalty, guide_loss, progressive_loss
from aikd.methods.amkd import pick_negatives
from aikd.methods.base import non_negative, positive, weight
from aikd.methods.bss import bss_attack, sample_attack_targets
from aikd.methods.pskd import pskd_alpha, pskd_targets
from aikd.methods.tfkd import tf_reg_loss, virtual_teacher


class QuadraticCritic(nn.Module):
    """D(x) = 1/2 sum_c a_c x_c^2, so grad_x D = a * x: its penalty depends on where it is taken."""

    def __init__(self, a: list[float]) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.a * x * x).sum(dim=1, keepdim=True)


def linear_critic(w: list[float], b: float) -> nn.Linear:
    """D(x) = w.x + b: grad_x D = w everywhere, so the penalty is (||w|| - 1)^2 whatever the interpolate."""
    critic = nn.Linear(len(w), 1)
    with torch.no_grad():
        critic.weight.copy_(torch.tensor([w]))
        critic.bias.fill_(b)
    return critic


REAL = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0], [-2.0, 0.5, 0.0], [1.0, 1.0, -3.0]], dtype=torch.float64)
FAKE = torch.tensor([[-1.0, 0.0, 2.0], [1.0, -2.0, 0.0], [0.5, 0.5, 4.0], [0.0, -1.0, 1.0]], dtype=torch.float64)


def test_gradient_penalty_at_the_interpolates_drawn_from_the_given_generator():
    a = [0.5, 2.0, -1.0]
    # The expected interpolation weights: one per row, in the inputs' dtype, from the same seeded generator.
    eps = torch.rand(4, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(999)  # the global RNG must not be what is used
    critic = QuadraticCritic(a)
    gp = gradient_penalty(critic, REAL, FAKE, generator=torch.Generator().manual_seed(5))

    a_ref = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    x_hat = eps * REAL + (1 - eps) * FAKE
    norms = torch.sqrt(((a_ref * x_hat) ** 2).sum(dim=1))
    expected = ((norms - 1) ** 2).mean()
    assert gp.item() == pytest.approx(expected.item(), rel=1e-12)

    # The penalty must train the critic: its gradient reaches the critic's weights.
    gp.backward()
    expected.backward()
    torch.testing.assert_close(critic.a.grad, a_ref.grad, rtol=1e-10, atol=1e-12)


def test_critic_loss_adds_ten_times_the_penalty_and_scores_real_above_fake():
    w, b = [0.6, -1.2, 2.0], 0.3
    critic = linear_critic(w, b)
    real, fake = REAL.float(), FAKE.float()
    loss, stats = critic_loss(critic, real, fake)
    wt = torch.tensor(w)
    d_real, d_fake = (real @ wt).mean().item() + b, (fake @ wt).mean().item() + b
    penalty = (math.sqrt(sum(x * x for x in w)) - 1) ** 2  # ||w|| = 2.41: a penalty of 1.99
    assert loss.item() == pytest.approx(d_fake - d_real + 10.0 * penalty, rel=1e-5)
    assert stats["critic_gap"].item() == pytest.approx(d_real - d_fake, rel=1e-5)
    assert stats["gp"].item() == pytest.approx(penalty, rel=1e-5)


@pytest.mark.parametrize("gp_weight", [None, 1.0])
def test_critic_step_descends_its_loss_with_the_given_penalty_weight(gp_weight):
    w, b, lr = [0.6, -1.2, 2.0], 0.3, 0.1
    critic = linear_critic(w, b)
    optimizer = torch.optim.SGD(critic.parameters(), lr=lr)
    real, fake = REAL.float(), FAKE.float()
    kwargs = {} if gp_weight is None else {"gp_weight": gp_weight}
    # Inside the caller's bf16 autocast the critic still runs in float32, forward and backward.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = critic_step(critic, optimizer, real, fake, **kwargs)
    lam = 10.0 if gp_weight is None else gp_weight
    wt = torch.tensor(w)
    norm = wt.norm().item()
    d_real, d_fake = (real @ wt).mean().item() + b, (fake @ wt).mean().item() + b
    assert stats["critic_loss"].item() == pytest.approx(d_fake - d_real + lam * (norm - 1) ** 2, rel=1e-6)
    # dL/dw = mean(fake) - mean(real) + lam 2 (||w|| - 1) w / ||w||; the bias cancels out of the loss.
    grad = fake.mean(0) - real.mean(0) + lam * 2 * (norm - 1) * wt / norm
    torch.testing.assert_close(critic.weight.detach()[0], wt - lr * grad, rtol=1e-5, atol=1e-6)
    assert critic.bias.item() == pytest.approx(b, abs=1e-7)


def test_adversarial_loss_is_minus_the_critics_mean_score():
    critic = linear_critic([1.0, -2.0, 0.5], 0.7)
    z = REAL.float()
    expected = -((z @ torch.tensor([1.0, -2.0, 0.5])).mean().item() + 0.7)  # scores 0.95, -6.3, 2.7, -2.3
    assert adversarial_loss(critic, z).item() == pytest.approx(expected, rel=1e-6)


def kl_at(target: torch.Tensor, student: torch.Tensor, t: float) -> float:
    """T^2 sum_c p_c (log p_c - log q_c), mean over rows, written out with exp and log."""
    total = 0.0
    for tr, sr in zip(target.tolist(), student.tolist(), strict=True):
        zt, zs = sum(math.exp(v / t) for v in tr), sum(math.exp(v / t) for v in sr)
        for vt, vs in zip(tr, sr, strict=True):
            p, q = math.exp(vt / t) / zt, math.exp(vs / t) / zs
            total += p * (math.log(p) - math.log(q))
    return t * t * total / len(target)


def test_guide_and_progressive_default_temperatures_are_the_papers():
    student, other = REAL.float(), FAKE.float()
    assert guide_loss(student, other).item() == pytest.approx(kl_at(other, student, 3.0), rel=1e-5)
    assert progressive_loss(student, other).item() == pytest.approx(kl_at(other, student, 1.0), rel=1e-5)


def test_pskd_default_alpha_and_soft_labels():
    assert pskd_alpha(0, 10) == pytest.approx(0.08)  # 0.8 x 1 / 10
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.5, 0.5]])  # mixed labels (Mixup, CutMix)
    previous = torch.tensor([[0.2, 0.2, 0.6], [1.0, 0.0, 0.0]])
    targets = pskd_targets(soft, previous, torch.tensor([True, False]), 0.25)
    expected = torch.tensor([[0.75 * 0.7 + 0.25 * 0.2, 0.75 * 0.3 + 0.25 * 0.2, 0.25 * 0.6], [0.0, 0.5, 0.5]])
    torch.testing.assert_close(targets, expected)


def test_virtual_teacher_has_the_given_number_of_classes_and_tf_reg_uses_its_correct_prob():
    labels = torch.tensor([0, 1])  # the last of the 4 classes never appears
    teacher = virtual_teacher(labels, 4, 0.7)
    torch.testing.assert_close(teacher, torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]]))
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5], [0.0, 2.0, 0.0, -1.0]])
    _, kd = tf_reg_loss(logits, labels, alpha=1.0, tau=1.0, correct_prob=0.7)
    p_d = [[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1]]
    expected = 0.0
    for row, lr in zip(p_d, logits.tolist(), strict=True):
        zt, zs = sum(math.exp(v) for v in row), sum(math.exp(v) for v in lr)
        for vt, vs in zip(row, lr, strict=True):
            p, q = math.exp(vt) / zt, math.exp(vs) / zs
            expected += p * math.log(p / q)
    assert kd.item() == pytest.approx(expected / 2, rel=1e-5)


def test_aekt_defaults_are_the_gap_explicit_weight_and_a_unit_implicit_weight():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
    teacher = torch.tensor([[3.0, -1.0, 0.0], [1.0, 2.0, -2.0]])
    labels = torch.tensor([0, 2])
    explicit, implicit = aekt_terms(student, teacher, labels, 1.0)
    tckd, nckd = [], []
    for s, t, y in zip(student.tolist(), teacher.tolist(), labels.tolist(), strict=True):
        ps = [math.exp(v) / sum(math.exp(u) for u in s) for v in s]
        pt = [math.exp(v) / sum(math.exp(u) for u in t) for v in t]
        bs, bt = [ps[y], 1 - ps[y]], [pt[y], 1 - pt[y]]
        w_gap = 1 + abs(pt[y] - ps[y])
        tckd.append(w_gap * sum(p * math.log(p / q) for p, q in zip(bt, bs, strict=True)))
        rest_s = [v for c, v in enumerate(ps) if c != y]
        rest_t = [v for c, v in enumerate(pt) if c != y]
        qs = [v / sum(rest_s) for v in rest_s]
        qt = [v / sum(rest_t) for v in rest_t]
        nckd.append(sum(p * math.log(p / q) for p, q in zip(qt, qs, strict=True)))
    assert explicit.item() == pytest.approx(sum(tckd) / 2, rel=1e-5)
    assert implicit.item() == pytest.approx(sum(nckd) / 2, rel=1e-5)


def test_random_choices_follow_the_given_generator_not_the_global_rng():
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    targets = torch.tensor([0, 1, 1, 0])
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    draws = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        draws.append((pick_negatives(targets, labels, torch.Generator().manual_seed(3))[0],
                      sample_attack_targets(logits, torch.Generator().manual_seed(3))))
    torch.testing.assert_close(draws[0][0], draws[1][0])
    torch.testing.assert_close(draws[0][1], draws[1][1])
    # ...and the draws come from that generator: another seed moves them.
    other = [pick_negatives(targets, labels, torch.Generator().manual_seed(s))[0] for s in range(8)]
    assert len({tuple(o.tolist()) for o in other}) > 1


def test_bss_attack_takes_ten_steps_by_default():
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(2, 3))
    with torch.no_grad():  # a linear teacher: each step covers eta of the way, so 10 steps of 1e-3 never flip it
        teacher[1].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        teacher[1].bias.zero_()
    images = torch.tensor([[[[5.0, 0.0]]], [[[0.0, 5.0]]]])
    result = bss_attack(teacher.eval(), images, torch.tensor([1, 0]), eta=1e-3)
    assert result.steps == 10 and not result.flipped.any()


def test_range_checks_accept_their_bounds_and_name_key_rule_and_value():
    for check, ok, bad, rule in [(positive, [1e-9, 3.0], [0.0, -1.0], "must be positive"),
                                 (non_negative, [0.0, 2.0], [-1e-9], "must be >= 0"),
                                 (weight, [0.0, 1.0, 0.5], [-0.01, 1.01, 2.0], "is a weight in [0, 1]")]:
        for value in ok:
            check("aikd.alpha_g", value)
        for value in bad:
            with pytest.raises(ConfigError) as err:
                check("aikd.alpha_g", value)
            assert str(err.value) == f"Config key 'aikd.alpha_g' {rule}, got {value!r}."
