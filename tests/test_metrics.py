"""Metrics against values worked out by hand on small fixed tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from aikd.metrics import classification_metrics, predict, topk_error
from aikd.metrics.classification import ECE_BINS, expected_calibration_error

# ---------------------------------------------------------------- top-k error

# 4 samples, 7 classes. Every row ranks the classes by its logits; the label's
# rank (1 = highest logit) decides whether top-1 / top-5 hit.
RANKED_LOGITS = torch.tensor([
    [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # label 0 -> rank 1 (top-1 hit, top-5 hit)
    [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # label 2 -> rank 3 (top-1 miss, top-5 hit)
    [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # label 2 -> rank 5 (top-1 miss, top-5 hit)
    [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # label 1 -> rank 6 (top-1 miss, top-5 miss)
])
RANKED_LABELS = torch.tensor([0, 2, 2, 1])


def test_top1_error_by_hand():
    # top-1 hits: only sample 0 -> 1 of 4 -> error 3/4 = 75 %
    assert topk_error(RANKED_LOGITS, RANKED_LABELS, 1) == pytest.approx(75.0)


def test_top5_error_by_hand():
    # top-5 hits: samples 0, 1, 2 (ranks 1, 3, 5); sample 3 has rank 6 -> error 1/4 = 25 %
    assert topk_error(RANKED_LOGITS, RANKED_LABELS, 5) == pytest.approx(25.0)


def test_top3_error_by_hand():
    # top-3 hits: samples 0, 1 (ranks 1, 3) -> error 2/4 = 50 %
    assert topk_error(RANKED_LOGITS, RANKED_LABELS, 3) == pytest.approx(50.0)


def test_classification_metrics_topk_fields():
    m = classification_metrics(RANKED_LOGITS, RANKED_LABELS)
    assert m["top1_err"] == pytest.approx(75.0)
    assert m["top5_err"] == pytest.approx(25.0)
    assert m["num_samples"] == 4


def test_top5_with_fewer_than_five_classes_is_clamped():
    # 3 classes: the top "5" are all 3 classes, so every label is hit -> error 0.
    # top-1: argmax of rows = 0, 1, 2, 0 vs labels 0, 2, 2, 1 -> hits at 0 and 2 -> error 50 %.
    logits = torch.tensor([
        [3.0, 2.0, 1.0],
        [1.0, 3.0, 2.0],
        [1.0, 2.0, 3.0],
        [3.0, 1.0, 2.0],
    ])
    labels = torch.tensor([0, 2, 2, 1])
    assert topk_error(logits, labels, 5) == 0.0
    m = classification_metrics(logits, labels)
    assert m["top5_err"] == 0.0
    assert m["top1_err"] == pytest.approx(50.0)


def test_all_wrong_top1_is_100_percent():
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1])
    assert topk_error(logits, labels, 1) == pytest.approx(100.0)


# ---------------------------------------------------------------- macro F1

def _logits_for(preds: list[int], num_classes: int) -> torch.Tensor:
    """Logits whose argmax is ``preds``."""
    logits = torch.zeros(len(preds), num_classes)
    logits[torch.arange(len(preds)), torch.tensor(preds)] = 2.0
    return logits


def test_macro_f1_by_hand():
    labels = [0, 0, 0, 0, 1, 1, 2, 2]
    preds = [0, 0, 0, 1, 1, 2, 2, 2]
    # class 0: predicted at 0,1,2 (all label 0) -> TP 3, FP 0; label 0 at idx 3 predicted 1 -> FN 1
    #          P = 3/3 = 1, R = 3/4, F1 = 2*1*(3/4) / (1 + 3/4) = 6/7
    # class 1: predicted at 3 (label 0) and 4 (label 1) -> TP 1, FP 1; label 1 at 5 predicted 2 -> FN 1
    #          P = 1/2, R = 1/2, F1 = 1/2
    # class 2: predicted at 5 (label 1), 6, 7 (label 2) -> TP 2, FP 1, FN 0
    #          P = 2/3, R = 1, F1 = 2*(2/3)*1 / (2/3 + 1) = 4/5
    # macro F1 = (6/7 + 1/2 + 4/5) / 3 = (60 + 35 + 56) / 210 / 3 = 151/210 ≈ 0.719048
    # (accuracy would be 6/8 = 0.75 and support-weighted F1 ≈ 0.7536, so both are excluded)
    expected = (6 / 7 + 1 / 2 + 4 / 5) / 3
    m = classification_metrics(_logits_for(preds, 3), torch.tensor(labels))
    assert m["macro_f1"] == pytest.approx(expected, abs=1e-6)
    assert m["macro_f1"] == pytest.approx(151 / 210, abs=1e-6)
    # top-1 error from the same predictions: 2 wrong of 8 = 25 %
    assert m["top1_err"] == pytest.approx(25.0)


def test_macro_f1_perfect_and_range():
    labels = torch.tensor([0, 1, 2, 1])
    m = classification_metrics(_logits_for([0, 1, 2, 1], 3), labels)
    assert m["macro_f1"] == pytest.approx(1.0)
    m = classification_metrics(_logits_for([1, 2, 0, 0], 3), labels)
    assert m["macro_f1"] == pytest.approx(0.0)


# ---------------------------------------------------------------- ECE

# 5 samples, 3 classes; the confidence is the max probability.
ECE_PROBS = torch.tensor([
    [0.95, 0.03, 0.02],  # A: conf 0.95, pred 0, label 0 -> correct
    [0.95, 0.03, 0.02],  # B: conf 0.95, pred 0, label 1 -> wrong
    [0.68, 0.20, 0.12],  # C: conf 0.68, pred 0, label 0 -> correct
    [0.10, 0.72, 0.18],  # D: conf 0.72, pred 1, label 2 -> wrong
    [0.30, 0.20, 0.50],  # E: conf 0.50, pred 2, label 2 -> correct
])
ECE_LABELS = torch.tensor([0, 1, 0, 2, 2])
# 15 equal-width bins of width 1/15 ≈ 0.0667:
#   A, B: 0.95 * 15 = 14.25 -> bin 14 [0.933, 1]:   acc 1/2, conf 0.95, |0.5 - 0.95| = 0.45, weight 2/5 -> 0.18
#   C, D: 0.68 * 15 = 10.2, 0.72 * 15 = 10.8 -> bin 10 [0.667, 0.733]:
#         acc 1/2, conf (0.68 + 0.72)/2 = 0.70, |0.5 - 0.70| = 0.20, weight 2/5 -> 0.08
#   E:    0.50 * 15 = 7.5 -> bin 7 [0.467, 0.533]:  acc 1, conf 0.5, gap 0.5, weight 1/5 -> 0.10
#   ECE = 0.18 + 0.08 + 0.10 = 0.36 -> 36 %
# (with 10 bins C and D would fall in different bins: 0.18 + 0.32/5 + 0.72/5 + 0.10 = 0.488)
ECE_EXPECTED = 36.0


def test_ece_uses_15_bins():
    assert ECE_BINS == 15


def test_ece_by_hand_from_probabilities():
    assert expected_calibration_error(ECE_PROBS, ECE_LABELS) == pytest.approx(ECE_EXPECTED, abs=1e-4)


def test_ece_by_hand_through_classification_metrics():
    # softmax(log p) = p when the rows of p sum to 1
    logits = ECE_PROBS.log()
    m = classification_metrics(logits, ECE_LABELS)
    assert m["ece"] == pytest.approx(ECE_EXPECTED, abs=1e-4)
    # and the other metrics of the same tensors: preds 0, 0, 0, 1, 2 vs labels 0, 1, 0, 2, 2
    # -> wrong at B and D -> top-1 error 2/5 = 40 %; 3 classes -> top-5 error 0
    assert m["top1_err"] == pytest.approx(40.0)
    assert m["top5_err"] == 0.0


def test_ece_of_a_perfectly_calibrated_set_is_zero():
    # 4 samples at confidence 0.75 of which 3 are right (bin 11: acc 0.75 = conf 0.75) and
    # 4 samples at confidence 0.5 of which 2 are right (bin 7: acc 0.5 = conf 0.5) -> ECE 0
    p75 = [0.75, 0.15, 0.10]
    p50 = [0.50, 0.30, 0.20]
    probs = torch.tensor([p75] * 4 + [p50] * 4)
    labels = torch.tensor([0, 0, 0, 1, 0, 0, 1, 2])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-4)
    assert classification_metrics(probs.log(), labels)["ece"] == pytest.approx(0.0, abs=1e-4)


def test_ece_of_confident_wrong_predictions():
    # every sample confidence 0.9 (bin 13) and wrong -> ECE = |0 - 0.9| = 90 %
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    labels = torch.tensor([1, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(90.0, abs=1e-4)


# ---------------------------------------------------------------- NLL

def test_nll_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 3.0, -1.0]])
    labels = torch.tensor([0, 2, 0])
    # -log softmax(z)[y] = log(sum_j e^{z_j}) - z_y
    nll0 = math.log(math.e ** 2 + math.e + 1.0) - 2.0  # ≈ 0.40761
    nll1 = math.log(3.0)  # uniform over 3 classes ≈ 1.09861
    nll2 = math.log(math.e + math.e ** 3 + math.e ** -1) - 1.0  # ≈ 2.14293
    expected = (nll0 + nll1 + nll2) / 3
    m = classification_metrics(logits, labels)
    assert m["nll"] == pytest.approx(expected, rel=1e-5)
    assert m["nll"] == pytest.approx(1.216383, abs=1e-5)


def test_metrics_accept_half_precision_logits():
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0]], dtype=torch.float16)
    labels = torch.tensor([0, 1])
    m = classification_metrics(logits, labels)
    assert m["nll"] == pytest.approx(math.log(2.0), rel=1e-5)
    assert all(isinstance(m[k], float) for k in ("top1_err", "top5_err", "macro_f1", "ece", "nll"))


# ---------------------------------------------------------------- predict

def _tiny_linear() -> nn.Linear:
    model = nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        model.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    return model


BATCHES = [
    (torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([2, 0]), torch.tensor([0, 1])),
    (torch.tensor([[-1.0, 3.0]]), torch.tensor([1]), torch.tensor([2])),
]
# y = W x + b with W = [[1, 0], [0, 1], [1, 1]], b = [0, 0, 1]:
#   [1, 2]  -> [1, 2, 1 + 2 + 1] = [1, 2, 4]
#   [0, 0]  -> [0, 0, 1]
#   [-1, 3] -> [-1, 3, -1 + 3 + 1] = [-1, 3, 3]
PREDICT_EXPECTED = torch.tensor([[1.0, 2.0, 4.0], [0.0, 0.0, 1.0], [-1.0, 3.0, 3.0]])


class _Counter:
    def __init__(self):
        self.n = 0

    def update(self, k):
        self.n += k


def test_predict_returns_logits_in_order_and_restores_train_mode():
    model = _tiny_linear()
    model.train()
    modes = []
    model.register_forward_hook(lambda mod, inp, out: modes.append(mod.training))
    counter = _Counter()
    logits, labels = predict(model, BATCHES, lambda x: x, torch.device("cpu"), progress=counter)
    assert torch.allclose(logits, PREDICT_EXPECTED)
    assert labels.tolist() == [2, 0, 1]
    assert logits.dtype == torch.float32
    assert modes == [False, False]  # evaluated in eval mode, one call per batch
    assert model.training is True  # restored
    assert counter.n == 2
    assert not logits.requires_grad


def test_predict_applies_prepare_and_keeps_eval_mode():
    model = _tiny_linear().eval()
    # prepare doubles the inputs: [2, 4] -> [2, 4, 7]; [0, 0] -> [0, 0, 1]; [-2, 6] -> [-2, 6, 5]
    logits, labels = predict(model, BATCHES, lambda x: 2 * x, torch.device("cpu"))
    assert torch.allclose(logits, torch.tensor([[2.0, 4.0, 7.0], [0.0, 0.0, 1.0], [-2.0, 6.0, 5.0]]))
    assert labels.tolist() == [2, 0, 1]
    assert model.training is False


def test_predict_restores_train_mode_after_an_error():
    model = _tiny_linear().train()

    def broken_loader():
        yield BATCHES[0]
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        predict(model, broken_loader(), lambda x: x, torch.device("cpu"))
    assert model.training is True
