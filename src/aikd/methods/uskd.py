"""USKD (Yang et al., ICCV 2023, "From knowledge distillation to self-knowledge distillation"; official code
yzd-v/cls_KD, mmcls/models/dis_losses/uskd.py): normalised KD with customised soft labels.

The student's logits z (softmax s) are distilled toward soft labels made from the student itself; a weak
logit w = fc(GAP(f)) comes from a linear head on an intermediate feature f (stage 3 of ResNet-18). With y the
label (a mixed label: its two largest classes, with their weights v), N the batch:

    target part      p_t = s_t^2 + v - mean_batch(s_t^2)   (0 where v = 0; no gradient)
                     L_t = -sum_t p_t log s_t
    weak supervision L_w = mu * CE(w, 0.9 y + 0.1 / C)                      (trains fc and the backbone)
    ranking          g_c = softmax(w)_c / (1 - sum_t softmax(w)_t + 1e-6) + a_c / (1 - sum_t a_t + 1e-6)
                     with a = log softmax(z) (the official code's; ``rank_student: softmax`` takes s)
    non-target part  Z_c = place_c^-power, place_c the 1-based place of class c when g is sorted descending,
                     kept on the non-target classes and normalised (no gradient)
                     L_n = -sum_{c not a label} Z_c log softmax_{non-targets}(z)_c
    L = CE(z, y) + alpha * mean L_t + beta * mean L_n + mean L_w

Defaults: the official CIFAR-100 self-KD config (alpha = beta = mu = 0.1, stage 3's feature; the CE weight
is 1); docs/methods/uskd.md gives every source line. The weak head is the method's own module, trained
with the student (``student_parameters``), not part of the model: inference never sees it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aikd.errors import ConfigError
from aikd.methods.base import Batch, Method, MethodContext, StepOutput, non_negative, positive, register_method
from aikd.methods.functional import one_hot
from aikd.methods.zipfls import non_target_log_softmax
from aikd.models.preact_resnet import PreActResNetFeatures
from aikd.models.taps import (
    Tap,
    describe_names,
    find_module,
    is_flattening_classifier,
    model_label,
    output_channels,
    pooled,
)

RankStudent = Literal["log_softmax", "softmax"]
WEAK_SMOOTHING = 0.1  # the weak head's label smoothing (uskd.py:59-61)
RANK_EPS = 1e-6  # uskd.py:73


# ---------------------------------------------------------------------- the loss, as plain functions


def label_columns(targets: Tensor) -> tuple[Tensor, Tensor]:
    """(labels, weights) of each sample: (N, 1) and ones for class indices; the two largest classes of a mixed
    (N, C) label and their weights (uskd.py:33-39). A sample mixed with its own class has one class; its second
    column is then the first class of weight 0 (a stable sort: the official unstable one picks any)."""
    if targets.ndim == 2:
        values, labels = targets.float().sort(dim=1, descending=True, stable=True)
        return labels[:, :2], values[:, :2]
    return targets.unsqueeze(1), torch.ones(targets.shape[0], 1, device=targets.device)


def take_columns(values: Tensor, labels: Tensor) -> Tensor:
    """``values.gather(1, labels)`` as a masked sum: (N, C), (N, K) -> (N, K). A gather's backward scatters with
    atomics on CUDA; a product and a sum are deterministic everywhere."""
    picks = labels.unsqueeze(2) == torch.arange(values.shape[1], device=values.device)
    return (values.unsqueeze(1) * picks).sum(dim=2)


def zipf_by_place(scores: Tensor, power: float = 1.0) -> Tensor:
    """place^-power of every class, its place (1-based, ties in sort order) in the row sorted descending."""
    order = scores.argsort(dim=1, descending=True)
    place = order.argsort(dim=1)
    return (place + 1).to(torch.float32).pow(-power)


def uskd_terms(logits: Tensor, weak_logits: Tensor, targets: Tensor, alpha: float = 0.1, beta: float = 0.1,
               mu: float = 0.1, power: float = 1.0, rank_student: RankStudent = "log_softmax"
               ) -> dict[str, Tensor]:
    """{"target": alpha mean L_t, "non_target": beta mean L_n, "weak": mean L_w} (the CE term is the caller's)."""
    logits, weak_logits = logits.float(), weak_logits.float()
    c = logits.shape[1]
    labels, values = label_columns(targets)
    log_s = F.log_softmax(logits, dim=1)
    log_s_t = take_columns(log_s, labels)
    with torch.no_grad():
        s_t2 = log_s_t.exp() ** 2
        p_t = (s_t2 + values - s_t2.mean(dim=0, keepdim=True)).where(values != 0, torch.zeros_like(s_t2))
    loss_t = -(p_t * log_s_t).sum(dim=1).mean()

    y = targets.float() if targets.ndim == 2 else one_hot(targets, c)
    smooth = (1 - WEAK_SMOOTHING) * y + WEAK_SMOOTHING / c
    log_w = F.log_softmax(weak_logits, dim=1)
    loss_weak = -(mu * smooth * log_w).sum(dim=1).mean()

    with torch.no_grad():
        w = log_w.exp()
        student = log_s if rank_student == "log_softmax" else log_s.exp()
        score = (w / (1 - take_columns(w, labels).sum(1, keepdim=True) + RANK_EPS)
                 + student / (1 - take_columns(student, labels).sum(1, keepdim=True) + RANK_EPS))
        target_mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, labels, True)
        z = zipf_by_place(score, power).masked_fill(target_mask, 0.0)
        z = z / z.sum(dim=1, keepdim=True)
    loss_n = -(z * non_target_log_softmax(logits, target_mask)).sum(dim=1).mean()
    return {"target": alpha * loss_t, "non_target": beta * loss_n, "weak": loss_weak}


# ---------------------------------------------------------------------- the feature and the weak head


def default_feature_layer(model: nn.Module) -> str:
    """The module whose output USKD's weak head reads, by architecture: the stage before the last one.

    preact_resnet18: the last block of stage 3 (``features.layers.5``, 256 channels, as the official
    ResNet-18's stage 3); resnet18 (torchvision): ``features.layer3``; densenet121: ``features.body.denseblock3``;
    small_cnn (two conv blocks, then flatten + FC): the second block's output, ``features.7`` (64 channels).
    """
    features = getattr(model, "features", None)
    if isinstance(features, PreActResNetFeatures):
        widths = [block.conv2.out_channels for block in features.layers]
        stages = list(dict.fromkeys(widths))
        if len(stages) >= 2:
            last = max(i for i, width in enumerate(widths) if width == stages[-2])
            return f"features.layers.{last}"
    if features is not None and hasattr(features, "layer3") and hasattr(features, "layer4"):
        return "features.layer3"
    if features is not None and hasattr(getattr(features, "body", None), "denseblock3"):
        return "features.body.denseblock3"
    if is_flattening_classifier(model):
        flatten = next(i for i, m in enumerate(model.features) if isinstance(m, nn.Flatten))
        if flatten > 0:
            return f"features.{flatten - 1}"
    raise ConfigError(f"uskd.feature_layer=auto has no default for {model_label(model)}: set uskd.feature_layer to "
                      f"the module whose output the weak head should read (the stage before the last one, for a "
                      f"CNN). Its modules: {describe_names(model)}.")


class USKDLoss(nn.Module):
    """USKD's three terms for a training loop of your own: the weak head and the hook on the feature layer.

    Built on the bare model; its weak head is trained with the model, so give the optimizer both:

        uskd = USKDLoss(model, num_classes=100)               # feature_layer="auto": stage 3 of ResNet-18
        optimizer = torch.optim.SGD([*model.parameters(), *uskd.parameters()], lr=0.1, momentum=0.9)
        for images, labels in loader:
            with uskd.capture():
                logits = model(images)
            loss = F.cross_entropy(logits, labels) + uskd(logits, labels)
            optimizer.zero_grad(); loss.backward(); optimizer.step()

    ``channels`` (the feature's width) is found by a probing forward pass when not given.
    """

    def __init__(self, model: nn.Module, num_classes: int, feature_layer: str = "auto", alpha: float = 0.1,
                 beta: float = 0.1, mu: float = 0.1, power: float = 1.0, rank_student: RankStudent = "log_softmax",
                 channels: int | None = None) -> None:
        super().__init__()
        USKDConfig(alpha, beta, mu, power, rank_student, feature_layer, channels)  # checks the ranges
        self.alpha, self.beta, self.mu, self.power, self.rank_student = alpha, beta, mu, power, rank_student
        self.feature_layer = default_feature_layer(model) if feature_layer == "auto" else feature_layer
        module = find_module(model, self.feature_layer, "uskd.feature_layer")
        width = channels if channels is not None else output_channels(model, module)
        self.fc = nn.Linear(width, num_classes)  # the weak head (uskd.py:28)
        self.tap = Tap(module)  # a plain object: the model stays out of this module's state_dict

    def capture(self) -> contextlib.AbstractContextManager[Any]:
        """Catch the feature of the forward passes inside the block."""
        return self.tap.capture()

    def terms(self, logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
        weak_logits = self.fc(pooled(self.tap.take()))
        return uskd_terms(logits, weak_logits, targets, self.alpha, self.beta, self.mu, self.power,
                          self.rank_student)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return sum(self.terms(logits, targets).values())


# ---------------------------------------------------------------------- the method


@dataclass
class USKDConfig:
    alpha: float = 0.1  # weight of the target part (configs/distillers/cifar100/res18_sd_cifar.py:25)
    beta: float = 0.1  # weight of the non-target part (res18_sd_cifar.py:26)
    mu: float = 0.1  # weight of the weak head's smoothed CE (res18_sd_cifar.py:27)
    power: float = 1.0  # Zipf's law: place^-power (the official 1 / rank, uskd.py:29)
    rank_student: RankStudent = "log_softmax"  # the student's part of the ranking score (uskd.py:53, 73)
    feature_layer: str = "auto"  # the module the weak head reads; auto: the stage before the last (see docs)
    channels: int | None = None  # the feature's width; null: found by a probing forward pass

    def __post_init__(self) -> None:
        for key in ("alpha", "beta", "mu"):
            non_negative(f"uskd.{key}", getattr(self, key))
        positive("uskd.power", self.power)
        if self.channels is not None:
            positive("uskd.channels", self.channels)


@register_method("uskd", USKDConfig)
class USKD(Method):
    label = "USKD"

    def __init__(self, hparams: USKDConfig, ctx: MethodContext) -> None:
        super().__init__(hparams, ctx)
        if ctx.student is None:
            raise ConfigError("USKD hooks the student's layers: MethodContext.student must be the bare model.")
        h = hparams
        self.loss = USKDLoss(ctx.student, ctx.num_classes, h.feature_layer, h.alpha, h.beta, h.mu, h.power,
                             h.rank_student, h.channels).to(ctx.device)

    @classmethod
    def loss_terms(cls, hparams: USKDConfig) -> set[str]:
        return {"ce", "target", "non_target", "weak"}

    def student_parameters(self) -> list[nn.Parameter]:
        return list(self.loss.fc.parameters())

    def run_facts(self) -> dict[str, Any]:
        return {"uskd_feature_layer": self.loss.feature_layer, "uskd_channels": self.loss.fc.in_features}

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        with self.loss.capture():
            logits = model(batch.images)
        terms = self.loss.terms(logits, batch.targets)
        return StepOutput(logits, {"ce": F.cross_entropy(logits.float(), batch.targets), **terms})
