"""Evaluation metrics as the paper reports them.

Top-1 / Top-5 error and ECE are percentages (Tables 2-3); macro F1 is in
0..1; NLL is the mean negative log-likelihood in nats. F1 and ECE come from
torchmetrics; ECE uses 15 equal-width confidence bins, the top-1 convention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ECE_BINS = 15


def topk_error(logits: Tensor, labels: Tensor, k: int) -> float:
    """Percentage of samples whose label is not among the k highest logits."""
    k = min(k, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    hit = (topk == labels.unsqueeze(1)).any(dim=1)
    return 100.0 * (1.0 - hit.float().mean().item())


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = ECE_BINS) -> float:
    """ECE in percent: sum over bins of |accuracy - confidence| weighted by the bin's share."""
    from torchmetrics.functional.classification import multiclass_calibration_error  # 2 s to import: lazily

    return 100.0 * float(multiclass_calibration_error(
        probs, labels, num_classes=probs.shape[1], n_bins=n_bins, norm="l1"))


def classification_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """All summary metrics for a set of logits (N, C) and integer labels (N,)."""
    from torchmetrics.functional.classification import multiclass_f1_score

    logits = logits.float()
    num_classes = logits.shape[1]
    probs = logits.softmax(dim=1)
    return {
        "top1_err": topk_error(logits, labels, 1),
        "top5_err": topk_error(logits, labels, 5),
        "macro_f1": float(multiclass_f1_score(
            logits.argmax(dim=1), labels, num_classes=num_classes, average="macro")),
        "ece": expected_calibration_error(probs, labels),
        "nll": float(F.cross_entropy(logits, labels)),
        "num_samples": len(labels),
    }


@torch.inference_mode()
def predict(model: torch.nn.Module, loader, prepare, device: torch.device, progress=None) -> tuple[Tensor, Tensor]:
    """Run ``model`` over a loader and return its float32 logits and the labels, in the loader's order.

    ``prepare(images)`` finishes a batch on the device (normalization). The forward runs in float32 with
    autocast off, even inside a caller's autocast (training's bf16 or fp16): ECE, NLL and temperature
    scaling are functions of the logits' exact values and are reported to 0.01, while a bf16 logit near
    |z| = 10 moves in steps of 0.0625. Keeping only the classifier head in float32 would not be enough:
    its input, the features, would carry the same 2^-8 relative rounding from every layer below. A forward
    without a backward is about a third of a training step, over the test set once per evaluation, so
    float32 costs little. (TF32 convolutions, PyTorch's default on Ampere and newer, still round their
    inputs to 10 mantissa bits but return float32 sums: no bf16 steps in the logits.)
    """
    was_training = model.training
    model.eval()
    all_logits, all_labels = [], []
    try:
        for images, labels, _ in loader:
            images = prepare(images.to(device, non_blocking=True))
            with torch.autocast(device.type, enabled=False):
                logits = model(images)
            all_logits.append(logits.float())  # kept on the device: one copy to the host at the end, not
            all_labels.append(labels)  # one per batch, each of which would wait for the device
            if progress is not None:
                progress.update(1)
    finally:
        model.train(was_training)
    return torch.cat(all_logits).cpu(), torch.cat([labels.to(device) for labels in all_labels]).cpu()
