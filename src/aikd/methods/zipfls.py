"""Zipf's label smoothing (Liang et al., ECCV 2022; official code megvii-research/zipfls).

The model's own ranking of the classes gives each sample a soft non-target label shaped by Zipf's law.
The ranking comes from *dense* predictions: the linear head applied at every location of the feature map
before global pooling (upsampled x2 first, on CIFAR), each location voting for its arg-max class. With
v_c the votes of class c (or, without a map, the logits), y the label and C the classes:

    r_c   = 1 + #{k : v_k > v_c}                    (rank, ties share the smallest: scipy's rankdata 'min')
    P_c   = r_c^-power / sum_{k != y} r_k^-power    for c != y   (the target class is ranked, then left out)
    Q_c   = softmax over the non-target logits z_c, c != y
    L     = CE(z, y) + weight * KL(P || Q)          (summed over classes, mean over the batch)

No temperature; P carries no gradient (arg-max votes), Q and CE carry the student's. Defaults are the
official CIFAR-100 ResNet-18 run (docs/methods/zipfls.md gives every source line): weight 0.1, power 1,
dense ranking, bilinear x2 upsampling.

The pre-pool map is caught by a forward hook on the student's :class:`~aikd.models.base.GlobalAvgPool`
(:mod:`aikd.models.taps`), so this works through DDP and ``torch.compile`` and in a loop of your own
(:class:`ZipfLSLoss`). A model of aikd's without global pooling (small_cnn: flatten + FC) has no map: it
ranks from its final logits (the official ``dense=False`` path), as ``dense: false`` does for any model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aikd.errors import ConfigError
from aikd.methods.base import (
    Batch,
    Method,
    MethodContext,
    StepOutput,
    hard_labels,
    non_negative,
    positive,
    register_method,
)
from aikd.methods.functional import kl_per_sample, masked_mean, one_hot
from aikd.models.taps import Tap, find_module, global_pool, head_of, is_flattening_classifier, model_label

Upsample = Literal["bilinear", "bicubic", "none"]


# ---------------------------------------------------------------------- the loss, as plain functions


def rank_min(scores: Tensor) -> Tensor:
    """1-based rank of each entry of each row, largest first, ties sharing the smallest rank.

    ``scipy.stats.rankdata(-scores, axis=1, method='min')``, on the device: the rank of an entry is one plus
    its first position in the row sorted in descending order (a search, so no data-dependent shapes).
    """
    descending_as_ascending = (-scores).sort(dim=1).values
    return torch.searchsorted(descending_as_ascending, (-scores).contiguous(), side="left") + 1


def dense_votes(dense_logits: Tensor, num_classes: int) -> Tensor:
    """(N, L, C) per-location logits -> (N, C) float votes: how many of the L locations have c as arg-max.

    Counted by comparison (an (N, L, C) boolean, 0.8 MB for a CIFAR batch), not ``scatter_add_``, whose CUDA
    kernel accumulates with atomics and so is not on every torch's list of deterministic algorithms.
    """
    winners = dense_logits.argmax(dim=2)
    classes = torch.arange(num_classes, device=winners.device)
    return (winners.unsqueeze(2) == classes).sum(dim=1).to(torch.float32)


def zipf_non_target(scores: Tensor, labels: Tensor, power: float = 1.0) -> Tensor:
    """P: r^-power over every class ranked by ``scores`` (the target too), the target set to 0, rows normalised."""
    dist = rank_min(scores.float()).to(torch.float32).pow(-power)
    dist = dist * (1 - one_hot(labels, scores.shape[1]))
    return dist / dist.sum(dim=1, keepdim=True)


def non_target_log_softmax(logits: Tensor, target_mask: Tensor) -> Tensor:
    """log softmax over the classes ``target_mask`` leaves out (bool (N, C)), with 0 at the masked ones.

    The official code selects the non-target columns (``logits[mask].view(N, C - 1)``); masking with -inf
    gives the same values with fixed shapes (a boolean selection would make the host wait for its size).
    """
    log_q = F.log_softmax(logits.masked_fill(target_mask, float("-inf")), dim=1)
    return log_q.masked_fill(target_mask, 0.0)


def zipf_kl(logits: Tensor, labels: Tensor, target_dist: Tensor, correct_only: bool = False) -> Tensor:
    """KL(P || softmax of the non-target logits), summed over classes, mean over the batch.

    ``correct_only`` (the official ``--mask``): the mean over the samples the model classifies right, 0 if none.
    """
    log_q = non_target_log_softmax(logits.float(), one_hot(labels, logits.shape[1]).bool())
    per_sample = kl_per_sample(target_dist, log_q)
    if correct_only:
        return masked_mean(per_sample, logits.argmax(dim=1) == labels)
    return per_sample.mean()


def zipf_ls_terms(logits: Tensor, targets: Tensor, scores: Tensor, weight: float = 0.1, power: float = 1.0,
                  correct_only: bool = False) -> dict[str, Tensor]:
    """{"ce": CE(z, targets), "zipf": weight * KL(P || Q)} with P ranked by ``scores`` (detached).

    ``targets`` are class indices or (N, C) mixed labels: CE takes them as they are, the Zipf term's target
    class is their arg-max (the official code has no mixed labels).
    """
    labels = hard_labels(targets)
    target_dist = zipf_non_target(scores.detach(), labels, power)
    return {"ce": F.cross_entropy(logits.float(), targets),
            "zipf": weight * zipf_kl(logits, labels, target_dist, correct_only)}


# ---------------------------------------------------------------------- dense votes from a model


class DenseVotes:
    """The votes of a model's head at every location of a feature map, caught by a hook (:mod:`aikd.models.taps`).

    ``layer="auto"``: the input of the model's GlobalAvgPool; else the output of the module named ``layer``,
    a (N, C, H, W) map of the head's input width. A plain object: the model stays out of its owner's state.
    """

    def __init__(self, model: nn.Module, layer: str = "auto", upsample: Upsample = "bilinear",
                 key: str = "zipfls.dense_layer") -> None:
        if layer == "auto":
            pool = global_pool(model)
            if pool is None:
                raise ConfigError(
                    f"{model_label(model)} has no aikd GlobalAvgPool layer, whose input would be the map before "
                    f"global pooling: set {key} to the module whose output is that (N, C, H, W) map (a name from "
                    f"model.named_modules(), e.g. net.layer4, the last stage of a timm ResNet), or set zipfls.dense: "
                    f"false (ZipfLSLoss(dense=False)) to rank from the final logits.")
            self.tap, self.where = Tap(pool, input=True), "the input of the global pooling"
        else:
            self.tap, self.where = Tap(find_module(model, layer, key)), f"the output of {layer}"
        self.head = head_of(model)
        self.upsample = upsample

    def capture(self) -> contextlib.AbstractContextManager[Any]:
        return self.tap.capture()

    def take(self) -> Tensor:
        """(N, C) votes of the map caught by the last captured forward (no gradient)."""
        fmap = self.tap.take()
        if fmap.ndim != 4:
            raise ConfigError(f"Zipf's LS ranks a (N, C, H, W) feature map; {self.where} has shape "
                              f"{tuple(fmap.shape)}. Name another layer, or rank from the logits (dense: false).")
        with torch.no_grad():
            fmap = fmap.detach()
            if self.upsample != "none":
                fmap = F.interpolate(fmap, scale_factor=2.0, mode=self.upsample, align_corners=False)
            n, c, h, w = fmap.shape
            dense_logits = self.head(fmap.permute(0, 2, 3, 1).reshape(n, h * w, c))
            return dense_votes(dense_logits, self.head.out_features)


def dense_votes_for(model: nn.Module, dense: bool, layer: str, upsample: Upsample,
                    key: str = "zipfls.dense_layer") -> DenseVotes | None:
    """The model's dense votes, or None where the ranking comes from the final logits: ``dense`` off, or an
    aikd model that flattens its last map instead of pooling it (small_cnn) with ``layer`` left at auto."""
    if not dense or (layer == "auto" and global_pool(model) is None and is_flattening_classifier(model)):
        return None
    return DenseVotes(model, layer, upsample, key)


class ZipfLSLoss(nn.Module):
    """Zipf's label smoothing for a training loop of your own: CE + weight * KL(P || Q), one call.

    Built on the bare model (not a DDP or compile wrapper), it hooks the model's global pooling; arm the hook
    around the forward pass whose map should be ranked, then call the loss on that pass's logits:

        zipf = ZipfLSLoss(model)                    # defaults: the official CIFAR-100 settings
        for images, labels in loader:
            with zipf.capture():
                logits = model(images)
            loss = zipf(logits, labels)             # the map is read and forgotten here
            optimizer.zero_grad(); loss.backward(); optimizer.step()

    A model without global pooling (small_cnn) ranks from the logits; so does ``dense=False``.
    """

    def __init__(self, model: nn.Module, weight: float = 0.1, power: float = 1.0, dense: bool = True,
                 upsample: Upsample = "bilinear", dense_layer: str = "auto", correct_only: bool = False) -> None:
        super().__init__()
        ZipfLSConfig(weight, power, dense, upsample, dense_layer, correct_only)  # checks the ranges
        self.weight, self.power, self.correct_only = weight, power, correct_only
        self.votes = dense_votes_for(model, dense, dense_layer, upsample)

    @property
    def rank_from(self) -> str:
        return f"dense votes ({self.votes.where})" if self.votes is not None else "final logits"

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Catch the map of the forward passes inside the block (nothing to catch when ranking from logits)."""
        with self.votes.capture() if self.votes is not None else contextlib.nullcontext():
            yield

    def terms(self, logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
        scores = self.votes.take() if self.votes is not None else logits
        return zipf_ls_terms(logits, targets, scores, self.weight, self.power, self.correct_only)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        terms = self.terms(logits, targets)
        return terms["ce"] + terms["zipf"]


# ---------------------------------------------------------------------- the method


@dataclass
class ZipfLSConfig:
    weight: float = 0.1  # loss_lambda of the Zipf KL term (README's CIFAR-100 command: --loss_lambda 0.1)
    power: float = 1.0  # P_c proportional to rank^-power (train.py --power default)
    dense: bool = True  # rank from per-location votes (--dense); false: from the final logits
    upsample: Upsample = "bilinear"  # the map is upsampled x2 before voting (CIFAR: --upsample bilinear)
    dense_layer: str = "auto"  # auto: the input of the model's GlobalAvgPool; else a module name (its output map)
    correct_only: bool = False  # the Zipf term on correctly classified samples only (--mask; off on CIFAR)

    def __post_init__(self) -> None:
        non_negative("zipfls.weight", self.weight)
        positive("zipfls.power", self.power)


@register_method("zipfls", ZipfLSConfig)
class ZipfLS(Method):
    label = "Zipf's LS"

    def __init__(self, hparams: ZipfLSConfig, ctx: MethodContext) -> None:
        super().__init__(hparams, ctx)
        if ctx.student is None:
            raise ConfigError("Zipf's LS hooks the student's layers: MethodContext.student must be the bare model.")
        h = hparams
        self.loss = ZipfLSLoss(ctx.student, h.weight, h.power, h.dense, h.upsample, h.dense_layer, h.correct_only)

    @classmethod
    def loss_terms(cls, hparams: ZipfLSConfig) -> set[str]:
        return {"ce", "zipf"}

    def run_facts(self) -> dict[str, Any]:
        return {"zipfls_rank_from": self.loss.rank_from}

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        with self.loss.capture():
            logits = model(batch.images)
        return StepOutput(logits, self.loss.terms(logits, batch.targets))
