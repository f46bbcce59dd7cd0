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
from aikd.methods.aikd import guide_loss, progressive_loss, progressive_term
from aikd.methods.amkd import pick_negatives
from aikd.methods.base import non_negative, positive, weight
from aikd.methods.bss import bss_attack, sample_attack_targets
from aikd.methods.pskd import pskd_alpha, pskd_targets
from aikd.methods.tfkd import tf_reg_loss, virtual_teacher

REAL = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0], [-2.0, 0.5, 0.0], [1.0, 1.0, -3.0]], dtype=torch.float64)
FAKE = torch.tensor([[-1.0, 0.0, 2.0], [1.0, -2.0, 0.0], [0.5, 0.5, 4.0], [0.0, -1.0, 1.0]], dtype=torch.float64)


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


def test_progressive_term_skipping_samples_without_a_previous_prediction():
    """first_epoch="skip": T^2 KL summed over the samples with an entry, divided by the whole batch; the others
    (NaN rows, as the buffer keeps them) add nothing, not even a NaN gradient."""
    student = REAL.float().requires_grad_()
    previous = FAKE.float().clone()
    previous[[1, 3]] = float("nan")  # no entry yet
    filled = torch.tensor([True, False, True, False])
    term = progressive_term(student, torch.tensor([0, 1, 2, 0]), previous, filled, 2.0, "skip")
    expected = kl_at(FAKE[[0, 2]], REAL[[0, 2]], 2.0) * 2 / 4  # kl_at averages its two rows: sum / 4
    assert term.item() == pytest.approx(expected, rel=1e-5)
    (grad,) = torch.autograd.grad(term, student)
    assert torch.isfinite(grad).all() and float(grad[[1, 3]].abs().sum()) == 0.0 and float(grad[0].abs().sum()) > 0
    none = progressive_term(student, torch.tensor([0, 1, 2, 0]), previous, torch.zeros(4, dtype=torch.bool), 2.0,
                            "skip")
    assert none.item() == 0.0


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
