"""KD, TF-KD, DKD, PS-KD and CS-KD: losses against independent numpy formulas, the class-pair sampler,
and short end-to-end runs on scikit-learn digits (both direct and through ``aikd pipeline``)."""

from __future__ import annotations

import dataclasses
import math
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
from aikd.errors import CheckpointError, ConfigError
from aikd.methods import METHODS
from aikd.methods.base import Batch, MethodContext
from aikd.methods.cskd import CSKD, ClassPairBatchSampler, CSKDConfig
from aikd.methods.dkd import DKD, DKDConfig, dkd_warmup, nckd_loss, tckd_loss
from aikd.methods.functional import distillation_kl, kl_from_probs, soft_cross_entropy
from aikd.methods.kd import kd_loss
from aikd.methods.pskd import PSKD, PSKDConfig, pskd_alpha, pskd_targets
from aikd.methods.tfkd import TFKDSelf, TFKDSelfConfig, tf_reg_loss, tf_self_kd, virtual_teacher
from aikd.models import build_model
from aikd.run_files import teacher_path
from helpers import check_loss_records

DIGITS = ["data.name=digits", "model.name=small_cnn", "data.batch_size=64", "deterministic=true", "train.epochs=2"]
SMALL = ["data.train_limit=400", "data.test_limit=200"]  # a stratified subset: enough to learn, fast on a busy CPU
N_TRAIN = 400

# Fixed small logits: 3 samples, 4 classes.
STUDENT = np.array([[2.0, 1.0, 0.1, -0.5], [0.5, 2.5, -1.0, 0.3], [-0.2, 0.4, 1.7, 0.9]])
TEACHER = np.array([[1.5, 0.2, 0.3, 0.0], [-0.3, 3.0, 0.0, 1.1], [0.8, -1.2, 2.2, 0.5]])
LABELS = np.array([0, 1, 3])


# ---------------------------------------------------------------------- independent numpy references


def softmax_np(z: np.ndarray, t: float = 1.0) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64) / t
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def kl_np(p: np.ndarray, q: np.ndarray) -> float:
    """Mean over rows of sum_c p_c log(p_c / q_c), with 0 log 0 = 0, by explicit loops."""
    rows = []
    for i in range(len(p)):
        rows.append(sum(p[i, c] * math.log(p[i, c] / q[i, c]) for c in range(p.shape[1]) if p[i, c] > 0))
    return float(np.mean(rows))


def ce_np(z: np.ndarray, labels: np.ndarray) -> float:
    p = softmax_np(z)
    return float(np.mean([-math.log(p[i, y]) for i, y in enumerate(labels)]))


def soft_ce_np(z: np.ndarray, targets: np.ndarray) -> float:
    log_p = np.log(softmax_np(z))
    return float(np.mean([-(targets[i] * log_p[i]).sum() for i in range(len(z))]))


def one_hot_np(labels: np.ndarray, c: int) -> np.ndarray:
    q = np.zeros((len(labels), c))
    q[np.arange(len(labels)), labels] = 1.0
    return q


def t32(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float32)


def f64(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


S, T_, Y = t32(STUDENT), t32(TEACHER), torch.tensor(LABELS)


# ---------------------------------------------------------------------- functional


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0, 6.0])
def test_distillation_kl_is_t2_kl_of_softened_distributions(t):
    expected = t * t * kl_np(softmax_np(TEACHER, t), softmax_np(STUDENT, t))
    assert distillation_kl(T_, S, t).item() == pytest.approx(expected, rel=1e-5)
    # Argument order matters: KL(target || student), not the reverse.
    reverse = t * t * kl_np(softmax_np(STUDENT, t), softmax_np(TEACHER, t))
    assert abs(expected - reverse) > 1e-3


def test_distillation_kl_by_hand():
    # Target (0, 0) -> (1/2, 1/2); student (ln 3, 0) at T = 1 -> (3/4, 1/4).
    # KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3); equal rows: the batch mean is the same.
    student = torch.tensor([[math.log(3.0), 0.0]] * 2)
    assert distillation_kl(torch.zeros(2, 2), student, 1.0).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-5)
    # Identical logits: zero at any temperature.
    assert distillation_kl(S, S, 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_soft_cross_entropy():
    rng = np.random.default_rng(0)
    targets = rng.dirichlet(np.ones(4), size=3)
    assert soft_cross_entropy(S, t32(targets)).item() == pytest.approx(soft_ce_np(STUDENT, targets), rel=1e-5)
    # One-hot targets give the ordinary cross-entropy.
    assert soft_cross_entropy(S, t32(one_hot_np(LABELS, 4))).item() == pytest.approx(ce_np(STUDENT, LABELS),
                                                                                      rel=1e-5)
    # By hand: logits (0, 0), target (1/4, 3/4) -> -(1/4 ln 1/2 + 3/4 ln 1/2) = ln 2.
    assert soft_cross_entropy(torch.zeros(1, 2), torch.tensor([[0.25, 0.75]])).item() == pytest.approx(math.log(2))


def test_kl_from_probs_with_zero_target_probabilities():
    target = np.array([[0.0, 0.25, 0.75, 0.0], [0.1, 0.2, 0.3, 0.4], [1.0, 0.0, 0.0, 0.0]])
    q = softmax_np(STUDENT)
    got = kl_from_probs(t32(target), t32(np.log(q)))
    # Row 0 by hand: 0.25 ln(0.25 / q01) + 0.75 ln(0.75 / q02); row 2: ln(1 / q20).
    row0 = 0.25 * math.log(0.25 / q[0, 1]) + 0.75 * math.log(0.75 / q[0, 2])
    row1 = sum(target[1, c] * math.log(target[1, c] / q[1, c]) for c in range(4))
    row2 = -math.log(q[2, 0])
    assert got.item() == pytest.approx((row0 + row1 + row2) / 3, rel=1e-5)
    assert got.item() == pytest.approx(kl_np(target, q), rel=1e-5)
    # A zero target next to a very unlikely student class still contributes exactly 0.
    student = torch.tensor([[0.0, -1e4]])
    assert kl_from_probs(torch.tensor([[1.0, 0.0]]), student).item() == pytest.approx(0.0, abs=1e-7)
    # Even next to a student log-probability of -inf (a softmax that underflowed): 0 log 0 = 0, not nan.
    student = torch.tensor([[0.0, -math.inf]])
    assert kl_from_probs(torch.tensor([[1.0, 0.0]]), student).item() == 0.0


# ---------------------------------------------------------------------- KD and TF-KD


@pytest.mark.parametrize(("alpha", "t"), [(0.9, 4.0), (0.5, 1.0), (0.0, 3.0)])
def test_kd_loss_terms(alpha, t):
    ce, kd = kd_loss(S, T_, Y, alpha, t)
    assert ce.item() == pytest.approx((1 - alpha) * ce_np(STUDENT, LABELS), rel=1e-5)
    assert kd.item() == pytest.approx(alpha * t * t * kl_np(softmax_np(TEACHER, t), softmax_np(STUDENT, t)),
                                      rel=1e-5, abs=1e-8)


def test_kd_loss_is_a_batch_mean():
    one = kd_loss(S[:1], T_[:1], Y[:1], 0.9, 4.0)
    three = kd_loss(S[:1].repeat(3, 1), T_[:1].repeat(3, 1), Y[:1].repeat(3), 0.9, 4.0)
    for a, b in zip(one, three, strict=True):
        assert b.item() == pytest.approx(a.item(), rel=1e-6)


def test_virtual_teacher():
    c = 5
    p = virtual_teacher(torch.tensor([0, 3, 4]), c)
    expected = np.full((3, c), 0.01 / (c - 1))
    expected[[0, 1, 2], [0, 3, 4]] = 0.99
    np.testing.assert_allclose(f64(p), expected, rtol=1e-6)
    np.testing.assert_allclose(f64(p.sum(1)), 1.0, rtol=1e-6)
    # Mixed soft labels (e.g. from mixup) still give distributions.
    soft = virtual_teacher(torch.tensor([[0.5, 0.5, 0, 0, 0]]), c)
    np.testing.assert_allclose(f64(soft.sum(1)), 1.0, rtol=1e-6)


@pytest.mark.parametrize(("alpha", "tau"), [(0.1, 20.0), (0.5, 1.0)])
def test_tf_reg_loss(alpha, tau):
    c = STUDENT.shape[1]
    p_d = np.where(one_hot_np(LABELS, c) == 1, 0.99, 0.01 / (c - 1))
    teacher = softmax_np(p_d, tau)  # the probabilities themselves are softened, as the official code does
    ce, reg = tf_reg_loss(S, Y, alpha, tau)
    assert ce.item() == pytest.approx((1 - alpha) * ce_np(STUDENT, LABELS), rel=1e-5)
    # The student is not softened and there is no tau^2 factor.
    assert reg.item() == pytest.approx(alpha * kl_np(teacher, softmax_np(STUDENT)), rel=1e-5)


def frozen_linear(seed: int, d: int = 6, c: int = 4) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d, c).eval().requires_grad_(False)


def test_tfkd_self_step_terms():
    torch.manual_seed(1)
    teacher, student = frozen_linear(0), nn.Linear(6, 4)
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 1])
    method = TFKDSelf(TFKDSelfConfig(), MethodContext(num_classes=4, num_train=5, epochs=3, teacher=teacher))
    out = method.training_step(student, Batch(x, y, torch.arange(5), 0, 0))
    assert set(out.losses) == {"ce", "kd"}
    z_s, z_t = f64(student(x)), f64(teacher(x))
    a, t = 0.95, 6.0  # TF-KD's CIFAR-100 defaults
    assert out.losses["ce"].item() == pytest.approx((1 - a) * ce_np(z_s, y.numpy()), rel=1e-5)
    assert out.losses["kd"].item() == pytest.approx(a * t * t * kl_np(softmax_np(z_t, t), softmax_np(z_s, t)),
                                                    rel=1e-5)
    sum(out.losses.values()).backward()
    assert student.weight.grad is not None and teacher.weight.grad is None


@pytest.mark.filterwarnings("ignore:reduction. .mean. divides")
def test_tfkd_self_multiplier_reproduces_the_official_scaling():
    """The official loss_kd_self: nn.KLDivLoss() (mean over N x C) * T^2 * multiplier, at C = 100."""
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(6, 100, generator=g) * 3, torch.randn(6, 100, generator=g) * 3
    t, m = 6.0, 50.0
    official = nn.KLDivLoss()(F.log_softmax(student / t, dim=1), F.softmax(teacher / t, dim=1)) * (t * t) * m
    assert tf_self_kd(teacher, student, t, m).item() == pytest.approx(official.item(), rel=1e-5)
    # The default (batch-mean KL) is twice the official term at 100 classes with M = 50.
    assert tf_self_kd(teacher, student, t).item() == pytest.approx(2 * official.item(), rel=1e-5)
    by_hand = t * t * kl_np(softmax_np(f64(teacher), t), softmax_np(f64(student), t)) * m / 100
    assert tf_self_kd(teacher, student, t, m).item() == pytest.approx(by_hand, rel=1e-5)


def test_tfkd_self_step_uses_the_multiplier():
    teacher, student = frozen_linear(0), frozen_linear(1)
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 1])
    ctx = MethodContext(num_classes=4, num_train=5, epochs=3, teacher=teacher)
    plain = TFKDSelf(TFKDSelfConfig(), ctx).training_step(student, Batch(x, y, torch.arange(5), 0, 0))
    scaled = TFKDSelf(TFKDSelfConfig(multiplier=2.0), ctx).training_step(student, Batch(x, y, torch.arange(5), 0, 0))
    assert scaled.losses["kd"].item() == pytest.approx(plain.losses["kd"].item() * 2.0 / 4, rel=1e-6)
    assert scaled.losses["ce"].item() == pytest.approx(plain.losses["ce"].item())


# ---------------------------------------------------------------------- DKD


def tckd_np(zs, zt, labels, t):
    ps, pt = softmax_np(zs, t), softmax_np(zt, t)
    idx = np.arange(len(labels))
    bs = np.stack([ps[idx, labels], 1 - ps[idx, labels]], axis=1)
    bt = np.stack([pt[idx, labels], 1 - pt[idx, labels]], axis=1)
    return t * t * kl_np(bt, bs)


def nckd_np(zs, zt, labels, t):
    """KL between the softened distributions over the non-target classes only (renormalised)."""
    rows = []
    for i, y in enumerate(labels):
        keep = [c for c in range(zs.shape[1]) if c != y]
        rows.append(kl_np(softmax_np(zt[i:i + 1, keep], t), softmax_np(zs[i:i + 1, keep], t)))
    return t * t * float(np.mean(rows))


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_tckd_and_nckd(t):
    assert tckd_loss(S, T_, Y, t).item() == pytest.approx(tckd_np(STUDENT, TEACHER, LABELS, t), rel=1e-4)
    assert nckd_loss(S, T_, Y, t).item() == pytest.approx(nckd_np(STUDENT, TEACHER, LABELS, t), rel=1e-4)


def test_tckd_by_hand():
    # Two classes, label 0: b is the whole distribution. Teacher (0, 0) -> (1/2, 1/2); student (ln 3, 0) -> (3/4, 1/4)
    # at T = 1: TCKD = 1/2 ln(4/3), NCKD = 0 (a single non-target class carries no relative information).
    zs = torch.tensor([[math.log(3.0), 0.0]])
    assert tckd_loss(zs, torch.zeros(1, 2), torch.tensor([0]), 1.0).item() == pytest.approx(0.5 * math.log(4 / 3),
                                                                                          rel=1e-5)
    assert nckd_loss(zs, torch.zeros(1, 2), torch.tensor([0]), 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_dkd_warmup():
    assert dkd_warmup(0, 20) == pytest.approx(1 / 20)
    assert dkd_warmup(9, 20) == pytest.approx(0.5)
    assert dkd_warmup(19, 20) == 1.0
    assert dkd_warmup(50, 20) == 1.0
    assert dkd_warmup(0, 0) == 1.0


@pytest.mark.parametrize("epoch", [0, 3, 30])
def test_dkd_step_terms(epoch):
    torch.manual_seed(2)
    teacher, student = frozen_linear(3), nn.Linear(6, 4)
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 1])
    cfg = DKDConfig()
    method = DKD(cfg, MethodContext(num_classes=4, num_train=5, epochs=40, teacher=teacher))
    out = method.training_step(student, Batch(x, y, torch.arange(5), epoch, 0))
    assert set(out.losses) == {"ce", "tckd", "nckd"}
    z_s, z_t = f64(student(x)), f64(teacher(x))
    ramp = min((epoch + 1) / 20, 1.0)
    assert out.losses["ce"].item() == pytest.approx(ce_np(z_s, y.numpy()), rel=1e-5)
    assert out.losses["tckd"].item() == pytest.approx(ramp * 1.0 * tckd_np(z_s, z_t, y.numpy(), 4.0), rel=1e-4)
    assert out.losses["nckd"].item() == pytest.approx(ramp * 8.0 * nckd_np(z_s, z_t, y.numpy(), 4.0), rel=1e-4)


# ---------------------------------------------------------------------- PS-KD


def test_pskd_alpha():
    e = 7
    assert pskd_alpha(0, e, 0.8) == pytest.approx(0.8 / e)
    assert pskd_alpha(e - 1, e, 0.8) == pytest.approx(0.8)
    assert pskd_alpha(2, e, 0.8) == pytest.approx(0.8 * 3 / e)


def test_pskd_targets():
    prev = np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    labels = np.array([2, 0, 1])
    has = torch.tensor([True, False, True])
    got = f64(pskd_targets(torch.tensor(labels), t32(prev), has, 0.4))
    q = one_hot_np(labels, 3)
    expected = np.stack([0.6 * q[0] + 0.4 * prev[0], q[1], 0.6 * q[2] + 0.4 * prev[2]])
    # Row 0 by hand: (0.08, 0.2, 0.6 + 0.12) = (0.08, 0.2, 0.72).
    np.testing.assert_allclose(got[0], [0.08, 0.2, 0.72], rtol=1e-6)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-6)


def test_pskd_method_epoch_zero_is_ce_then_uses_the_buffer():
    n, c, d, epochs = 8, 4, 6, 5
    torch.manual_seed(4)
    student = nn.Linear(d, c)
    x, y = torch.randn(n, d) * 2, torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    method = PSKD(PSKDConfig(), MethodContext(num_classes=c, num_train=n, epochs=epochs))
    first = torch.arange(6)  # samples 6 and 7 are not seen in epoch 0
    out = method.training_step(student, Batch(x[first], y[first], first, 0, 0))
    assert set(out.losses) == {"soft_ce"}
    assert out.losses["soft_ce"].item() == pytest.approx(ce_np(f64(student(x[first])), y[first].numpy()), rel=1e-5)
    method.on_step_end(student, Batch(x[first], y[first], first, 0, 0), out)
    stored = out.logits.detach().half()
    assert torch.equal(method.buffer.logits[first], stored)
    assert method.buffer.filled.tolist() == [True] * 6 + [False] * 2
    # A later epoch, after the student changed: targets mix the label with the stored (float16) predictions.
    with torch.no_grad():
        student.weight.add_(0.3)
    idx = torch.tensor([5, 6, 0, 2])
    epoch = 2
    out = method.training_step(student, Batch(x[idx], y[idx], idx, epoch, 1))
    a_t = 0.8 * (epoch + 1) / epochs
    prev = softmax_np(stored.double().numpy()[[5, 0, 2]])
    q = one_hot_np(y[idx].numpy(), c)
    targets = q.copy()
    targets[[0, 2, 3]] = (1 - a_t) * q[[0, 2, 3]] + a_t * prev  # sample 6 has no entry: its target is the label
    expected = soft_ce_np(f64(student(x[idx])), targets)
    assert out.losses["soft_ce"].item() == pytest.approx(expected, rel=1e-5)
    assert abs(expected - ce_np(f64(student(x[idx])), y[idx].numpy())) > 1e-3  # the buffer made a difference


# ---------------------------------------------------------------------- CS-KD


def test_cskd_step_terms_and_no_gradient_through_partners():
    torch.manual_seed(5)
    b, d, c, lam, t = 4, 6, 3, 2.0, 4.0
    model = nn.Linear(d, c)
    x = torch.randn(2 * b, d, requires_grad=True)
    y = torch.tensor([0, 1, 2, 1] * 2)  # partners share the anchors' classes
    method = CSKD(CSKDConfig(lam=lam, temperature=t), MethodContext(num_classes=c, num_train=8, epochs=1))
    out = method.training_step(model, Batch(x, y, torch.arange(2 * b), 0, 0))
    assert set(out.losses) == {"ce", "cls"}
    assert out.logits.shape == (b, c)
    z = f64(model(x))
    za, zp = z[:b], z[b:]
    assert out.losses["ce"].item() == pytest.approx(ce_np(za, y[:b].numpy()), rel=1e-5)
    pa, pp = softmax_np(za, t), softmax_np(zp, t)
    assert out.losses["cls"].item() == pytest.approx(lam * t * t * kl_np(pp, pa), rel=1e-4)
    out.losses["cls"].backward()
    # d/dz_a of lam T^2 KL(p_p || softmax(z_a / T)), batch mean, is lam T (p_a - p_p) / B; with z = x W^T + b:
    g = lam * t * (pa - pp) / b
    np.testing.assert_allclose(f64(model.weight.grad), g.T @ f64(x[:b]), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(f64(model.bias.grad), g.sum(0), rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(x.grad[b:]) == 0  # the partners' forward has no gradient
    assert torch.count_nonzero(x.grad[:b]) > 0


# ---------------------------------------------------------------------- the class-pair sampler


def unbalanced_labels(n_extra: int = 0) -> torch.Tensor:
    counts = {0: 1, 1: 3, 2: 17, 3: 9, 4: 2, 5: 13 + n_extra}  # class 0 holds a single sample
    labels = torch.tensor([c for c, k in counts.items() for _ in range(k)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]


def check_epoch(sampler: ClassPairBatchSampler, labels: torch.Tensor, b: int) -> list[list[int]]:
    batches = list(sampler)
    assert len(batches) == len(sampler)
    for i, batch in enumerate(batches):
        assert len(batch) % 2 == 0 and len(batch) >= 4
        if i < len(batches) - 1:
            assert len(batch) == 2 * b
        half = len(batch) // 2
        anchors, partners = batch[:half], batch[half:]
        assert labels[anchors].tolist() == labels[partners].tolist()
    return batches


@pytest.mark.parametrize("b", [8, 6])
def test_class_pair_sampler_pairs_and_covers(b):
    labels = unbalanced_labels()  # 45 samples: 45 % 8 = 5, 45 % 6 = 3
    sampler = ClassPairBatchSampler(labels, b, seed=3)
    batches = check_epoch(sampler, labels, b)
    assert len(batches) == math.ceil(len(labels) / b)
    anchors = [i for batch in batches for i in batch[:len(batch) // 2]]
    assert sorted(anchors) == list(range(len(labels)))  # every sample is an anchor exactly once
    single = int((labels == 0).nonzero())
    for batch in batches:
        half = len(batch) // 2
        for a, p in zip(batch[:half], batch[half:], strict=True):
            if a == single:
                assert p == single  # the only member of its class pairs with itself
    # Partners are drawn at random within the class, not always the anchor itself.
    pairs = [(a, p) for batch in batches for a, p in zip(batch[:len(batch) // 2], batch[len(batch) // 2:],
                                                          strict=True)]
    assert sum(a != p for a, p in pairs) > len(pairs) // 2


def test_class_pair_sampler_is_reproducible_per_seed_and_epoch():
    labels = unbalanced_labels()
    a, b = ClassPairBatchSampler(labels, 8, seed=1), ClassPairBatchSampler(labels, 8, seed=1)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)
    assert list(ClassPairBatchSampler(labels, 8, seed=2)) != list(ClassPairBatchSampler(labels, 8, seed=1))
    # Iterating twice in the same epoch gives the same batches.
    assert list(a) == list(a)


def test_class_pair_sampler_drops_a_trailing_single_anchor():
    labels = unbalanced_labels(n_extra=4)  # 49 samples, 49 % 8 == 1
    sampler = ClassPairBatchSampler(labels, 8, seed=0)
    batches = check_epoch(sampler, labels, 8)
    assert len(sampler) == len(batches) == 6
    assert all(len(batch) == 16 for batch in batches)
    anchors = [i for batch in batches for i in batch[:8]]
    assert len(anchors) == len(set(anchors)) == 48


# ---------------------------------------------------------------------- end to end on digits

# Every registered method, so that a new one is covered without editing a list (BSS and AMKD return every
# loss term on every step since their boundary samples have a fixed shape).
EVERY_METHOD = sorted(METHODS.names())
NEEDS_TEACHER = sorted(m for m in METHODS.names() if METHODS.get(m).needs_teacher(METHODS.get(m).Config()))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def superior(tmp_path_factory):
    out = tmp_path_factory.mktemp("superior")
    Trainer(load_config(None, DIGITS), out, quiet=True).fit()  # all 1438 training images: a good teacher
    return out / "checkpoints" / "last.safetensors"


def method_config(method: str, teacher=None, *extra: str):
    overrides = [*DIGITS, *SMALL, f"method={method}", "train.epochs=2", *extra]
    if teacher is not None:
        overrides.append(f"teacher.checkpoint={teacher}")
    return load_config(None, overrides)


@pytest.mark.parametrize("method", EVERY_METHOD)
def test_every_method_trains_on_digits(tmp_path, superior, method):
    method_cls = METHODS.get(method)
    teacher = superior if method_cls.needs_teacher(method_cls.Config()) else None
    cfg = method_config(method, teacher)
    trainer = Trainer(cfg, tmp_path, quiet=True)
    predicted: list[tuple[int, int]] = []  # (correct, counted) per batch of the first epoch
    original = trainer.method.training_step

    def step(model, batch):
        out = original(model, batch)
        if batch.epoch == 0:
            n = len(out.logits)
            predicted.append((int((out.logits.argmax(1) == batch.targets[:n]).sum()), n))
        return out

    trainer.method.training_step = step
    summary = trainer.fit()
    assert summary["method"] == method and summary["epochs"] == 2 and summary["model"] == "small_cnn"
    assert summary["dataset"] == "digits" and summary["num_train"] == N_TRAIN
    named = teacher_path(summary, tmp_path)  # relative to the run folder, so a moved folder still finds it
    assert (named.resolve() if named else None) == (superior.resolve() if teacher else None)
    assert 0 <= summary["top1_err"] < 50, summary["top1_err"]
    records = check_loss_records(tmp_path / "metrics.jsonl", method_cls.loss_terms(trainer.method.hparams), epochs=2)
    # Train accuracy is over the samples the method predicts (CS-KD: the anchors, not the partners). DLB tops its
    # last batch of new samples up with the epoch's first ones (dlb.last_batch=pad): whole batches of new samples.
    seen = len(trainer.train_loader) * cfg.data.batch_size if method == "dlb" else N_TRAIN
    assert sum(n for _, n in predicted) == seen
    expected_acc = 100 * sum(k for k, _ in predicted) / seen
    assert records[0]["train.acc"] == pytest.approx(expected_acc, rel=1e-5)
    if method == "cskd":
        assert all(n <= 64 for _, n in predicted)
    if method == "pskd":
        state = load_checkpoint(tmp_path / "checkpoints" / "last.safetensors").state["method"]
        assert not bool(state["buffer.logits"].isnan().any())  # every row written


def test_cskd_loader_batches_are_pairs(tmp_path):
    trainer = Trainer(method_config("cskd"), tmp_path, quiet=True)
    labels = trainer.data.train.labels
    trainer.train_loader.set_epoch(1)
    batches = list(trainer.train_loader)
    assert len(batches) == len(trainer.train_loader) == math.ceil(N_TRAIN / 64)
    seen = []
    for _, y, idx in batches:
        half = len(idx) // 2
        assert torch.equal(y[:half], y[half:]) and torch.equal(labels[idx], y)
        seen += idx[:half].tolist()
    assert sorted(seen) == list(range(N_TRAIN))


def test_pipeline_shares_the_superior_model_across_methods(tmp_path):
    logs: list[str] = []
    cache = tmp_path / "cache"
    first = run_pipeline("configs/fashion_mnist/tfkd_self.yaml", [*DIGITS, *SMALL], tmp_path / "tfkd",
                         cache_dir=cache, quiet=True, log=logs.append)
    assert first["superior"]["method"] == "ce" and first["student"]["method"] == "tfkd_self"
    (sup_dir,) = list(cache.iterdir())
    checkpoint = sup_dir / "checkpoints" / "last.safetensors"
    stamp = checkpoint.stat().st_mtime_ns
    assert not any("reusing" in line for line in logs)
    second = run_pipeline("configs/fashion_mnist/aikd.yaml", [*DIGITS, *SMALL], tmp_path / "aikd",
                          cache_dir=cache, quiet=True, log=logs.append)
    assert any("reusing" in line and str(sup_dir) in line for line in logs)
    assert list(cache.iterdir()) == [sup_dir] and checkpoint.stat().st_mtime_ns == stamp
    assert second["superior"]["run_dir"] == first["superior"]["run_dir"] == str(sup_dir)
    for result in (first, second):
        student = result["student"]
        assert teacher_path(student, Path(student["run_dir"])).resolve() == checkpoint.resolve()
    assert second["student"]["method"] == "aikd"
    assert not (tmp_path / "tfkd" / "superior").exists() and not (tmp_path / "aikd" / "superior").exists()


def test_superior_key_ignores_settings_at_their_defaults():
    from aikd.engine.pipeline import superior_key

    plain = load_config(None, DIGITS)
    same = load_config(None, [*DIGITS, "model.weights=null", "data.val_size=0", "train.lr=0.1"])  # all defaults
    other = load_config(None, [*DIGITS, "train.lr=0.05"])
    assert superior_key(plain) == superior_key(same) != superior_key(other)


def test_pipeline_kd_trains_a_teacher_of_another_architecture(tmp_path):
    # PreAct ResNet-18 (11 M parameters) is the slow part of this file: one short epoch.
    overrides = [*DIGITS, "teacher.model=preact_resnet18", "train.epochs=1", "data.train_limit=300",
                 "data.test_limit=100"]
    result = run_pipeline("configs/fashion_mnist/kd.yaml", overrides, tmp_path, quiet=True, log=lambda m: None)
    assert result["superior"]["model"] == "preact_resnet18" and result["superior"]["method"] == "ce"
    assert result["student"]["model"] == "small_cnn" and result["student"]["method"] == "kd"
    teacher = load_checkpoint(teacher_path(result["student"], tmp_path / "student"))
    assert teacher.meta["model"]["name"] == "preact_resnet18"
    assert load_checkpoint(tmp_path / "student/checkpoints/last.safetensors").meta["model"]["name"] == "small_cnn"


def test_pipeline_tfkd_self_refuses_another_teacher_architecture(tmp_path):
    with pytest.raises(ConfigError, match=r"architecture.*preact_resnet18"):
        run_pipeline("configs/fashion_mnist/tfkd_self.yaml", [*DIGITS, "teacher.model=preact_resnet18"], tmp_path,
                     quiet=True, log=lambda m: None)
    assert not any(tmp_path.iterdir())  # refused before any training


def save_untrained(path, name: str, classes: int):
    model = build_model(name, classes, 1, 8)
    return save_checkpoint(path, model.state_dict(),
                           {**model_meta(name, "cifar", classes, 1, 8, [str(i) for i in range(classes)]), "epoch": 1})


@pytest.mark.parametrize("method", NEEDS_TEACHER)
def test_teacher_with_other_class_count_is_refused(tmp_path, method):
    path = save_untrained(tmp_path / "wrong.safetensors", "small_cnn", 7)
    with pytest.raises(CheckpointError, match="7 classes"):
        Trainer(method_config(method, path), tmp_path / "run", quiet=True)


@pytest.mark.parametrize("method", NEEDS_TEACHER)
def test_missing_teacher_is_a_config_error(tmp_path, method):
    with pytest.raises(ConfigError, match=r"teacher\.checkpoint"):
        Trainer(method_config(method), tmp_path, quiet=True)


def test_only_self_distillation_requires_the_same_architecture(tmp_path):
    path = save_untrained(tmp_path / "preact.safetensors", "preact_resnet18", 10)
    with pytest.raises(CheckpointError, match="same architecture"):
        Trainer(method_config("tfkd_self", path), tmp_path / "self", quiet=True)
    for method in ("kd", "dkd"):  # teacher-student KD accepts any architecture with the right classes
        trainer = Trainer(method_config(method, path), tmp_path / method, quiet=True)
        teacher = trainer.method.ctx.teacher
        assert sum(p.numel() for p in teacher.parameters()) == sum(
            p.numel() for p in build_model("preact_resnet18", 10, 1, 8).parameters())
        assert not trainer.method.ctx.teacher.training


def test_buffer_costs_two_bytes_per_class_and_marks_unwritten_rows():
    from aikd.methods.buffer import PredictionBuffer

    buffer = PredictionBuffer(4, 3)
    assert buffer.bytes_per_sample == 6  # float16 x 3 classes, nothing else
    assert buffer.filled.tolist() == [False] * 4
    buffer.write(torch.tensor([2, 0]), torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 1.0]]))
    logits, filled = buffer.read(torch.tensor([0, 1, 2]))
    assert filled.tolist() == [True, False, True]
    assert logits[2].tolist() == [1.0, 2.0, 3.0]
    restored = PredictionBuffer(4, 3)
    restored.load_state_dict(buffer.state_dict())
    assert restored.filled.tolist() == [True, False, True, False]



def compile_contexts(teacher: nn.Module, student: nn.Module) -> tuple[MethodContext, MethodContext]:
    """The same method context with train.compile off and on."""
    ctx = MethodContext(num_classes=4, num_train=6, epochs=2, teacher=teacher, student=student)
    return ctx, dataclasses.replace(ctx, compile=True)


ONLINE = {"adv_weight": 0.0, "superior": "ema", "superior_start": 0.5, "previous": "snapshot"}


def test_train_compile_wraps_frozen_forwards_outside_the_state_dict():
    """Under train.compile the teacher (KD) and AI-KD's EMA and snapshot copies get a compiled forward, kept
    out of state_dict(): the same keys, so checkpoints load either way. Nothing is compiled until a call."""
    from aikd.compiling import CompiledOrEager
    from aikd.methods.aikd import AIKD, AIKDConfig
    from aikd.methods.kd import KD, KDConfig

    teacher, student = build_model("small_cnn", 4, 1, 8).eval(), build_model("small_cnn", 4, 1, 8)
    off, on = compile_contexts(teacher, student)
    eager, compiled = KD(KDConfig(), off), KD(KDConfig(), on)
    assert eager._teacher_forward is None and isinstance(compiled._teacher_forward, CompiledOrEager)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    eager, compiled = AIKD(AIKDConfig(**ONLINE), off), AIKD(AIKDConfig(**ONLINE), on)
    assert eager.superior._forward is None and eager.previous._forward is None
    assert isinstance(compiled.superior._forward, CompiledOrEager)
    assert isinstance(compiled.previous._forward, CompiledOrEager)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict())


@pytest.mark.slow
def test_teacher_and_frozen_copy_forwards_run_compiled_under_train_compile():
    """With ``compile`` on, KD's teacher and AI-KD's EMA copy run through torch.compile (really compiled: this
    machine has the toolchain) and give eager's logits. About 30 s on 2 CPU cores."""
    from aikd.methods.aikd import AIKD, AIKDConfig
    from aikd.methods.kd import KD, KDConfig

    torch.manual_seed(0)
    teacher, student = build_model("small_cnn", 4, 1, 8).eval().requires_grad_(False), build_model("small_cnn", 4, 1, 8)
    images = torch.randn(6, 1, 8, 8)
    off, on = compile_contexts(teacher, student)
    for eager, compiled in ((KD(KDConfig(), off), KD(KDConfig(), on)),
                            (AIKD(AIKDConfig(**ONLINE), off), AIKD(AIKDConfig(**ONLINE), on))):
        forward = compiled._teacher_forward if isinstance(compiled, KD) else compiled.superior._forward
        calls, inner = [], forward.compiled
        forward.compiled = lambda *args, inner=inner, calls=calls: calls.append(1) or inner(*args)
        logits = compiled.teacher_logits if isinstance(compiled, KD) else compiled.superior.logits
        expected = eager.teacher_logits if isinstance(eager, KD) else eager.superior.logits
        torch.testing.assert_close(logits(images), expected(images), rtol=1e-5, atol=1e-5)
        assert calls and forward.failed is None  # it went through torch.compile, which did not fall back


def test_every_methods_own_batch_sampler_declares_what_the_loaders_read():
    """Method.batch_sampler returns an EpochSampler (aikd.data.loaders): the sharded loader reads its num_samples and
    batch_size, the loaders its set_epoch, iteration and length; each declares it by subclassing."""
    from aikd.data.loaders import EpochSampler, ShardedBatchSampler
    from aikd.methods.base import Method

    labels = torch.arange(24) % 3
    own = [cls for cls in (METHODS.get(name) for name in METHODS.names()) if cls.batch_sampler is not
           Method.batch_sampler]
    assert {cls.name for cls in own} >= {"cskd", "bake", "dlb", "ddgsd"}
    for cls in own:
        ctx = MethodContext(num_classes=3, num_train=24, epochs=1, train_labels=labels, student=nn.Linear(4, 3))
        sampler = cls(cls.Config(), ctx).batch_sampler(4, seed=0)
        assert isinstance(sampler, EpochSampler) and EpochSampler in type(sampler).__mro__, cls.name
        sampler.set_epoch(1)
        batches = list(sampler)
        assert len(batches) == len(sampler) and sampler.num_samples > 0 and sampler.batch_size > 0, cls.name
        assert len(ShardedBatchSampler(sampler, 0, 2)) <= len(sampler), cls.name
