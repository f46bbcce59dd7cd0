"""USKD: the three terms against a numpy transcription of the official loss (yzd-v/cls_KD
mmcls/models/dis_losses/uskd.py), by hand, their gradients (what the weak head, the feature and the logits
receive; no gradient through p_t or the Zipf label), the feature layer per architecture and its errors, and
training in aikd's loop and in a plain loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aikd.config import load_config
from aikd.engine import Trainer
from aikd.errors import ConfigError
from aikd.methods import METHODS, Batch, MethodContext
from aikd.methods.uskd import USKDConfig, USKDLoss, default_feature_layer, uskd_terms, zipf_by_place
from aikd.models import build_model
from helpers import check_loss_records

pytestmark = pytest.mark.usefixtures("one_thread")

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(4, 6)) * 2
WEAK = RNG.normal(size=(4, 6))
LABELS = np.array([0, 2, 5, 1])


def t32(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float32)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def reference(logits, weak, gt, alpha=0.1, beta=0.1, mu=0.1, student_log=True):
    """uskd.py:31-95 line by line in numpy (its variable names), float64; returns (target, non_target, weak)."""
    n, c = logits.shape
    if gt.ndim > 1:
        label = np.argsort(-gt, axis=1, kind="stable")[:, :2]
        value = np.take_along_axis(gt, label, 1)
    else:
        label, value = gt.reshape(n, 1), np.ones((n, 1))
    s_i = softmax(logits)
    s_t = np.take_along_axis(s_i, label, 1)
    p_t = s_t ** 2
    p_t = p_t + value - p_t.mean(0, keepdims=True)
    p_t[value == 0] = 0
    s_i = np.log(softmax(logits))  # uskd.py:53: s_i is now the log-softmax, and stays so in the ranking
    s_t = np.take_along_axis(s_i, label, 1)
    loss_t = -(p_t * s_t).sum(1).mean()
    if gt.ndim > 1:
        target = gt * 0.9 + 0.1 / c
    else:
        target = np.zeros((n, c))
        target[np.arange(n), gt] = 0.9
        target += 0.1 / c
    w_i = np.log(softmax(weak))
    loss_weak = -(mu * target * w_i).sum(1).mean()
    w_i = softmax(weak)
    w_t = np.take_along_axis(w_i, label, 1)
    student, student_t = (s_i, s_t) if student_log else (np.exp(s_i), np.exp(s_t))
    rank = w_i / (1 - w_t.sum(1, keepdims=True) + 1e-6) + student / (1 - student_t.sum(1, keepdims=True) + 1e-6)
    order = np.argsort(-rank, axis=1, kind="stable")
    z_i = np.zeros((n, c))
    for i in range(n):
        for place, cls in enumerate(order[i]):
            z_i[i, cls] = 1.0 / (place + 1)
    loss_non = 0.0
    for i in range(n):
        kept = [k for k in range(c) if k not in label[i]]
        ns = logits[i, kept] - math.log(np.exp(logits[i, kept]).sum())
        nz = z_i[i, kept] / z_i[i, kept].sum()
        loss_non += -(nz * ns).sum() / n
    return alpha * loss_t, beta * loss_non, loss_weak


def check(terms, expected):
    for key, value in zip(("target", "non_target", "weak"), expected, strict=True):
        assert terms[key].item() == pytest.approx(value, rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("student_log", [True, False], ids=["log_softmax", "softmax"])
def test_terms_against_the_official_loss_for_labels(student_log):
    kind = "log_softmax" if student_log else "softmax"
    terms = uskd_terms(t32(LOGITS), t32(WEAK), torch.tensor(LABELS), 0.3, 0.7, 0.2, rank_student=kind)
    check(terms, reference(LOGITS, WEAK, LABELS, 0.3, 0.7, 0.2, student_log))


def test_the_ranking_score_matters():
    """Inputs where the student's log-probabilities and probabilities order the classes differently."""
    logits = np.array([[4.0, 0.0, -0.1, -3.0]])
    weak = np.array([[0.0, -1.0, 1.2, 1.6]])  # class 3 ranks 2nd by probabilities, last by logs
    labels = np.array([0])
    a = uskd_terms(t32(logits), t32(weak), torch.tensor(labels), rank_student="log_softmax")["non_target"]
    b = uskd_terms(t32(logits), t32(weak), torch.tensor(labels), rank_student="softmax")["non_target"]
    assert a.item() == pytest.approx(reference(logits, weak, labels)[1], rel=1e-5)
    assert b.item() == pytest.approx(reference(logits, weak, labels, student_log=False)[1], rel=1e-5)
    assert abs(a.item() - b.item()) > 1e-3


def test_terms_against_the_official_loss_for_mixed_labels():
    lam = np.array([0.7, 0.55, 1.0, 0.2])
    partner = np.array([3, 4, 5, 2])  # sample 2 mixes with its own class: one label, the second weight 0
    gt = np.zeros((4, 6))
    for i in range(4):
        gt[i, LABELS[i]] += lam[i]
        gt[i, partner[i]] += 1 - lam[i]
    check(uskd_terms(t32(LOGITS), t32(WEAK), t32(gt)), reference(LOGITS, WEAK, gt))


def test_by_hand():
    # One sample, three classes, label 0. Target part: p_t = s_t^2 + 1 - mean(s_t^2) = 1 (a batch of one),
    # L_t = -ln s_t. Non-target part: the two non-targets' Zipf weights 1/2 and 1/3 -> (3/5, 2/5); their logits
    # are equal, so log softmax is ln(1/2) for each and L_n = ln 2 whatever the order.
    logits = torch.tensor([[math.log(3.0), 0.0, 0.0]])
    weak = torch.tensor([[0.0, 2.0, 0.0]])  # class 1 ranks above class 2
    terms = uskd_terms(logits, weak, torch.tensor([0]), alpha=1.0, beta=1.0, mu=0.5)
    p = torch.softmax(logits, 1)[0]
    s_t = p[0].item()
    assert terms["target"].item() == pytest.approx(-math.log(s_t), rel=1e-5)
    # Non-target logits (0, 0): log softmax ln(1/2) each; label (3/5, 2/5): L_n = ln 2.
    assert terms["non_target"].item() == pytest.approx(math.log(2.0), rel=1e-5)
    w = torch.softmax(weak, 1)[0]
    smooth = [0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3]
    assert terms["weak"].item() == pytest.approx(-0.5 * sum(s * math.log(w[k]) for k, s in enumerate(smooth)),
                                                 rel=1e-5)
    torch.testing.assert_close(zipf_by_place(torch.tensor([[0.1, 0.9, 0.5]]), 2.0), torch.tensor([[1 / 9, 1.0, 0.25]]))


def test_gradients_and_detach_points():
    logits = t32(LOGITS).requires_grad_(True)
    weak = t32(WEAK).requires_grad_(True)
    labels = torch.tensor(LABELS)
    alpha, beta, mu = 0.3, 0.7, 0.2
    terms = uskd_terms(logits, weak, labels, alpha, beta, mu)
    n, c = LOGITS.shape
    # The weak term alone reaches the weak logits: mu (softmax(w) - smoothed label) / N.
    (g_weak,) = torch.autograd.grad(terms["weak"], weak, retain_graph=True)
    smooth = 0.9 * np.eye(c)[LABELS] + 0.1 / c
    np.testing.assert_allclose(g_weak.numpy(), mu * (softmax(WEAK) - smooth) / n, rtol=1e-5, atol=1e-7)
    for key in ("target", "non_target"):
        assert torch.autograd.grad(terms[key], weak, retain_graph=True, allow_unused=True)[0] is None
    # The target part with p_t held constant: -alpha p_t (onehot - s) / N.
    s = softmax(LOGITS)
    s_t2 = s[np.arange(n), LABELS] ** 2
    p_t = s_t2 + 1 - s_t2.mean()
    expected_t = -alpha * p_t[:, None] * (np.eye(c)[LABELS] - s) / n
    (g_t,) = torch.autograd.grad(terms["target"], logits, retain_graph=True)
    np.testing.assert_allclose(g_t.numpy(), expected_t, rtol=1e-5, atol=1e-7)
    # The non-target part with the Zipf label held constant: beta (Q - Z) / N off the target, 0 on it.
    (g_n,) = torch.autograd.grad(terms["non_target"], logits)
    assert torch.all(g_n[torch.arange(n), labels] == 0)
    for i in range(n):
        kept = [k for k in range(c) if k != LABELS[i]]
        q = np.exp(LOGITS[i, kept]) / np.exp(LOGITS[i, kept]).sum()
        z = g_n[i, kept].numpy() * n / beta - q  # = -Z: a probability vector
        assert z.sum() == pytest.approx(-1.0, rel=1e-5) and np.all(z < 0)


def method_on(arch: str, size: int, channels: int, **settings):
    torch.manual_seed(0)
    model = build_model(arch, 10, channels, size)
    method = METHODS.get("uskd")(USKDConfig(**settings),
                                 MethodContext(num_classes=10, num_train=8, epochs=1, student=model))
    return model, method


@pytest.mark.parametrize("arch,layer,width", [("preact_resnet18", "features.layers.5", 256),
                                              ("small_cnn", "features.7", 64),
                                              ("resnet18", "features.layer3", 256)])
def test_the_default_feature_layer_per_architecture(arch, layer, width):
    model, method = method_on(arch, 8, 1 if arch == "small_cnn" else 3)
    assert default_feature_layer(model) == layer
    assert method.run_facts() == {"uskd_feature_layer": layer, "uskd_channels": width}


def test_densenet_default_layer():
    assert default_feature_layer(build_model("densenet121", 10, 3, 32)) == "features.body.denseblock3"


def test_the_step_reads_the_feature_through_the_weak_head_which_trains_with_the_student():
    model, method = method_on("preact_resnet18", 8, 3)
    model.eval()
    x, labels = torch.randn(3, 3, 8, 8), torch.tensor([1, 2, 3])
    out = method.training_step(model, Batch(x, labels, torch.arange(3), 0, 0))
    assert set(out.losses) == METHODS.get("uskd").loss_terms(method.hparams)
    feature = model.features.layers[:6](model.features.stem(x)).mean((2, 3))
    expected = uskd_terms(out.logits, method.loss.fc(feature), labels)
    for key, value in expected.items():
        assert out.losses[key].item() == pytest.approx(value.item(), rel=1e-5)
    assert out.losses["ce"].item() == pytest.approx(F.cross_entropy(out.logits, labels).item(), rel=1e-6)
    # The weak head's gradient reaches the backbone below the tapped stage, not the stage after it.
    out.losses["weak"].backward()
    assert model.features.layers[5].conv2.weight.grad.abs().sum() > 0
    assert model.features.layers[6].conv1.weight.grad is None
    assert method.loss.fc.weight.grad.abs().sum() > 0
    assert {id(p) for p in method.student_parameters()} == {id(p) for p in method.loss.fc.parameters()}
    assert set(method.state_dict()) == {"loss.fc.weight", "loss.fc.bias"}  # no student weights
    assert method.loss.tap.value is None


def test_an_unknown_feature_layer_names_the_value_and_the_modules():
    with pytest.raises(ConfigError, match=r"'uskd.feature_layer'.*no module 'features.stage3'.*features.layers.5"):
        method_on("preact_resnet18", 8, 3, feature_layer="features.stage3")


def test_a_model_with_no_default_layer_asks_for_one():
    from torchvision.models import resnet18

    with pytest.raises(ConfigError, match=r"feature_layer=auto has no default for ResNet.*layer3"):
        USKDLoss(resnet18(num_classes=10), 10)
    assert USKDLoss(resnet18(num_classes=10), 10, feature_layer="layer3").fc.in_features == 256


def test_drop_in_loss_in_a_plain_loop():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1, 8)
    uskd = USKDLoss(model, num_classes=10)
    optimizer = torch.optim.SGD([*model.parameters(), *uskd.parameters()], lr=0.05)
    x, labels = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    before = uskd.fc.weight.detach().clone()
    for _ in range(2):
        with uskd.capture():
            logits = model(x)
        loss = F.cross_entropy(logits, labels) + uskd(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, uskd.fc.weight)


def test_trains_one_epoch_in_aikds_loop(tmp_path):
    overrides = ["data.name=digits", "model.name=small_cnn", "data.batch_size=64", "data.train_limit=256",
                 "data.test_limit=128", "deterministic=true", "device=cpu", "train.epochs=1", "method=uskd"]
    summary = Trainer(load_config(None, overrides), tmp_path, quiet=True).fit()
    assert summary["method"] == "uskd"
    check_loss_records(tmp_path / "metrics.jsonl", {"ce", "target", "non_target", "weak"}, epochs=1)


def test_a_step_with_mixed_labels_has_no_host_sync():
    """tests/test_host_syncs.py mixes batches for a few methods only; USKD's mixed path (top-2 labels) here."""
    from aikd.bench.syncs import SyncCounter

    model, method = method_on("small_cnn", 8, 1)
    labels = torch.tensor([1, 2, 3, 4])
    mixed = 0.6 * F.one_hot(labels, 10) + 0.4 * F.one_hot(labels.flip(0), 10)
    with SyncCounter() as counter:
        out = method.training_step(model, Batch(torch.randn(4, 1, 8, 8), mixed, torch.arange(4), 0, 0))
        sum(out.losses.values()).backward()
    assert counter.total == 0, counter.facts(1)
