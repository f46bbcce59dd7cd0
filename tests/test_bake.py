"""BAKE: the propagated soft targets against an explicit-loop numpy propagation, the loss and its gradient
against hand formulas (a flipped sign, a dropped T^2 or a target that carries gradient fails), the intra-class
sampler, a short run in aikd's loop and the drop-in loss in a plain loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aikd.config import load_config
from aikd.engine import Trainer
from aikd.errors import ConfigError
from aikd.methods.bake import BAKEConfig, BAKELoss, IntraClassBatchSampler, bake_loss, bake_targets
from helpers import check_loss_records

pytestmark = pytest.mark.usefixtures("one_thread")

RNG = np.random.default_rng(7)
FEATS = RNG.normal(size=(6, 5))
LOGITS = RNG.normal(scale=2.0, size=(6, 4))
LABELS = np.array([0, 1, 2, 3, 0, 1])


def softmax_np(z: np.ndarray, t: float = 1.0) -> np.ndarray:
    e = np.exp(z / t - (z / t).max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def propagated_np(feats: np.ndarray, logits: np.ndarray, omega: float, t: float, iters: int = 500) -> np.ndarray:
    """Explicit loops: A_ij = exp(cos_ij) / sum_{k != i} exp(cos_ik), A_ii = 0; then Q <- omega A Q + (1 - omega) P
    to convergence (the fixed point the closed form solves)."""
    n = len(feats)
    unit = [f / math.sqrt(sum(x * x for x in f)) for f in feats]
    a = np.zeros((n, n))
    for i in range(n):
        row = [math.exp(float(np.dot(unit[i], unit[j]))) if j != i else 0.0 for j in range(n)]
        a[i] = np.array(row) / sum(row)
    p = softmax_np(logits, t)
    q = p.copy()
    for _ in range(iters):
        q = omega * a @ q + (1 - omega) * p
    return q


def kl_rows_np(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.mean([sum(p[i, c] * math.log(p[i, c] / q[i, c]) for c in range(p.shape[1]))
                          for i in range(len(p))]))


def t32(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float32)


@pytest.mark.parametrize(("omega", "t"), [(0.5, 4.0), (0.9, 1.0), (0.2, 2.0)])
def test_targets_are_the_propagated_ensemble(omega, t):
    got = bake_targets(t32(FEATS), t32(LOGITS), omega, t).double().numpy()
    expected = propagated_np(FEATS, LOGITS, omega, t)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)
    # omega = 0: no ensembling, the sample's own softened prediction.
    np.testing.assert_allclose(bake_targets(t32(FEATS), t32(LOGITS), 0.0, t).numpy(), softmax_np(LOGITS, t),
                               rtol=1e-5)


def test_a_sample_is_not_its_own_neighbour():
    # Two samples: each one's only neighbour is the other, whatever their similarity, so A = [[0, 1], [1, 0]] and
    # Q = (1 - w) / (1 - w^2) [[1, w], [w, 1]] P: with w = 0.5, Q_0 = (2 P_0 + P_1) / 3.
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # P_0 = (3/4, 1/4), P_1 = (1/2, 1/2) at T = 1
    q = bake_targets(feats, logits, 0.5, 1.0)
    assert q[0].tolist() == pytest.approx([(2 * 0.75 + 0.5) / 3, (2 * 0.25 + 0.5) / 3], rel=1e-5)


@pytest.mark.parametrize(("t", "lam"), [(4.0, 1.0), (2.0, 0.5)])
def test_loss_is_ce_plus_t2_kl_to_the_targets(t, lam):
    ce, kd = bake_loss(t32(LOGITS), t32(FEATS), torch.tensor(LABELS), 0.5, t, lam)
    p = softmax_np(LOGITS)
    assert ce.item() == pytest.approx(float(np.mean([-math.log(p[i, y]) for i, y in enumerate(LABELS)])), rel=1e-5)
    q = propagated_np(FEATS, LOGITS, 0.5, t)
    expected = lam * t * t * kl_rows_np(q, softmax_np(LOGITS, t))
    assert kd.item() == pytest.approx(expected, rel=1e-4)
    assert kd.item() > 0 and abs(expected - lam * kl_rows_np(q, softmax_np(LOGITS, t))) > 1e-3  # T^2 shows


def test_gradient_reaches_the_logits_only_through_the_student_side():
    """d/dz of CE + lam T^2 KL(Q || p(z; T)) with Q constant: (p - y) / N + lam T (p_T - Q) / N. A target that
    carried gradient would add Q's own derivative; the features get none."""
    t, lam, n = 4.0, 1.0, len(LABELS)
    logits = t32(LOGITS).requires_grad_(True)
    feats = t32(FEATS).requires_grad_(True)
    ce, kd = bake_loss(logits, feats, torch.tensor(LABELS), 0.5, t, lam)
    (ce + kd).backward()
    assert feats.grad is None
    y = np.eye(4)[LABELS]
    q = propagated_np(FEATS, LOGITS, 0.5, t)
    expected = (softmax_np(LOGITS) - y) / n + lam * t * (softmax_np(LOGITS, t) - q) / n
    np.testing.assert_allclose(logits.grad.double().numpy(), expected, rtol=1e-4, atol=1e-6)


def test_the_targets_ignore_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = bake_targets(t32(FEATS), t32(LOGITS), 0.5, 4.0)
    assert q.dtype == torch.float32
    np.testing.assert_allclose(q.numpy(), propagated_np(FEATS, LOGITS, 0.5, 4.0), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------- the sampler


def test_sampler_gives_every_anchor_m_companions_of_its_class():
    labels = torch.tensor([0] * 7 + [1] * 2 + [2] + [3] * 20)  # class 1 has one other sample, class 2 none
    sampler = IntraClassBatchSampler(labels, anchors=4, intra_imgs=3, seed=5)
    sampler.set_epoch(2)
    batches = list(sampler)
    assert len(batches) == len(sampler) == math.ceil(len(labels) / 4)
    anchors_seen = []
    for batch in batches:
        a = len(batch) // 4
        anchors, companions = batch[:a], batch[a:]
        anchors_seen += anchors
        for k, anchor in enumerate(anchors):
            mine = companions[3 * k:3 * k + 3]
            assert all(labels[c] == labels[anchor] for c in mine)
            others = int((labels == labels[anchor]).sum()) - 1
            if others >= 3:  # without replacement, never the anchor itself
                assert len(set(mine)) == 3 and anchor not in mine
            elif others > 0:
                assert anchor not in mine
            else:
                assert mine == [anchor] * 3
    assert sorted(anchors_seen) == list(range(len(labels)))  # every sample is an anchor once per epoch
    again = IntraClassBatchSampler(labels, 4, 3, seed=5)
    again.set_epoch(2)
    assert list(again) == batches  # (seed, epoch) decide the draw
    again.set_epoch(3)
    assert list(again) != batches


def test_under_data_parallelism_each_rank_takes_its_anchors_with_their_own_companions():
    """Ranks split the anchors and each keeps its M companions, laid out as a batch of its own: a contiguous slice
    of [anchors | companions] would give one rank the anchors and another only companions of them."""
    from aikd.data.loaders import ShardedBatchSampler

    labels = torch.arange(30) % 5
    sampler = IntraClassBatchSampler(labels, anchors=6, intra_imgs=3, seed=1)
    sampler.set_epoch(1)
    shards = [ShardedBatchSampler(sampler, rank, 2) for rank in range(2)]
    assert [len(shard) for shard in shards] == [len(sampler)] * 2 == [5, 5]
    for whole, *parts in zip(sampler, *shards, strict=True):
        anchors, companions = whole[:6], whole[6:]
        for rank, part in enumerate(parts):
            mine = list(range(3 * rank, 3 * rank + 3))  # anchors 0-2 on rank 0, 3-5 on rank 1
            assert part == [anchors[k] for k in mine] + [c for k in mine for c in companions[3 * k:3 * k + 3]]
    # The last batch is counted in anchors, not images: 30 = 3 x 8 + 6 keeps it (6 anchors give 2 ranks 3 each),
    # 30 = 3 x 9 + 3 drops it (3 anchors cannot give 2 ranks 2 each), though it holds 12 images.
    assert len(ShardedBatchSampler(IntraClassBatchSampler(labels, anchors=8, intra_imgs=3), 0, 2)) == 4
    assert len(ShardedBatchSampler(IntraClassBatchSampler(labels, anchors=9, intra_imgs=3), 0, 2)) == 3


def test_companions_are_drawn_uniformly_from_the_others():
    labels = torch.zeros(6, dtype=torch.int64)
    sampler = IntraClassBatchSampler(labels, anchors=6, intra_imgs=2, seed=0)
    counts = np.zeros((6, 6))
    for epoch in range(400):
        sampler.set_epoch(epoch)
        (batch,) = list(sampler)
        for k, anchor in enumerate(batch[:6]):
            for c in batch[6 + 2 * k:8 + 2 * k]:
                counts[anchor, c] += 1
    assert np.all(np.diag(counts) == 0)
    off = counts[~np.eye(6, dtype=bool)]
    assert off.min() > 0.8 * off.mean() and off.max() < 1.2 * off.mean()  # 2 of 5 others: 160 each expected


def test_config_ranges():
    with pytest.raises(ConfigError):
        BAKEConfig(omega=1.0)
    with pytest.raises(ConfigError):
        BAKEConfig(temperature=0.0)
    with pytest.raises(ConfigError):
        BAKEConfig(intra_imgs=-1)


# ---------------------------------------------------------------------- in aikd's loop and in a plain loop

DIGITS = ["data.name=digits", "model.name=small_cnn", "data.batch_size=32", "deterministic=true", "train.epochs=1",
          "data.train_limit=240", "data.test_limit=100", "method=bake"]


def test_bake_trains_in_aikds_loop(tmp_path):
    trainer = Trainer(load_config(None, DIGITS), tmp_path, quiet=True)
    seen = []
    original = trainer.method.training_step

    def step(model, batch):
        out = original(model, batch)
        a = len(batch.indices) // 4
        assert torch.equal(batch.targets[a:], batch.targets[:a].repeat_interleave(3))  # companions share classes
        seen.append(len(out.logits))
        return out

    trainer.method.training_step = step
    summary = trainer.fit()
    assert sum(seen) == 240 and len(seen) == 30  # 8 anchors x 4 images per step, every sample an anchor once
    assert 0 <= summary["top1_err"] < 100
    check_loss_records(tmp_path / "metrics.jsonl", {"ce", "bake"}, epochs=1)


def test_too_small_a_batch_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="intra_imgs"):
        Trainer(load_config(None, [*DIGITS, "data.batch_size=3"]), tmp_path, quiet=True)


def test_drop_in_loss_in_a_plain_loop():
    torch.manual_seed(0)
    from aikd.models import build_model

    model = build_model("small_cnn", 4, 1, 8)
    images = torch.randn(32, 1, 8, 8)
    labels = torch.arange(32) % 4
    sampler = IntraClassBatchSampler(labels, anchors=4, intra_imgs=3)
    criterion = BAKELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    first = last = None
    for epoch in range(6):
        sampler.set_epoch(epoch)
        for batch in sampler:
            logits, features = model(images[batch], return_features=True)
            loss = criterion(logits, features, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            first = loss.item() if first is None else first
            last = loss.item()
    assert math.isfinite(last) and last < first
    assert isinstance(criterion, nn.Module) and not list(criterion.parameters())
    with torch.no_grad():
        logits, features = model(images[:8], return_features=True)
    ce, kd = bake_loss(logits, features, labels[:8])
    assert criterion(logits, features, labels[:8]).item() == pytest.approx((ce + kd).item(), rel=1e-6)
    assert ce.item() == pytest.approx(F.cross_entropy(logits, labels[:8]).item(), rel=1e-6)
