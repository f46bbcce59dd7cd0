"""Zipf's label smoothing: ranks against scipy, the soft non-target label and the KL against loops written from
the official code, by hand, their gradients (no gradient through the ranking), the dense votes of a real model
against a computation by hand, the small_cnn fallback, and training in aikd's loop and in a plain loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import rankdata

from aikd.config import load_config
from aikd.engine import Trainer
from aikd.errors import ConfigError
from aikd.methods import METHODS, Batch, MethodContext
from aikd.methods.zipfls import (
    ZipfLSConfig,
    ZipfLSLoss,
    dense_votes,
    rank_min,
    zipf_kl,
    zipf_ls_terms,
    zipf_non_target,
)
from aikd.models import build_model
from helpers import check_loss_records

pytestmark = pytest.mark.usefixtures("one_thread")

LOGITS = np.array([[2.0, 1.0, 0.1, -0.5, 0.7], [0.5, 2.5, -1.0, 0.3, 1.1], [-0.2, 0.4, 1.7, 0.9, 0.0]])
LABELS = np.array([0, 1, 3])
VOTES = np.array([[3.0, 5.0, 0.0, 0.0, 1.0], [0.0, 2.0, 2.0, 0.0, 5.0], [0.0, 0.0, 0.0, 9.0, 0.0]])


def t32(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float32)


def zipf_reference(scores: np.ndarray, labels: np.ndarray, power: float = 1.0) -> np.ndarray:
    """The official gen_pdf (pytorch_zipfls/losses.py:225-292) with rank='hard', rank_zipf: scipy ranks of every
    class, r^-power, the target column removed, normalised; returned as (N, C) with 0 at the target."""
    ranks = rankdata(-scores, axis=1, method="min")
    out = np.zeros_like(scores, dtype=np.float64)
    for i in range(len(scores)):
        kept = [c for c in range(scores.shape[1]) if c != labels[i]]
        dist = np.array([(1.0 / ranks[i, c]) ** power for c in kept])
        out[i, kept] = dist / dist.sum()
    return out


def kl_reference(logits: np.ndarray, labels: np.ndarray, pdf: np.ndarray) -> float:
    """The official kl_loss (losses.py:130-147): log softmax over the non-target logits, KL summed, batch mean."""
    rows = []
    for i in range(len(logits)):
        kept = [c for c in range(logits.shape[1]) if c != labels[i]]
        z = logits[i, kept]
        log_q = z - math.log(np.exp(z).sum())
        rows.append(sum(pdf[i, c] * (math.log(pdf[i, c]) - log_q[j]) for j, c in enumerate(kept)))
    return float(np.mean(rows))


def test_rank_min_is_scipys_rankdata_min():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(20, 9)).astype(np.float64)  # many ties
    np.testing.assert_array_equal(rank_min(t32(scores)).numpy(), rankdata(-scores, axis=1, method="min"))


def test_dense_votes_count_each_locations_arg_max():
    rng = np.random.default_rng(1)
    dense = rng.normal(size=(3, 7, 5))
    expected = np.zeros((3, 5))
    for i in range(3):
        for j in range(7):
            expected[i, int(np.argmax(dense[i, j]))] += 1
    np.testing.assert_array_equal(dense_votes(t32(dense), 5).numpy(), expected)


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_non_target_label_against_the_official_steps(power):
    expected = zipf_reference(VOTES, LABELS, power)
    np.testing.assert_allclose(zipf_non_target(t32(VOTES), torch.tensor(LABELS), power).numpy(), expected, rtol=1e-6)


def test_non_target_label_by_hand():
    # Votes (3 target, 5, 0, 0, 1): ranks (2, 1, 4, 4, 3). The target is ranked (it pushes class 4 to rank 3)
    # and then left out: (1, 1/4, 1/4, 1/3) / (11/6).
    dist = zipf_non_target(t32([[3.0, 5.0, 0.0, 0.0, 1.0]]), torch.tensor([0]))
    expected = torch.tensor([[0.0, 1.0, 0.25, 0.25, 1 / 3]]) / (11 / 6)
    torch.testing.assert_close(dist, expected)


def test_kl_against_the_official_steps_and_its_direction():
    pdf = zipf_reference(VOTES, LABELS)
    expected = kl_reference(LOGITS, LABELS, pdf)
    got = zipf_kl(t32(LOGITS), torch.tensor(LABELS), t32(pdf)).item()
    assert got == pytest.approx(expected, rel=1e-5)
    # KL(Q || P) instead would differ.
    reverse = []
    for i in range(3):
        kept = [c for c in range(5) if c != LABELS[i]]
        q = np.exp(LOGITS[i, kept]) / np.exp(LOGITS[i, kept]).sum()
        reverse.append(sum(q[j] * math.log(q[j] / pdf[i, c]) for j, c in enumerate(kept)))
    assert abs(np.mean(reverse) - expected) > 1e-2


def test_kl_by_hand():
    # Label 0 of three classes; non-target logits (ln 3, 0): Q = (3/4, 1/4). P = (1/2, 1/2) (equal votes).
    # KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3).
    logits = torch.tensor([[5.0, math.log(3.0), 0.0]])
    pdf = zipf_non_target(torch.tensor([[9.0, 1.0, 1.0]]), torch.tensor([0]))
    assert zipf_kl(logits, torch.tensor([0]), pdf).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-5)


def test_terms_weights_gradients_and_the_detached_ranking():
    logits = t32(LOGITS).requires_grad_(True)
    scores = t32(LOGITS + np.array([0, 0, 3.0, 0, 0])).requires_grad_(True)  # a ranking other than the logits'
    terms = zipf_ls_terms(logits, torch.tensor(LABELS), scores, weight=0.1)
    pdf = zipf_reference(scores.detach().numpy().astype(np.float64), LABELS)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(t32(LOGITS), torch.tensor(LABELS)).item(), rel=1e-6)
    assert terms["zipf"].item() == pytest.approx(0.1 * kl_reference(LOGITS, LABELS, pdf), rel=1e-5)
    sum(terms.values()).backward()
    assert scores.grad is None  # the soft label carries no gradient
    # d/dz: CE's (p - y) / N, plus weight * (Q - P) / N on the non-target classes, 0 on the target.
    expected = np.zeros_like(LOGITS)
    for i in range(3):
        p = np.exp(LOGITS[i]) / np.exp(LOGITS[i]).sum()
        expected[i] = p - np.eye(5)[LABELS[i]]
        kept = [c for c in range(5) if c != LABELS[i]]
        q = np.exp(LOGITS[i, kept]) / np.exp(LOGITS[i, kept]).sum()
        for j, c in enumerate(kept):
            expected[i, c] += 0.1 * (q[j] - pdf[i, c])
    np.testing.assert_allclose(logits.grad.numpy(), expected / 3, rtol=1e-5, atol=1e-7)


def test_correct_only_averages_over_correct_samples():
    logits, labels = t32(LOGITS), torch.tensor([0, 1, 3])  # samples 0 and 1 are right, 2 is not (argmax 2)
    pdf = zipf_non_target(t32(VOTES), labels)
    per = [zipf_kl(logits[i:i + 1], labels[i:i + 1], pdf[i:i + 1]).item() for i in range(3)]
    assert zipf_kl(logits, labels, pdf, correct_only=True).item() == pytest.approx((per[0] + per[1]) / 2, rel=1e-5)
    wrong = torch.tensor([4, 4, 4])
    assert zipf_kl(logits, wrong, zipf_non_target(t32(VOTES), wrong), correct_only=True).item() == 0.0


def test_mixed_labels_use_soft_ce_and_rank_around_their_arg_max():
    mixed = torch.tensor([[0.7, 0.3, 0, 0, 0], [0, 0.4, 0, 0, 0.6], [0, 0, 0, 1.0, 0]])
    terms = zipf_ls_terms(t32(LOGITS), mixed, t32(VOTES))
    hard = zipf_ls_terms(t32(LOGITS), torch.tensor([0, 4, 3]), t32(VOTES))
    assert terms["zipf"].item() == pytest.approx(hard["zipf"].item(), rel=1e-6)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(t32(LOGITS), mixed).item(), rel=1e-6)


def method_on(arch: str, size: int, channels: int, **settings):
    torch.manual_seed(0)
    model = build_model(arch, 10, channels, size)
    method = METHODS.get("zipfls")(ZipfLSConfig(**settings),
                                   MethodContext(num_classes=10, num_train=8, epochs=1, student=model))
    return model, method


def test_dense_votes_of_preact_resnet18_equal_a_computation_by_hand():
    """The method's soft label on preact_resnet18 is ranked by the head at every location of the pre-pool map,
    upsampled x2 (bilinear), as the official CIFAR-100 run; computed here step by step from the model."""
    model, method = method_on("preact_resnet18", 16, 3)
    model.eval()  # BatchNorm's running statistics: the hand computation sees the same map
    x, labels = torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, 4])
    out = method.training_step(model, Batch(x, labels, torch.arange(4), 0, 0))
    f = model.features
    with torch.no_grad():
        fmap = F.relu(f.bn(f.layers(f.stem(x))))  # (4, 512, 2, 2)
        up = F.interpolate(fmap, scale_factor=2.0, mode="bilinear", align_corners=False)
        votes = np.zeros((4, 10))
        for i in range(4):
            for h in range(4):
                for w in range(4):
                    votes[i, int(model.head(up[i, :, h, w]).argmax())] += 1
    assert votes.sum() == 4 * 16
    pdf = zipf_reference(votes, labels.numpy())
    expected = 0.1 * kl_reference(out.logits.detach().double().numpy(), labels.numpy(), pdf)
    assert out.losses["zipf"].item() == pytest.approx(expected, rel=1e-5)
    assert method.run_facts()["zipfls_rank_from"].startswith("dense votes")
    assert method.loss.votes.tap.value is None  # nothing kept after the step


def test_small_cnn_and_dense_false_rank_from_the_final_logits():
    for arch, size, channels, settings in (("small_cnn", 8, 1, {}), ("preact_resnet18", 8, 3, {"dense": False})):
        model, method = method_on(arch, size, channels, **settings)
        x, labels = torch.randn(3, channels, size, size), torch.tensor([0, 1, 3])
        out = method.training_step(model, Batch(x, labels, torch.arange(3), 0, 0))
        pdf = zipf_reference(out.logits.detach().double().numpy(), labels.numpy())
        expected = 0.1 * kl_reference(out.logits.detach().double().numpy(), labels.numpy(), pdf)
        assert out.losses["zipf"].item() == pytest.approx(expected, rel=1e-5)
        assert method.run_facts() == {"zipfls_rank_from": "final logits"}


def test_a_model_without_global_avg_pool_must_name_its_layer():
    from torchvision.models import resnet18

    model = resnet18(num_classes=10)
    with pytest.raises(ConfigError, match=r"ResNet has no aikd GlobalAvgPool.*zipfls.dense_layer.*zipfls.dense: false"):
        ZipfLSLoss(model)
    loss = ZipfLSLoss(model, dense_layer="layer4", upsample="none")  # named: the head (fc) at every location
    model.eval()
    with loss.capture():
        logits = model(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(loss(logits, torch.tensor([1, 2])))
    with pytest.raises(ConfigError, match="no module 'layer9'"):
        ZipfLSLoss(model, dense_layer="layer9")


def test_a_timm_model_must_name_its_layer():
    pytest.importorskip("timm")
    model = build_model("timm/resnet10t", 10, 3, 32)
    with pytest.raises(ConfigError, match=r"timm/resnet10t has no aikd GlobalAvgPool.*zipfls.dense_layer"):
        METHODS.get("zipfls")(ZipfLSConfig(), MethodContext(num_classes=10, num_train=8, epochs=1, student=model))
    loss = ZipfLSLoss(model, dense_layer="net.layer4")
    assert loss.votes.head is model.net.get_classifier()


def test_drop_in_loss_in_a_plain_loop():
    torch.manual_seed(0)
    model = build_model("preact_resnet18", 10, 3, 8)
    zipf = ZipfLSLoss(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, labels = torch.randn(8, 3, 8, 8), torch.arange(8)
    for _ in range(2):
        with zipf.capture():
            logits = model(x)
        loss = zipf(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss) and zipf.votes.tap.value is None


def test_trains_one_epoch_in_aikds_loop(tmp_path):
    overrides = ["data.name=digits", "model.name=small_cnn", "data.batch_size=64", "data.train_limit=256",
                 "data.test_limit=128", "deterministic=true", "device=cpu", "train.epochs=1", "method=zipfls"]
    summary = Trainer(load_config(None, overrides), tmp_path, quiet=True).fit()
    assert summary["method"] == "zipfls"
    check_loss_records(tmp_path / "metrics.jsonl", {"ce", "zipf"}, epochs=1)


@pytest.mark.parametrize("targets", ["labels", "mixed"])
def test_a_dense_step_has_no_host_sync(targets):
    """The proxy configs (tests/test_host_syncs.py) run small_cnn, which ranks from logits: the dense path here."""
    from aikd.bench.syncs import SyncCounter

    model, method = method_on("preact_resnet18", 8, 3)
    labels = torch.tensor([1, 2, 3, 4])
    y = labels if targets == "labels" else 0.6 * F.one_hot(labels, 10) + 0.4 * F.one_hot(labels.flip(0), 10)
    batch = Batch(torch.randn(4, 3, 8, 8), y, torch.arange(4), 0, 0)
    with SyncCounter() as counter:
        out = method.training_step(model, batch)
        sum(out.losses.values()).backward()
    assert counter.total == 0, counter.facts(1)
