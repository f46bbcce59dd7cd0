"""DDGSD: the loss and its gradients against hand formulas (a flipped sign, a dropped T^2 or a moved detach
fails), the two-view batches (two independent views of every image, in memory and from files, kept in pairs by
mixing), a short run in aikd's loop and the drop-in loss in a plain loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from aikd.config import load_config
from aikd.data import FileSplit
from aikd.data.augment import BatchAugment, random_crop_flip
from aikd.data.loaders import DataBundle, Loading
from aikd.data.mixing import BatchMixer
from aikd.engine import Trainer
from aikd.errors import ConfigError
from aikd.methods.ddgsd import DDGSDConfig, DDGSDLoss, TwoViewBatchSampler, ddgsd_loss, mmd_linear
from helpers import check_loss_records

pytestmark = pytest.mark.usefixtures("one_thread")

RNG = np.random.default_rng(3)
ZA = RNG.normal(scale=2.0, size=(5, 4))
ZB = RNG.normal(scale=2.0, size=(5, 4))
FA = RNG.normal(loc=0.3, size=(5, 6))
FB = RNG.normal(loc=-0.2, size=(5, 6))
LABELS = np.array([0, 1, 2, 3, 1])


def softmax_np(z: np.ndarray, t: float = 1.0) -> np.ndarray:
    e = np.exp(z / t - (z / t).max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def kl_np(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.mean([sum(p[i, c] * math.log(p[i, c] / q[i, c]) for c in range(p.shape[1]))
                          for i in range(len(p))]))


def ce_np(z: np.ndarray, labels: np.ndarray) -> float:
    p = softmax_np(z)
    return float(np.mean([-math.log(p[i, y]) for i, y in enumerate(labels)]))


def t32(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float32)


@pytest.mark.parametrize(("t", "ce_weight", "mu"), [(4.0, 0.5, 5e-4), (2.0, 1.0, 0.1)])
def test_loss_terms_by_hand(t, ce_weight, mu):
    ce, kl, mmd = ddgsd_loss(t32(ZA), t32(ZB), t32(FA), t32(FB), torch.tensor(LABELS), None, t, ce_weight, mu)
    assert ce.item() == pytest.approx(ce_weight * (ce_np(ZA, LABELS) + ce_np(ZB, LABELS)) / 2, rel=1e-5)
    pa, pb = softmax_np(ZA, t), softmax_np(ZB, t)
    expected = t * t * (kl_np(pb, pa) + kl_np(pa, pb))
    assert kl.item() == pytest.approx(expected, rel=1e-5)
    assert abs(expected - (kl_np(pb, pa) + kl_np(pa, pb))) > 1e-2  # T^2 shows
    grand = (FA.mean() - FB.mean()) ** 2
    assert mmd.item() == pytest.approx(mu * grand, rel=1e-4)


def test_mmd_forms():
    a, b = t32(FA), t32(FB)
    vec = sum((FA[:, k].mean() - FB[:, k].mean()) ** 2 for k in range(FA.shape[1]))
    assert mmd_linear(a, b, "feature_mean").item() == pytest.approx(vec, rel=1e-5)
    assert mmd_linear(a, b, "grand_mean").item() == pytest.approx((FA.mean() - FB.mean()) ** 2, rel=1e-4)
    assert mmd_linear(a, a).item() == 0.0
    # Only the means count: the same features shuffled between samples give 0.
    assert mmd_linear(a, a.flip(0), "feature_mean").item() == pytest.approx(0.0, abs=1e-10)


def test_gradients_each_view_learns_from_the_other_detached():
    """d/dz_a = w_ce (p_a - y) / (2N) + T (p_a,T - p_b,T) / N: from KL(p_b || p_a) alone, since view a is the
    detached target of the other KL (without the detach it would add T (p_a,T - p_b,T)-like terms of KL(p_a||p_b)).
    d/df_a = 2 mu (mean f_a - mean f_b) / (N D) for every element (grand mean)."""
    t, w, mu, n = 4.0, 0.5, 5e-4, len(LABELS)
    za, zb = t32(ZA).requires_grad_(True), t32(ZB).requires_grad_(True)
    fa, fb = t32(FA).requires_grad_(True), t32(FB).requires_grad_(True)
    ce, kl, mmd = ddgsd_loss(za, zb, fa, fb, torch.tensor(LABELS), None, t, w, mu)
    (ce + kl + mmd).backward()
    y = np.eye(4)[LABELS]
    pa, pb = softmax_np(ZA, t), softmax_np(ZB, t)
    np.testing.assert_allclose(za.grad.numpy(), w * (softmax_np(ZA) - y) / (2 * n) + t * (pa - pb) / n,
                               rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(zb.grad.numpy(), w * (softmax_np(ZB) - y) / (2 * n) + t * (pb - pa) / n,
                               rtol=1e-4, atol=1e-7)
    g = 2 * mu * (FA.mean() - FB.mean()) / FA.size
    np.testing.assert_allclose(fa.grad.numpy(), np.full(FA.shape, g), rtol=1e-4)
    np.testing.assert_allclose(fb.grad.numpy(), np.full(FB.shape, -g), rtol=1e-4)


def test_mixed_targets_per_view():
    soft = t32(np.eye(4)[LABELS] * 0.7 + 0.075)
    ce, _, _ = ddgsd_loss(t32(ZA), t32(ZB), t32(FA), t32(FB), soft, soft, 4.0, 1.0)
    expected = float(np.mean([-(soft.numpy()[i] * np.log(softmax_np(z)[i])).sum() for z in (ZA, ZB)
                              for i in range(5)]))
    assert ce.item() == pytest.approx(expected, rel=1e-5)


def test_config_ranges():
    for bad in ({"temperature": 0.0}, {"ce_weight": -1.0}, {"mmd_weight": -1.0}, {"mmd": "rbf"}):
        with pytest.raises(ConfigError):
            DDGSDConfig(**bad)


# ---------------------------------------------------------------------- two views of every image


def test_sampler_repeats_each_batch():
    sampler = TwoViewBatchSampler(10, 4, seed=1)
    sampler.set_epoch(3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3
    for batch in batches:
        half = len(batch) // 2
        assert batch[:half] == batch[half:]
    assert sorted(i for b in batches for i in b[:len(b) // 2]) == list(range(10))


def test_in_memory_copies_get_independent_views():
    images = torch.randint(0, 256, (16, 1, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    views = random_crop_flip(torch.cat([images, images]), 2, True, torch.Generator().manual_seed(1))
    same = [torch.equal(views[i], views[16 + i]) for i in range(16)]
    assert sum(same) < 4  # 25 offsets x 2 flips: a copy rarely draws its twin's view


def test_file_copies_get_independent_views(tmp_path):
    path = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    split = FileSplit([path] * 8, torch.zeros(8, dtype=torch.int64), ["noise"])
    aug = BatchAugment((0.5,) * 3, (0.25,) * 3, 4, True, True)
    bundle = DataBundle("files", split, split, 1, 3, 32, aug, Loading(4, 4, 0, True))
    loader = bundle.loader(True, TwoViewBatchSampler(8, 4, seed=2), seed=2)
    loader.set_epoch(0)
    first = [images for images, _, _ in loader]
    for images in first:
        assert sum(torch.equal(images[i], images[4 + i]) for i in range(4)) < 2
    loader.set_epoch(0)
    assert all(torch.equal(a, b) for (a, _, _), b in zip(loader, first, strict=True))  # and replay exactly


def test_mixing_keeps_the_pairs():
    cfg = load_config(None, ["data.name=digits", "data.mix=mixup", "data.mix_prob=1.0"]).data
    mixer = BatchMixer(cfg, 10, paired=True, seed=0)
    labels = torch.tensor([0, 1, 2, 3])
    images = torch.randn(4, 1, 8, 8)
    _, targets = mixer(torch.cat([images, images]), torch.cat([labels, labels]), None)
    assert targets.ndim == 2 and torch.equal(targets[:4], targets[4:])


# ---------------------------------------------------------------------- in aikd's loop and in a plain loop

DIGITS = ["data.name=digits", "model.name=small_cnn", "data.batch_size=32", "deterministic=true", "train.epochs=1",
          "data.train_limit=240", "data.test_limit=100", "method=ddgsd"]


def test_ddgsd_trains_in_aikds_loop(tmp_path):
    trainer = Trainer(load_config(None, DIGITS), tmp_path, quiet=True)
    seen, twins = [], []
    original = trainer.method.training_step

    def step(model, batch):
        half = len(batch.indices) // 2
        assert torch.equal(batch.indices[:half], batch.indices[half:])
        twins.append(sum(torch.equal(batch.images[i], batch.images[half + i]) for i in range(half)) / half)
        out = original(model, batch)
        seen.append(len(out.logits))
        return out

    trainer.method.training_step = step
    summary = trainer.fit()
    assert sum(seen) == 240 and max(seen) == 32
    assert sum(twins) / len(twins) < 0.2  # two views (digits: 9 crops x 2 flips, so twins happen)
    assert 0 <= summary["top1_err"] < 100
    check_loss_records(tmp_path / "metrics.jsonl", {"ce", "kl", "mmd"}, epochs=1)


def test_drop_in_loss_in_a_plain_loop():
    torch.manual_seed(0)
    from aikd.models import build_model

    model = build_model("small_cnn", 4, 1, 8)
    images = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(32) % 4
    criterion = DDGSDLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        view_a = random_crop_flip(images, 1, True, g).float() / 255
        view_b = random_crop_flip(images, 1, True, g).float() / 255
        logits, feats = model(torch.cat([view_a, view_b]), return_features=True)
        loss = criterion(logits[:32], logits[32:], feats[:32], feats[32:], labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    ce, kl, mmd = ddgsd_loss(logits[:32], logits[32:], feats[:32], feats[32:], labels)
    assert loss.item() == pytest.approx((ce + kl + mmd).item(), rel=1e-6)
