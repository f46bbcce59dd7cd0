"""AEKT, BSS and AMKD: AEKT's reduction to DKD and its adaptive weights and head against independent numpy
formulas, the BSS attack replicated step by step in numpy on linear teachers, base-sample selection, attack
targets and schedules, AMKD's triplet term, and short end-to-end runs on scikit-learn digits."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import aikd.methods.bss as bss_module
from aikd.config import load_config
from aikd.engine import Trainer
from aikd.engine.checkpoint import load_checkpoint
from aikd.engine.pipeline import run_pipeline
from aikd.methods import METHODS
from aikd.methods.aekt import AEKT, AEKTConfig, aekt_terms, explicit_weight, implicit_weight
from aikd.methods.amkd import AMKD, AMKDConfig, pick_negatives, triplet_loss
from aikd.methods.base import Batch, MethodContext
from aikd.methods.bss import (
    BSS,
    AttackResult,
    BSSConfig,
    bss_attack,
    bss_weights,
    sample_attack_targets,
    select_base_samples,
)
from aikd.methods.dkd import DKD, DKDConfig, nckd_loss, tckd_loss
from aikd.models import build_model
from helpers import check_loss_records_of

DIGITS = ["data.name=digits", "model.name=small_cnn", "data.batch_size=64", "deterministic=true", "train.epochs=2"]
SMALL = ["data.train_limit=400", "data.test_limit=200"]


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------- independent numpy references


def softmax_np(z: np.ndarray, t: float = 1.0) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64) / t
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def kl_rows_np(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """sum_c p_c log(p_c / q_c) per row, 0 log 0 = 0."""
    out = np.zeros(len(p))
    for i in range(len(p)):
        out[i] = sum(p[i, c] * math.log(p[i, c] / q[i, c]) for c in range(p.shape[1]) if p[i, c] > 0)
    return out


def ce_np(z: np.ndarray, labels: np.ndarray) -> float:
    p = softmax_np(z)
    return float(np.mean([-math.log(p[i, y]) for i, y in enumerate(labels)]))


def target_conf_np(z, labels, t):
    return softmax_np(z, t)[np.arange(len(labels)), labels]


def tckd_rows_np(zs, zt, labels, t):
    """KL([p_y, 1 - p_y] teacher || same for the student), per sample, at temperature t."""
    ps, pt = target_conf_np(zs, labels, t), target_conf_np(zt, labels, t)
    return kl_rows_np(np.stack([pt, 1 - pt], 1), np.stack([ps, 1 - ps], 1))


def nckd_rows_np(zs, zt, labels, t):
    """KL between the softened distributions over the non-target classes only (renormalised), per sample."""
    rows = []
    for i, y in enumerate(labels):
        keep = [c for c in range(zs.shape[1]) if c != y]
        rows.append(kl_rows_np(softmax_np(zt[i:i + 1, keep], t), softmax_np(zs[i:i + 1, keep], t))[0])
    return np.array(rows)


def explicit_weight_np(kind, pt, ps):
    if kind == "one":
        return np.ones_like(pt)
    if kind == "teacher":
        return pt.copy()
    if kind == "gap":
        return 1 + np.abs(pt - ps)
    return np.clip(pt / np.maximum(ps, 1e-6), 0, 10)


def implicit_weight_np(kind, pt):
    return np.ones_like(pt) if kind == "one" else 1 - pt


def aekt_np(zs, zt, labels, t, explicit, implicit, w_e=None, w_i=None):
    """(T^2 mean(w_E TCKD_i), T^2 mean(w_I NCKD_i)); the weights may be given (held constant)."""
    pt, ps = target_conf_np(zt, labels, t), target_conf_np(zs, labels, t)
    w_e = explicit_weight_np(explicit, pt, ps) if w_e is None else w_e
    w_i = implicit_weight_np(implicit, pt) if w_i is None else w_i
    return (t * t * float(np.mean(w_e * tckd_rows_np(zs, zt, labels, t))),
            t * t * float(np.mean(w_i * nckd_rows_np(zs, zt, labels, t))))


def t32(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float32)


def f64(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def random_logits(seed: int, n: int, c: int, scale: float = 2.0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, scale, (n, c)), rng.normal(0, scale, (n, c)), rng.integers(0, c, n)


def frozen_linear(seed: int, d: int, c: int, scale: float = 1.0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(d, c)
    with torch.no_grad():
        layer.weight.mul_(scale)
        layer.bias.mul_(scale)
    return layer.eval().requires_grad_(False)


# ---------------------------------------------------------------------- AEKT reduces to DKD


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("c", [5, 100])
@pytest.mark.parametrize("t", [1.0, 4.0])
def test_aekt_terms_with_constant_weights_are_tckd_and_nckd(seed, c, t):
    zs, zt, y = random_logits(seed, 16, c)
    s, te, lab = t32(zs), t32(zt), torch.tensor(y)
    explicit, implicit = aekt_terms(s, te, lab, t, "one", "one")
    assert explicit.item() == pytest.approx(tckd_loss(s, te, lab, t).item(), rel=1e-5, abs=1e-7)
    assert implicit.item() == pytest.approx(nckd_loss(s, te, lab, t).item(), rel=1e-5, abs=1e-7)
    # ... and both equal the independent formulas.
    ref_e, ref_i = aekt_np(zs, zt, y, t, "one", "one")
    assert explicit.item() == pytest.approx(ref_e, rel=1e-4, abs=1e-6)
    assert implicit.item() == pytest.approx(ref_i, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("epoch", [0, 5, 19, 30])
@pytest.mark.parametrize("hp", [{}, {"alpha": 2.0, "beta": 3.0, "temperature": 2.0, "warmup": 4, "ce_weight": 0.5}])
def test_aekt_method_without_adaptive_parts_is_dkd(epoch, hp):
    c, d, n = 7, 6, 10
    teacher = frozen_linear(3, d, c, scale=2.0)
    torch.manual_seed(4)
    student = nn.Linear(d, c)
    x, y = torch.randn(n, d), torch.randint(0, c, (n,))
    ctx = MethodContext(num_classes=c, num_train=n, epochs=40, teacher=teacher)
    aekt = AEKT(AEKTConfig(explicit_weight="one", implicit_weight="one", head=False, **hp), ctx)
    dkd = DKD(DKDConfig(**hp), ctx)
    assert aekt.student_parameters() == []
    batch = Batch(x, y, torch.arange(n), epoch, 0)
    a, b = aekt.training_step(student, batch), dkd.training_step(student, batch)
    assert set(a.losses) == {"ce", "explicit", "implicit"}
    for mine, theirs in (("ce", "ce"), ("explicit", "tckd"), ("implicit", "nckd")):
        assert a.losses[mine].item() == pytest.approx(b.losses[theirs].item(), rel=1e-5, abs=1e-8)
    # Independent numbers, warm-up ramp included.
    h = DKDConfig(**hp)
    ramp = min((epoch + 1) / h.warmup, 1.0)
    z_s, z_t = f64(student(x)), f64(teacher(x))
    ref_e, ref_i = aekt_np(z_s, z_t, y.numpy(), h.temperature, "one", "one")
    assert a.losses["ce"].item() == pytest.approx(h.ce_weight * ce_np(z_s, y.numpy()), rel=1e-5)
    assert a.losses["explicit"].item() == pytest.approx(ramp * h.alpha * ref_e, rel=1e-4)
    assert a.losses["implicit"].item() == pytest.approx(ramp * h.beta * ref_i, rel=1e-4)


# ---------------------------------------------------------------------- AEKT adaptive weights


def test_explicit_and_implicit_weights_by_hand():
    pt = torch.tensor([0.9, 0.2, 0.5, 0.5])
    ps = torch.tensor([0.3, 0.2, 0.01, 0.0])
    np.testing.assert_allclose(f64(explicit_weight("one", pt, ps)), [1, 1, 1, 1])
    np.testing.assert_allclose(f64(explicit_weight("teacher", pt, ps)), [0.9, 0.2, 0.5, 0.5], rtol=1e-6)
    np.testing.assert_allclose(f64(explicit_weight("gap", pt, ps)), [1.6, 1.0, 1.49, 1.5], rtol=1e-6)
    # ratio p_t^T / p_t^S, clipped at 10 (0.5 / 0.01 = 50; p_t^S = 0 does not divide by zero).
    np.testing.assert_allclose(f64(explicit_weight("ratio", pt, ps)), [3.0, 1.0, 10.0, 10.0], rtol=1e-6)
    np.testing.assert_allclose(f64(implicit_weight("one", pt)), [1, 1, 1, 1])
    np.testing.assert_allclose(f64(implicit_weight("teacher_nontarget", pt)), [0.1, 0.8, 0.5, 0.5], rtol=1e-6)


@pytest.mark.parametrize("kind", ["one", "teacher", "gap", "ratio"])
def test_explicit_weight_random_against_numpy_and_carries_no_gradient(kind):
    rng = np.random.default_rng(7)
    pt_np, ps_np = rng.uniform(0, 1, 50), rng.uniform(0, 1, 50) ** 3  # some small student confidences: clipping
    pt, ps = t32(pt_np).requires_grad_(), t32(ps_np).requires_grad_()
    w = explicit_weight(kind, pt, ps)
    np.testing.assert_allclose(f64(w), explicit_weight_np(kind, pt_np, ps_np), rtol=1e-5)
    assert not w.requires_grad
    assert not implicit_weight("teacher_nontarget", pt).requires_grad
    if kind == "ratio":
        assert (f64(w) == 10).any() and (f64(w) < 10).any()


@pytest.mark.parametrize(("explicit", "implicit"),
                         [("gap", "teacher_nontarget"), ("teacher", "one"), ("ratio", "teacher_nontarget"),
                          ("gap", "one")])
@pytest.mark.parametrize("t", [1.0, 4.0])
def test_aekt_terms_with_adaptive_weights(explicit, implicit, t):
    zs, zt, y = random_logits(11, 12, 9, scale=2.5)
    e, i = aekt_terms(t32(zs), t32(zt), torch.tensor(y), t, explicit, implicit)
    ref_e, ref_i = aekt_np(zs, zt, y, t, explicit, implicit)
    assert e.item() == pytest.approx(ref_e, rel=1e-4, abs=1e-6)
    assert i.item() == pytest.approx(ref_i, rel=1e-4, abs=1e-6)
    # The weights matter: the constant-weight values differ.
    one_e, one_i = aekt_np(zs, zt, y, t, "one", "one")
    assert abs(ref_e - one_e) > 1e-3 or abs(ref_i - one_i) > 1e-3


def numeric_grad(f, z: np.ndarray, h: float = 1e-6) -> np.ndarray:
    g = np.zeros_like(z)
    for idx in np.ndindex(*z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += h
        zm[idx] -= h
        g[idx] = (f(zp) - f(zm)) / (2 * h)
    return g


@pytest.mark.parametrize(("explicit", "implicit"), [("gap", "teacher_nontarget"), ("ratio", "one")])
def test_aekt_adaptive_weights_are_constants_for_the_gradient(explicit, implicit):
    """The gradient of the weighted terms equals the finite-difference gradient with the weights held fixed."""
    zs, zt, y = random_logits(5, 6, 5, scale=1.5)
    t = 2.0
    pt, ps = target_conf_np(zt, y, t), target_conf_np(zs, y, t)
    w_e, w_i = explicit_weight_np(explicit, pt, ps), implicit_weight_np(implicit, pt)
    s = torch.tensor(zs, dtype=torch.float64, requires_grad=True)
    e, i = aekt_terms(s, torch.tensor(zt), torch.tensor(y), t, explicit, implicit)
    (g_e,) = torch.autograd.grad(e, s, retain_graph=True)
    (g_i,) = torch.autograd.grad(i, s)
    ref_e = numeric_grad(lambda z: aekt_np(z, zt, y, t, explicit, implicit, w_e, w_i)[0], zs)
    ref_i = numeric_grad(lambda z: aekt_np(z, zt, y, t, explicit, implicit, w_e, w_i)[1], zs)
    np.testing.assert_allclose(f64(g_e), ref_e, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(f64(g_i), ref_i, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------- AEKT distillation head


def aekt_setup(c=6, d=5, n=9, **hp):
    teacher = frozen_linear(8, d, c, scale=2.0)
    torch.manual_seed(9)
    student = nn.Linear(d, c)
    x, y = torch.randn(n, d), torch.randint(0, c, (n,))
    ctx = MethodContext(num_classes=c, num_train=n, epochs=40, teacher=teacher)
    return teacher, student, x, y, ctx


def test_aekt_head_starts_as_identity_and_is_trained_with_the_student():
    teacher, student, x, y, ctx = aekt_setup()
    with_head = AEKT(AEKTConfig(), ctx)
    without = AEKT(AEKTConfig(head=False), ctx)
    np.testing.assert_array_equal(f64(with_head.head.weight), np.eye(6))
    np.testing.assert_array_equal(f64(with_head.head.bias), np.zeros(6))
    params = with_head.student_parameters()
    assert len(params) == 2
    assert {id(p) for p in params} == {id(with_head.head.weight), id(with_head.head.bias)}
    assert all(p.requires_grad for p in params)
    batch = Batch(x, y, torch.arange(len(y)), 25, 0)
    a, b = with_head.training_step(student, batch), without.training_step(student, batch)
    for key in ("ce", "explicit", "implicit"):
        assert a.losses[key].item() == pytest.approx(b.losses[key].item(), rel=1e-6)
    # Defaults (gap, one) against numpy, past the warm-up.
    ref_e, ref_i = aekt_np(f64(student(x)), f64(teacher(x)), y.numpy(), 4.0, "gap", "one")
    assert a.losses["explicit"].item() == pytest.approx(ref_e, rel=1e-4)
    assert a.losses["implicit"].item() == pytest.approx(8.0 * ref_i, rel=1e-4)


def test_aekt_head_feeds_distillation_only():
    teacher, student, x, y, ctx = aekt_setup()
    method = AEKT(AEKTConfig(explicit_weight="gap", implicit_weight="teacher_nontarget"), ctx)
    rng = np.random.default_rng(3)
    w, b = np.eye(6) + rng.normal(0, 0.3, (6, 6)), rng.normal(0, 0.5, 6)
    with torch.no_grad():
        method.head.weight.copy_(t32(w))
        method.head.bias.copy_(t32(b))
    out = method.training_step(student, Batch(x, y, torch.arange(len(y)), 30, 0))
    z = f64(student(x))
    assert out.losses["ce"].item() == pytest.approx(ce_np(z, y.numpy()), rel=1e-5)  # raw logits
    torch.testing.assert_close(out.logits, student(x))
    ref_e, ref_i = aekt_np(z @ w.T + b, f64(teacher(x)), y.numpy(), 4.0, "gap", "teacher_nontarget")
    assert out.losses["explicit"].item() == pytest.approx(ref_e, rel=1e-4)
    assert out.losses["implicit"].item() == pytest.approx(8.0 * ref_i, rel=1e-4)
    head = [method.head.weight, method.head.bias]
    ce_grads = torch.autograd.grad(out.losses["ce"], [*head, student.weight], allow_unused=True, retain_graph=True)
    assert ce_grads[0] is None and ce_grads[1] is None  # CE never reaches the head
    assert ce_grads[2] is not None and ce_grads[2].abs().sum() > 0
    kd_grads = torch.autograd.grad(out.losses["explicit"] + out.losses["implicit"], head)
    assert all(g is not None and g.abs().sum() > 0 for g in kd_grads)


# ---------------------------------------------------------------------- BSS attack


def linear_attack_np(w, b, x0, targets, steps, eta=0.3, margin=1e-4):
    """The attack on f(x) = W x + b, step by step; returns the final x, the steps taken and each sample's
    trajectory (positions after every step)."""
    x = np.array(x0, dtype=np.float64)
    rows = np.arange(len(x))
    source = (x @ w.T + b).argmax(1)
    g = w[targets] - w[source]  # grad_x (f_k - f_b), constant for a linear model
    g_unit = g / np.linalg.norm(g, axis=1, keepdims=True)
    taken, path = 0, [x.copy()]
    for _ in range(steps):
        f = x @ w.T + b
        active = f.argmax(1) == source
        if not active.any():
            break
        x = x + (eta * active * (f[rows, source] - f[rows, targets] + margin))[:, None] * g_unit
        taken += 1
        path.append(x.copy())
    return x, source, taken, path


def attack_linear_setup(seed=0, n=40, d=6, c=5, scale=4.0):
    teacher = frozen_linear(seed, d, c, scale=scale)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    targets = sample_attack_targets(teacher(x), gen)
    return teacher, x, targets, f64(teacher.weight), f64(teacher.bias)


def test_bss_attack_one_step_on_a_linear_model():
    teacher, x, targets, w, b = attack_linear_setup(scale=1.0)
    res = bss_attack(teacher, x, targets, steps=1)
    f = f64(x) @ w.T + b
    rows = np.arange(len(x))
    source = f.argmax(1)
    k = targets.numpy()
    g = w[k] - w[source]
    expected = 0.3 * (f[rows, source] - f[rows, k] + 1e-4)[:, None] * g / np.linalg.norm(g, axis=1, keepdims=True)
    np.testing.assert_allclose(f64(res.images) - f64(x), expected, rtol=1e-4, atol=1e-5)
    assert res.steps == 1
    np.testing.assert_array_equal(res.source.numpy(), source)
    np.testing.assert_array_equal(res.target.numpy(), k)
    # The input is not modified in place.
    assert not torch.equal(res.images, x)


@pytest.mark.parametrize("stop_early", [True, False], ids=["stops-early-cpu", "all-steps-gpu"])
def test_bss_attack_replicated_step_by_step_and_flipped_samples_stop(stop_early):
    teacher, x, targets, w, b = attack_linear_setup()
    res = bss_attack(teacher, x, targets, steps=10, stop_early=stop_early)
    final, source, taken, path = linear_attack_np(w, b, f64(x), targets.numpy(), 10)
    np.testing.assert_allclose(f64(res.images), final, rtol=1e-4, atol=1e-4)
    assert res.steps == taken
    # Flip step of each sample in the replication: the first step after which the teacher left b.
    flip_step = np.full(len(x), -1)
    for s, xs in enumerate(path):
        newly = ((xs @ w.T + b).argmax(1) != source) & (flip_step < 0)
        flip_step[newly] = s
    flipped_early = np.nonzero((flip_step > 0) & (flip_step < taken))[0]
    assert len(flipped_early) > 0 and len(set(flip_step[flip_step > 0])) >= 2  # the test covers stopping
    for i in flipped_early:  # a sample that flipped at step s never moved again
        np.testing.assert_allclose(f64(res.images[i]), path[flip_step[i]][i], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(path[-1][i], path[flip_step[i]][i])
    # flipped is "the teacher no longer predicts b", recomputed independently.
    after = (f64(res.images) @ w.T + b).argmax(1)
    np.testing.assert_array_equal(res.flipped.numpy(), after != source)
    np.testing.assert_array_equal(res.flipped.numpy(), flip_step > 0)


@pytest.mark.parametrize("stop_early", [True, False], ids=["stops-early-cpu", "all-steps-gpu"])
def test_bss_attack_runs_out_of_steps_or_flips(stop_early):
    teacher, x, targets, w, b = attack_linear_setup(seed=1, n=200, scale=4.0)
    res = bss_attack(teacher, x, targets, steps=10, stop_early=stop_early)
    after = (f64(res.images) @ w.T + b).argmax(1)
    source = res.source.numpy()
    flipped = res.flipped.numpy()
    np.testing.assert_array_equal(flipped, after != source)
    assert flipped.mean() > 0.5  # enough steps on a linear model: most samples flip
    assert (after[flipped] != source[flipped]).all()
    to_target = (after[flipped] == res.target.numpy()[flipped]).mean()
    assert to_target > 0.5  # ...typically to the attacked class
    if not flipped.all():
        assert res.steps == 10  # the attack stops early only when every sample flipped
    # A few steps only: fewer flips, and the steps ran out.
    short = bss_attack(teacher, x, targets, steps=1, stop_early=stop_early)
    assert short.steps == 1 and short.flipped.float().mean() < res.flipped.float().mean()
    # Many steps: every sample flips (here after 14) and the attack ends there (or its later steps add nothing).
    long = bss_attack(teacher, x, targets, steps=200, stop_early=stop_early)
    assert bool(long.flipped.all()) and 10 < long.steps < 200
    final, _, taken, _ = linear_attack_np(w, b, f64(x), targets.numpy(), 200)
    assert long.steps == taken
    np.testing.assert_allclose(f64(long.images), final, rtol=1e-4, atol=1e-4)


def test_bss_attack_leaves_the_teacher_alone():
    torch.manual_seed(0)
    teacher = nn.Linear(6, 5).eval()  # not frozen: the attack must still not touch its gradients
    before = copy.deepcopy(teacher.state_dict())
    x = torch.randn(8, 6)
    bss_attack(teacher, x, sample_attack_targets(teacher(x).detach()), steps=5)
    assert teacher.weight.grad is None and teacher.bias.grad is None
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key])


def test_bss_attack_on_a_conv_model_batched_equals_one_by_one():
    torch.manual_seed(0)
    teacher = build_model("small_cnn", 10, 1, 8).eval().requires_grad_(False)
    before = copy.deepcopy(teacher.state_dict())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 1, 8, 8, generator=gen)
    targets = sample_attack_targets(teacher(x), gen)
    res = bss_attack(teacher, x, targets, steps=10)
    assert res.images.shape == x.shape
    for i in range(len(x)):  # samples do not interact (eval mode), and a flipped one stops where it is
        one = bss_attack(teacher, x[i:i + 1], targets[i:i + 1], steps=10)
        torch.testing.assert_close(res.images[i:i + 1], one.images, rtol=1e-4, atol=1e-5)
        assert bool(one.flipped[0]) == bool(res.flipped[i])
    with torch.no_grad():
        np.testing.assert_array_equal(res.flipped.numpy(),
                                      (teacher(res.images).argmax(1) != teacher(x).argmax(1)).numpy())
    # An untrained CNN has small input gradients and flips few samples in 10 steps (here 1 of 6; the trained
    # digits teacher flips almost all, see the end-to-end runs), but every sample moved toward its boundary.
    assert 0 < int(res.flipped.sum()) < len(x) and res.steps == 10
    with torch.no_grad():
        rows = torch.arange(len(x))
        gap_before = teacher(x)[rows, res.source] - teacher(x)[rows, targets]
        gap_after = teacher(res.images)[rows, res.source] - teacher(res.images)[rows, targets]
    assert bool((gap_after < gap_before).all())
    assert all(p.grad is None for p in teacher.parameters())
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key])


# ---------------------------------------------------------------------- BSS base samples, targets, schedule


def test_select_base_samples_against_numpy():
    rng = np.random.default_rng(2)
    n, c = 30, 6
    zt = rng.normal(0, 2, (n, c))
    zs = zt + rng.normal(0, 1.5, (n, c))  # the student mostly agrees with the teacher
    labels = zt.argmax(1).copy()
    labels[:5] = (labels[:5] + 1) % c  # teacher wrong on the first 5
    correct = (zt.argmax(1) == labels) & (zs.argmax(1) == labels)
    pt, ps = softmax_np(zt), softmax_np(zs)
    score = np.array([sum((pt[i, j] - ps[i, j]) ** 2 for j in range(c) if j != labels[i]) for i in range(n)])
    expected = sorted(np.nonzero(correct)[0], key=lambda i: -score[i])
    assert 8 <= len(expected) < n - 5 and (zs.argmax(1) != labels)[5:].any()  # the student is wrong on some
    others = [i for i in range(n) if i not in expected]  # in batch order: a stable sort of equal keys
    # Fixed shape: k = min(64, 30) = 30 positions, the base samples first in score order, then the others.
    positions, qualifies = select_base_samples(t32(zt), t32(zs), torch.tensor(labels))
    assert positions.tolist() == expected + others
    assert qualifies.tolist() == [True] * len(expected) + [False] * len(others)
    positions, qualifies = select_base_samples(t32(zt), t32(zs), torch.tensor(labels), max_samples=3)
    assert positions.tolist() == expected[:3] and qualifies.tolist() == [True] * 3
    k = len(expected) + 2  # more room than base samples: two others fill it, marked False
    positions, qualifies = select_base_samples(t32(zt), t32(zs), torch.tensor(labels), max_samples=k)
    assert positions.tolist() == expected + others[:2]
    assert qualifies.tolist() == [True] * len(expected) + [False, False]
    # Nobody right: nothing qualifies, the shape stays.
    wrong = torch.tensor((zt.argmax(1) + 1) % c)
    positions, qualifies = select_base_samples(t32(zt), t32(zs), wrong)
    assert positions.tolist() == list(range(n)) and not qualifies.any()
    # All right: at most 64 by default.
    same = np.eye(c)[np.arange(100) % c] * 3
    positions, qualifies = select_base_samples(t32(same), t32(same), torch.tensor(np.arange(100) % c))
    assert len(positions) == 64 and qualifies.all()


def test_sample_attack_targets_never_the_top1_and_follow_the_teacher():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5000, 7, generator=gen) * 3
    k = sample_attack_targets(logits, gen)
    assert not bool((k == logits.argmax(1)).any())
    rows = np.array([[3.0, 1.0, 0.5, 0.0, -1.0, 2.0], [0.0, 0.2, 4.0, -0.5, 1.5, 1.0]])
    n = 20000
    for row in rows:
        draws = sample_attack_targets(t32(np.tile(row, (n, 1))), gen).numpy()
        top = row.argmax()
        p = softmax_np(row[None])[0]
        p[top] = 0
        p /= p.sum()
        counts = np.bincount(draws, minlength=len(row))
        assert counts[top] == 0
        others = [j for j in range(len(row)) if j != top]
        chi2 = sum((counts[j] - n * p[j]) ** 2 / (n * p[j]) for j in others)
        assert chi2 < 25, (counts, n * p)  # df 4: p < 1e-4 of exceeding


def test_sample_attack_targets_for_a_one_hot_teacher():
    # Logit gaps above ~104 underflow float32 softmax to exactly (1, 0, 0, 0): the other classes uniformly.
    gen = torch.Generator().manual_seed(0)
    draws = sample_attack_targets(torch.tensor([[200.0, 0.0, 0.0, 0.0]] * 3000), gen).numpy()
    counts = np.bincount(draws, minlength=4)
    assert all(800 < counts[j] < 1200 for j in (1, 2, 3))
    assert counts[0] == 0


def test_bss_weights_count_epochs_from_one_as_the_official_loop():
    # Official: for epoch in range(1, N + 1): a = 3 (1 - epoch / N) + 1, b = max(2 (1 - 4 epoch / (3N)), 0).
    # aikd's epochs are 0-based, so its first epoch (0) must get the official epoch 1's weights.
    assert bss_weights(0, 12) == pytest.approx((3.75, 16 / 9))
    assert bss_weights(2, 12) == pytest.approx((3.25, 4 / 3))
    assert bss_weights(7, 12) == pytest.approx((2.0, 2 / 9))
    assert bss_weights(11, 12) == pytest.approx((1.0, 0.0))  # the last epoch: a(N) = 1
    for epoch in (8, 9, 10, 11):  # b = 0 from official epoch 3N/4 = 9 on, never negative
        assert bss_weights(epoch, 12)[1] == 0.0
    assert bss_weights(0, 2) == pytest.approx((2.5, 2 / 3))
    assert bss_weights(0, 1) == pytest.approx((1.0, 0.0))


# ---------------------------------------------------------------------- AMKD


def test_triplet_loss_by_hand():
    anchor = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    positive = torch.tensor([[3.0, 4.0], [1.0, 2.0]])  # distances 5 and 1
    negative = torch.tensor([[0.0, 1.0], [4.0, 5.0]])  # distances 1 and 5
    # relu(5 - 1 + 0.5) = 4.5 and relu(1 - 5 + 0.5) = 0: mean 2.25.
    assert triplet_loss(anchor, positive, negative, 0.5).item() == pytest.approx(2.25)
    assert triplet_loss(anchor[1:], positive[1:], negative[1:], 4.5).item() == pytest.approx(0.5)


def test_pick_negatives():
    labels = torch.tensor([3, 1, 3, 0, 2])
    targets = torch.tensor([3, 0, 4, 1])
    seen = set()
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        pos, found = pick_negatives(targets, labels, gen)
        assert found.tolist() == [True, True, False, True]
        assert int(pos[1]) == 3 and int(pos[3]) == 1
        assert int(pos[0]) in (0, 2)
        seen.add(int(pos[0]))
    assert seen == {0, 2}  # a random sample of the class, not always the same one


def normalize_np(z):
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def triplet_np(student_adv, teacher_adv, negative, margin):
    a, p, n = normalize_np(student_adv), normalize_np(teacher_adv), normalize_np(negative)
    return float(np.mean(np.maximum(np.linalg.norm(a - p, axis=1) - np.linalg.norm(a - n, axis=1) + margin, 0)))


def boundary_case():
    """Clean batch of 5 (labels 0..4, one sample each); 4 boundary samples attacked toward 2, 0, 5 (absent), 3."""
    rng = np.random.default_rng(6)
    c = 6
    labels = np.array([1, 0, 2, 4, 3])
    clean_s, clean_t = rng.normal(0, 2, (5, c)), rng.normal(0, 2, (5, c))
    adv_s, adv_t = rng.normal(0, 2, (4, c)), rng.normal(0, 2, (4, c))
    targets = np.array([2, 0, 5, 3])
    return c, labels, clean_s, clean_t, adv_s, adv_t, targets


@pytest.mark.parametrize("dropped", [None, 1], ids=["all-attacked", "row-1-masked"])
@pytest.mark.parametrize("negative", ["teacher", "student"])
def test_amkd_boundary_losses(negative, dropped):
    c, labels, clean_s, clean_t, adv_s, adv_t, targets = boundary_case()
    gamma, margin, weight, t = 1.5, 2.5, 0.7, 3.0
    method = AMKD(AMKDConfig(triplet_weight=gamma, margin=margin, negative=negative),
                  MethodContext(num_classes=c, num_train=5, epochs=4))
    logits = t32(clean_s).requires_grad_()
    teacher_logits = t32(clean_t).requires_grad_()
    student_adv = t32(adv_s).requires_grad_()
    kept = [i for i in range(4) if i != dropped]  # the rows the attack's mask keeps
    mask = torch.tensor([i in kept for i in range(4)])
    attack = AttackResult(torch.zeros(4, 3), torch.tensor([1, 0, 2, 4]), torch.tensor(targets),
                          torch.ones(4, dtype=torch.bool), torch.tensor(1), mask)
    batch = Batch(torch.zeros(5, 3), torch.tensor(labels), torch.arange(5), 0, 0)
    losses = method.boundary_losses(batch, logits, teacher_logits, attack, t32(adv_t), student_adv, weight)
    assert set(losses) == {"kd_adv", "triplet"}
    kd = kl_rows_np(softmax_np(adv_t[kept], t), softmax_np(adv_s[kept], t)).mean()  # BSS: no T^2 (official code)
    assert losses["kd_adv"].item() == pytest.approx(weight * kd, rel=1e-5)
    with_negative = [i for i in kept if targets[i] != 5]  # target 5 has no sample in the batch
    neg_pos = np.array([int(np.nonzero(labels == targets[i])[0][0]) for i in with_negative])
    source = clean_t if negative == "teacher" else clean_s
    expected = triplet_np(adv_s[with_negative], adv_t[with_negative], source[neg_pos], margin)
    assert expected > 0
    assert losses["triplet"].item() == pytest.approx(weight * gamma * expected, rel=1e-5)
    # Including the sample without a negative (as a zero or with any negative) would change the mean.
    assert abs(expected - triplet_np(adv_s[kept], adv_t[kept], source[[*neg_pos[:-1], 0, neg_pos[-1]]],
                                     margin)) > 1e-4
    g_clean, g_teacher, g_anchor = torch.autograd.grad(losses["triplet"], [logits, teacher_logits, student_adv],
                                                       allow_unused=True)
    assert float(g_anchor[with_negative].abs().sum(1).min()) > 0
    assert float(g_anchor[[i for i in range(4) if i not in with_negative]].abs().sum()) == 0.0  # masked out
    grad_of_negatives, other = (g_clean, g_teacher) if negative == "student" else (g_teacher, g_clean)
    assert other is None  # the other model's clean logits take no part
    # margin > 2 >= ||a - n|| for unit vectors: every hinge is active, so every negative gets a gradient.
    assert float(grad_of_negatives[neg_pos].abs().sum(1).min()) > 0
    unused = sorted(set(range(5)) - set(neg_pos.tolist()))  # with row 1 masked: its negative (position 1) too
    assert float(grad_of_negatives[unused].abs().sum()) == 0.0


def test_amkd_without_any_negative_has_a_zero_triplet():
    c, labels, clean_s, clean_t, adv_s, adv_t, _ = boundary_case()
    method = AMKD(AMKDConfig(), MethodContext(num_classes=c, num_train=5, epochs=4))
    attack = AttackResult(torch.zeros(2, 3), torch.tensor([1, 0]), torch.tensor([5, 5]),
                          torch.ones(2, dtype=torch.bool), torch.tensor(1), torch.ones(2, dtype=torch.bool))
    batch = Batch(torch.zeros(5, 3), torch.tensor(labels), torch.arange(5), 0, 0)
    student_adv = t32(adv_s[:2]).requires_grad_()
    losses = method.boundary_losses(batch, t32(clean_s), t32(clean_t), attack, t32(adv_t[:2]), student_adv, 1.0)
    assert set(losses) == {"kd_adv", "triplet"}  # present on every step, so that the ranks sum the same keys
    assert losses["triplet"].item() == 0.0
    (grad,) = torch.autograd.grad(losses["triplet"], student_adv)
    assert float(grad.abs().sum()) == 0.0


def test_amkd_training_step_with_a_known_attack(monkeypatch):
    """The whole step on linear models with the attack replaced: every term against numpy."""
    c, d, n, epoch, epochs = 6, 6, 5, 1, 4
    teacher = nn.Linear(d, c).eval().requires_grad_(False)
    with torch.no_grad():
        teacher.weight.copy_(3 * torch.eye(c))
        teacher.bias.zero_()
    torch.manual_seed(0)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    with torch.no_grad():
        student.weight.add_(0.2 * torch.randn(c, d))
    labels = torch.tensor([1, 0, 2, 4, 3])  # class 5 is absent from the batch
    x = 2 * torch.eye(d)[labels] + 0.1 * torch.randn(n, d)
    assert torch.equal(teacher(x).argmax(1), labels) and torch.equal(student(x).argmax(1), labels)
    adv = torch.randn(n, d)
    chosen = torch.tensor([2, 5, 0, 3, 4])
    calls = []

    def fake_attack(model, images, targets, steps=10, eta=0.3, margin=1e-4, mask=None):
        calls.append((model, images.clone(), steps, eta, mask))
        return AttackResult(adv[:len(images)], model(images).argmax(1), chosen[:len(images)],
                            torch.tensor([True, False, True, True, False])[:len(images)], torch.tensor(3), mask)

    monkeypatch.setattr(bss_module, "bss_attack", fake_attack)
    method = AMKD(AMKDConfig(triplet_weight=0.5, margin=1.0),
                  MethodContext(num_classes=c, num_train=n, epochs=epochs, teacher=teacher))
    out = method.training_step(student, Batch(x, labels, torch.arange(n), epoch, 0))
    assert len(calls) == 1
    model, images, steps, eta, mask = calls[0]
    assert model is teacher and steps == 10 and eta == pytest.approx(0.3)
    # All five are right for both models: all are base samples, in score order.
    zt, zs = f64(teacher(x)), f64(student(x))
    base, qualifies = select_base_samples(t32(zt), t32(zs), labels)
    assert sorted(base.tolist()) == list(range(n)) and qualifies.all() and mask.tolist() == [True] * n
    torch.testing.assert_close(images, x[base])
    official_epoch = epoch + 1  # the official loop counts epochs from 1
    a = 3 * (1 - official_epoch / epochs) + 1
    b = max(2 * (1 - 4 * official_epoch / (3 * epochs)), 0)
    assert b > 0
    assert set(out.losses) == {"ce", "kd", "kd_adv", "triplet"}
    t = 3.0
    assert out.losses["ce"].item() == pytest.approx(ce_np(zs, labels.numpy()), rel=1e-5)
    assert out.losses["kd"].item() == pytest.approx(a * kl_rows_np(softmax_np(zt, t),
                                                                           softmax_np(zs, t)).mean(), rel=1e-5)
    at, as_ = f64(teacher(adv)), f64(student(adv))
    assert out.losses["kd_adv"].item() == pytest.approx(b * kl_rows_np(softmax_np(at, t),
                                                                               softmax_np(as_, t)).mean(), rel=1e-5)
    found = [i for i in range(n) if int(chosen[i]) != 5]
    neg_pos = [int(np.nonzero(labels.numpy() == int(chosen[i]))[0][0]) for i in found]
    expected = triplet_np(as_[found], at[found], zt[neg_pos], 1.0)
    assert expected > 0
    assert out.losses["triplet"].item() == pytest.approx(b * 0.5 * expected, rel=1e-5)
    assert out.stats["attack_flipped"].item() == pytest.approx(0.6)
    assert out.stats["attack_size"].item() == n


def test_bss_skips_the_attack_when_its_weight_is_zero(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("attacked although b(n) = 0")

    monkeypatch.setattr(bss_module, "bss_attack", fail)
    teacher = frozen_linear(0, 6, 4)
    method = AMKD(AMKDConfig(), MethodContext(num_classes=4, num_train=8, epochs=4, teacher=teacher))
    x = torch.randn(8, 6)
    out = method.training_step(nn.Linear(6, 4), Batch(x, teacher(x).argmax(1), torch.arange(8), 3, 0))
    # Every key of an attacking step, at 0: the ranks of a data-parallel run all-reduce the same keys.
    assert set(out.losses) == {"ce", "kd", "kd_adv", "triplet"} and set(out.stats) == {"attack_flipped", "attack_size"}
    assert [out.losses["kd_adv"].item(), out.losses["triplet"].item()] == [0.0, 0.0]
    assert [out.stats["attack_flipped"].item(), out.stats["attack_size"].item()] == [0.0, 0.0]


def masked_step_case(right: int):
    """6 samples on linear models (d = c = 6) of which the first ``right`` are classified right by both."""
    c, n = 6, 6
    teacher = nn.Linear(c, c).eval().requires_grad_(False)
    with torch.no_grad():
        teacher.weight.copy_(3 * torch.eye(c))
        teacher.bias.zero_()
    torch.manual_seed(0)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    with torch.no_grad():
        student.weight.add_(0.3 * torch.randn(c, c))
    x = 2 * torch.eye(c) + 0.2 * torch.randn(n, c)  # sample i leans to class i
    labels = torch.arange(n)
    labels[right:] = (labels[right:] + 1) % c  # both models wrong on the others
    return teacher, student, x, labels


@pytest.mark.parametrize("right", [3, 1, 0])
def test_bss_step_averages_over_base_samples_and_always_runs_the_same_forwards(monkeypatch, right):
    """The attack on the masked k rows against the numpy attack on the base samples alone (the official selection);
    and the student's forwards, the same two on every step whatever qualifies (SyncBatchNorm's collectives)."""
    teacher, student, x, labels = masked_step_case(right)
    zt, zs = f64(teacher(x)), f64(student(x))
    correct = (zt.argmax(1) == labels.numpy()) & (zs.argmax(1) == labels.numpy())
    assert correct.tolist() == [True] * right + [False] * (6 - right)
    drawn = []
    real_targets = bss_module.sample_attack_targets
    monkeypatch.setattr(bss_module, "sample_attack_targets", lambda z: drawn.append(real_targets(z)) or drawn[-1])
    forwards = []
    student.register_forward_hook(lambda module, args, out: forwards.append(len(args[0])))
    method = BSS(BSSConfig(), MethodContext(num_classes=6, num_train=6, epochs=4, teacher=teacher, student=student))
    out = method.training_step(student, Batch(x, labels, torch.arange(6), 0, 0))
    assert forwards == [6, 6]  # the clean batch and k = min(64, 6) attacked rows, also when none qualifies
    assert set(out.losses) == {"ce", "kd", "kd_adv"} and set(out.stats) == {"attack_flipped", "attack_size"}
    b = 2 * (1 - 4 * 1 / (3 * 4))  # b(n) at the first epoch (n = 1) of 4
    if right < 2:  # fewer than two base samples: no boundary term, as when the step skipped it
        assert out.losses["kd_adv"].item() == 0.0
        assert [out.stats["attack_flipped"].item(), out.stats["attack_size"].item()] == [0.0, 0.0]
        return
    # The base samples first: 0..right-1 in the order of their scores, then the others.
    pt, ps = softmax_np(zt), softmax_np(zs)
    score = [sum((pt[i, j] - ps[i, j]) ** 2 for j in range(6) if j != i) for i in range(right)]
    base = sorted(range(right), key=lambda i: -score[i])
    targets = drawn[0].numpy()[:right]  # the classes drawn for the base samples' rows
    final, _, _, _ = linear_attack_np(f64(teacher.weight), f64(teacher.bias), f64(x)[base], targets, 10)
    at, as_ = final @ f64(teacher.weight).T, final @ f64(student.weight).T + f64(student.bias)
    expected = kl_rows_np(softmax_np(at, 3.0), softmax_np(as_, 3.0)).mean()
    assert out.losses["kd_adv"].item() == pytest.approx(b * expected, rel=1e-4)
    flipped = (at.argmax(1) != zt[base].argmax(1)).mean()
    assert out.stats["attack_flipped"].item() == pytest.approx(flipped)
    assert out.stats["attack_size"].item() == right


# ---------------------------------------------------------------------- end to end on digits

TERMS = {name: METHODS.get(name).loss_terms(METHODS.get(name).Config()) for name in ("aekt", "bss", "amkd")}


@pytest.fixture(scope="module")
def superior(tmp_path_factory):
    out = tmp_path_factory.mktemp("superior")
    Trainer(load_config(None, DIGITS), out, quiet=True).fit()  # all 1438 training images
    return out / "checkpoints" / "last.safetensors"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, superior):
    """One 2-epoch run per method on 400 digits: (trainer, output folder, summary)."""
    done = {}
    for method in sorted(TERMS):
        out = tmp_path_factory.mktemp(method)
        cfg = load_config(None, [*DIGITS, *SMALL, f"method={method}", f"teacher.checkpoint={superior}"])
        trainer = Trainer(cfg, out, quiet=True)
        done[method] = (trainer, out, trainer.fit())
    return done


@pytest.mark.parametrize("method", sorted(TERMS))
def test_methods_train_on_digits(runs, superior, method):
    _, out, summary = runs[method]
    assert summary["method"] == method and summary["epochs"] == 2
    assert (out / summary["teacher"]).resolve() == superior.resolve()  # relative to the run folder
    assert json.loads((out / "summary.json").read_text())["method"] == method
    assert math.isfinite(summary["top1_err"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        # BSS's attack weight b(n) = max(2 (1 - 4n / 3N), 0) with official epochs n = 1..N: for N = 2 only
        # the first epoch attacks (b(1) = 2/3, b(2) = 0), so the second logs its boundary-sample terms as 0.
        attacked = method != "aekt" and 2 * (1 - 4 * record["epoch"] / (3 * 2)) > 0
        check_loss_records_of(record, TERMS[method])  # every term on every step, 0 where it is off
        if attacked:
            assert 0.0 <= record["stat.attack_flipped"] <= 1.0
            assert record["stat.attack_flipped"] > 0.5  # a trained teacher is easy to push over its boundary
            assert 0 < record["stat.attack_size"] <= 64
        elif method != "aekt":
            assert record["loss.kd_adv"] == 0.0 and record.get("loss.triplet", 0.0) == 0.0
            assert record["stat.attack_size"] == 0.0 and record["stat.attack_flipped"] == 0.0
    assert [r["epoch"] for r in records] == [1, 2]


def test_aekt_head_is_trained_but_not_saved_with_the_model(runs):
    trainer, out, _ = runs["aekt"]
    head = trainer.method.head
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert id(head.weight) in optimised and id(head.bias) in optimised
    w = f64(head.weight)
    off_diagonal = w[~np.eye(10, dtype=bool)]
    assert np.abs(off_diagonal).max() > 1e-6  # moved by the distillation gradient, not only by weight decay
    assert np.abs(f64(head.bias)).max() > 1e-6
    ckpt = load_checkpoint(out / "checkpoints" / "last.safetensors")
    assert set(ckpt.model) == set(build_model("small_cnn", 10, 1, 8).state_dict())
    np.testing.assert_allclose(f64(ckpt.state["method"]["head.weight"]), w)  # the head lives in the run state
    best = load_checkpoint(out / "checkpoints" / "best.safetensors")
    assert set(best.model) == set(ckpt.model)


def test_pipeline_bss_trains_teacher_then_student(tmp_path):
    result = run_pipeline("configs/fashion_mnist/bss.yaml", [*DIGITS, *SMALL], tmp_path, quiet=True,
                          log=lambda m: None)
    assert result["superior"]["method"] == "ce" and result["superior"]["dataset"] == "digits"
    assert result["student"]["method"] == "bss" and result["student"]["epochs"] == 2
    teacher = (Path(result["student"]["run_dir"]) / result["student"]["teacher"]).resolve()
    assert teacher.is_relative_to(Path(result["superior"]["run_dir"]).resolve())
    records = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert {k.removeprefix("loss.") for k in records[0] if k.startswith("loss.")} == TERMS["bss"]
