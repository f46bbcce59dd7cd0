"""Temperature scaling and reliability statistics (Guo et al., 2017; paper Table 3, Figures 4-5).

Temperature scaling divides every logit by one scalar T fitted to minimise the
negative log-likelihood on data the model did not train on. It changes
confidences but never the predicted class, so errors and F1 stay as they are
and only ECE and NLL move.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from torch import Tensor

from aikd.metrics.classification import ECE_BINS

# The search interval of log T: T in [1/50, 50] covers any model worth calibrating.
LOG_T_BOUNDS = (-math.log(50.0), math.log(50.0))


def fit_temperature(logits: Tensor, labels: Tensor) -> float:
    """The T > 0 minimising NLL(softmax(logits / T), labels).

    NLL is convex in 1/T, so a bounded scalar search over log T finds the
    optimum to high precision without tuning a learning rate (the usual LBFGS
    loop can stall or overshoot on nearly separable logits).
    """
    if len(labels) == 0:
        raise ValueError("temperature scaling needs at least one held-out sample")
    logits, labels = logits.double(), labels.long()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), labels))

    result = minimize_scalar(nll, bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-6})
    return float(math.exp(result.x))


@dataclass
class ReliabilityBins:
    """Per-bin sample counts, summed confidences and correct predictions (top-1).

    Sums instead of means so that bins of several runs (seeds) add up exactly.
    """

    counts: list[int]
    confidence_sums: list[float]
    correct: list[int]

    @property
    def n_bins(self) -> int:
        return len(self.counts)

    def mean_confidence(self) -> list[float | None]:
        return [s / c if c else None for s, c in zip(self.confidence_sums, self.counts, strict=True)]

    def accuracy(self) -> list[float | None]:
        return [k / c if c else None for k, c in zip(self.correct, self.counts, strict=True)]

    def ece(self) -> float:
        """ECE in percent from the bins (equals the torchmetrics value on the same data)."""
        total = sum(self.counts)
        gap = sum(abs(k - s) for k, s in zip(self.correct, self.confidence_sums, strict=True))
        return 100.0 * gap / total if total else 0.0

    def __add__(self, other: ReliabilityBins) -> ReliabilityBins:
        if other.n_bins != self.n_bins:
            raise ValueError(f"cannot add reliability bins of {self.n_bins} and {other.n_bins} bins")
        return ReliabilityBins([a + b for a, b in zip(self.counts, other.counts, strict=True)],
                               [a + b for a, b in zip(self.confidence_sums, other.confidence_sums, strict=True)],
                               [a + b for a, b in zip(self.correct, other.correct, strict=True)])

    def to_dict(self) -> dict[str, list]:
        return {"counts": self.counts, "confidence_sums": self.confidence_sums, "correct": self.correct}

    @classmethod
    def from_dict(cls, data: dict[str, list]) -> ReliabilityBins:
        return cls(list(data["counts"]), list(data["confidence_sums"]), list(data["correct"]))


def reliability_bins(logits: Tensor, labels: Tensor, n_bins: int = ECE_BINS) -> ReliabilityBins:
    """Top-1 confidence histogram in ``n_bins`` equal-width bins over (0, 1] (right-closed, as torchmetrics)."""
    probs = logits.double().softmax(dim=1)
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).long()
    # Bin b holds confidences in (b/n, (b+1)/n]; bucketize with right=False gives exactly that.
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    which = (torch.bucketize(confidence, edges, right=False) - 1).clamp(0, n_bins - 1)
    counts = torch.bincount(which, minlength=n_bins)
    conf_sums = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, which, confidence)
    correct_sums = torch.bincount(which, weights=correct.double(), minlength=n_bins)
    return ReliabilityBins(counts.tolist(), conf_sums.tolist(), [round(v) for v in correct_sums.tolist()])


def calibrate(holdout_logits: Tensor, holdout_labels: Tensor, test_logits: Tensor,
              test_labels: Tensor) -> tuple[dict[str, float], dict[str, ReliabilityBins]]:
    """Fit T on the held-out set; return the test metrics it changes and the reliability bins.

    The metrics are ``temperature``, ``ece_ts`` (percent) and ``nll_ts``; the bins
    are the test set's before (``raw``) and after (``ts``) scaling.
    """
    temperature = fit_temperature(holdout_logits, holdout_labels)
    scaled = test_logits.double() / temperature
    raw_bins, ts_bins = reliability_bins(test_logits, test_labels), reliability_bins(scaled, test_labels)
    metrics = {"temperature": temperature, "ece_ts": ts_bins.ece(),
               "nll_ts": float(F.cross_entropy(scaled, test_labels.long()))}
    return metrics, {"raw": raw_bins, "ts": ts_bins}
