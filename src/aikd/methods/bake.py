"""BAKE (batch knowledge ensembling, Ge et al. CVPR 2021; official code github:yxgeee/BAKE).

The soft target of every sample is an ensemble of the batch's own softened predictions, each weighted by
how similar its sample's features are. With f_i the L2-normalised pooled features, p_i = softmax(z_i / T)
and omega the ensembling weight:

    A_ij = exp(f_i . f_j) / sum_{k != i} exp(f_i . f_k)   (A_ii = 0: a sample is not its own neighbour)
    Q = (1 - omega) (I - omega A)^-1 P                     (propagation to convergence, in closed form)
    L = CE(y, z) + lambda T^2 KL(Q || softmax(z / T))      (batch mean; Q has no gradient)

(``(1 - omega) sum_t omega^t A^t P``: the limit of Q <- omega A Q + (1 - omega) P.) The batches hold
``data.batch_size // (intra_imgs + 1)`` shuffled anchors, each with ``intra_imgs`` other samples of its
class (:class:`IntraClassBatchSampler`), so that every sample has neighbours to learn from. Defaults are
the official CIFAR-100 settings: omega 0.5, T 4, lambda 1, M = 3 (batch 128 = 32 anchors x 4).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aikd.data.loaders import EpochSampler, epoch_generator
from aikd.errors import ConfigError
from aikd.methods.base import Batch, Method, StepOutput, non_negative, positive, register_method, require
from aikd.methods.functional import kl_from_probs


def bake_targets(features: Tensor, logits: Tensor, omega: float = 0.5, temperature: float = 4.0) -> Tensor:
    """Q = (1 - omega) (I - omega A)^-1 softmax(logits / T), A the row-softmax of the features' cosine
    similarities with the diagonal masked out; no gradient, float32, whatever the autocast.

    Solved as a linear system (``solve_ex`` without its error check, which would wait for the device):
    I - omega A is strictly diagonally dominant for omega < 1 (A's rows sum to 1), so it is never singular.
    """
    with torch.no_grad(), torch.autocast(logits.device.type, enabled=False):
        n = logits.shape[0]
        f = F.normalize(features.detach().float().flatten(1), p=2, dim=1)
        probs = F.softmax(logits.detach().float() / temperature, dim=1)
        eye = torch.eye(n, device=logits.device, dtype=torch.float32)
        affinity = F.softmax(f @ f.t() - 1e9 * eye, dim=1)  # the official mask: self-affinity exp(-1e9) = 0
        targets, _ = torch.linalg.solve_ex(eye - omega * affinity, probs, check_errors=False)
        return (1 - omega) * targets


def bake_loss(logits: Tensor, features: Tensor, targets: Tensor, omega: float = 0.5, temperature: float = 4.0,
              lam: float = 1.0) -> tuple[Tensor, Tensor]:
    """(CE, lambda T^2 KL(Q || p(z; T))) of one batch; ``targets``: class indices or (N, C) probabilities."""
    z = logits.float()
    soft = bake_targets(features, z, omega, temperature)
    kd = temperature * temperature * kl_from_probs(soft, F.log_softmax(z / temperature, dim=1))
    return F.cross_entropy(z, targets), lam * kd


class IntraClassBatchSampler(EpochSampler):
    """Batches of A shuffled anchors, each followed by M other samples of its class (A (M + 1) images).

    As the official ``IdentityBatchSampler`` (yxgeee/BAKE small_scale/datasets.py:11-42): every sample is an
    anchor once per epoch (so an epoch has ceil(N / A) steps); an anchor's M companions are drawn without
    replacement from the other samples of its class, with replacement when it has fewer than M (an anchor
    alone in its class is its own companion). The batch is laid out as the official one, [a1..aA | c11..c1M,
    c21..c2M, ...]; the loss does not depend on the order. The draw depends only on (seed, epoch), like
    :class:`~aikd.data.loaders.EpochBatchSampler`.
    """

    def __init__(self, labels: Tensor, anchors: int, intra_imgs: int, seed: int = 0) -> None:
        self.labels = labels.cpu()
        self.anchors, self.intra_imgs, self.seed = anchors, intra_imgs, seed
        self.batch_size = anchors  # samples an epoch is cut into per batch (EpochSampler); images: A (M + 1)
        self.group_size = intra_imgs + 1  # an anchor and its M companions stay together on one rank
        self.epoch = 0
        self.by_class = torch.argsort(self.labels, stable=True)  # indices grouped by class
        self.place = torch.empty_like(self.by_class)
        self.place[self.by_class] = torch.arange(len(self.labels))  # where each index sits in by_class
        counts = torch.bincount(self.labels)
        self.class_start = torch.cumsum(counts, 0) - counts
        self.class_count = counts

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def companions(self, anchors: Tensor, g: torch.Generator) -> Tensor:
        """(A, M) dataset indices: M others of each anchor's class."""
        cls = self.labels[anchors]
        n = self.class_count[cls]
        own = self.place[anchors] - self.class_start[cls]  # the anchor's position within its class
        others = n - 1
        taken = own.unsqueeze(1)  # positions excluded so far, for the draw without replacement
        picks = []
        for t in range(self.intra_imgs):
            u = torch.rand(len(anchors), generator=g)
            # Without replacement: the r-th of the positions not yet taken (r uniform over what is left).
            r = (u * (others - t).clamp_min(1)).long()
            for excluded in taken.sort(dim=1).values.unbind(1):
                r = r + (r >= excluded).long()
            # With replacement (fewer than M others): any other position; none: the anchor itself.
            s = (u * others.clamp_min(1)).long()
            s = torch.where(others > 0, s + (s >= own).long(), own)
            pick = torch.where(others >= self.intra_imgs, r, s)
            taken = torch.cat([taken, pick.unsqueeze(1)], dim=1)
            picks.append(pick)
        positions = torch.stack(picks, dim=1) + self.class_start[cls].unsqueeze(1)
        return self.by_class[positions]

    def __iter__(self) -> Iterator[list[int]]:
        g = epoch_generator(self.seed, self.epoch)
        order = torch.randperm(len(self.labels), generator=g)
        companions = self.companions(order, g)  # (N, M)
        for i in range(len(self)):
            chunk = slice(i * self.anchors, (i + 1) * self.anchors)
            yield order[chunk].tolist() + companions[chunk].flatten().tolist()

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.anchors)


@dataclass
class BAKEConfig:
    omega: float = 0.5  # ensembling weight: how far knowledge propagates (0: no ensembling, Q = P)
    temperature: float = 4.0  # T of the soft targets and of the KL
    lam: float = 1.0  # lambda, weight of the distillation term
    intra_imgs: int = 3  # M, same-class companions of each anchor; 0: plain shuffled batches

    def __post_init__(self) -> None:
        require(0 <= self.omega < 1, "bake.omega", self.omega, "must be in [0, 1)")
        positive("bake.temperature", self.temperature)
        non_negative("bake.lam", self.lam)
        non_negative("bake.intra_imgs", self.intra_imgs)


@register_method("bake", BAKEConfig)
class BAKE(Method):
    """CE on every image of the batch plus distillation toward the batch's propagated soft targets."""

    label = "BAKE"

    @classmethod
    def loss_terms(cls, hparams: BAKEConfig) -> set[str]:
        return {"ce", "bake"}

    def batch_sampler(self, batch_size: int, seed: int) -> IntraClassBatchSampler | None:
        m = self.hparams.intra_imgs
        if m == 0:
            return None
        if self.ctx.train_labels is None:
            raise ConfigError("bake needs the training labels to draw same-class companions (bake.intra_imgs).")
        if batch_size < m + 1:
            raise ConfigError(f"data.batch_size={batch_size} holds no anchor with its bake.intra_imgs={m} "
                              f"companions: use data.batch_size >= {m + 1}.")
        return IntraClassBatchSampler(self.ctx.train_labels, batch_size // (m + 1), m, seed)

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        h = self.hparams
        logits, features = model(batch.images, return_features=True)
        ce, kd = bake_loss(logits, features, batch.targets, h.omega, h.temperature, h.lam)
        # Training accuracy and the sample count are the anchors' (the batch's first A = N / (M + 1) images),
        # so an epoch counts every training sample once, as CS-KD's counts its anchors.
        anchors = len(logits) // (h.intra_imgs + 1)
        return StepOutput(logits[:anchors], {"ce": ce, "bake": kd})


class BAKELoss(nn.Module):
    """BAKE as one loss for a training loop of your own: CE + lambda T^2 KL(Q || p(z; T)).

    Give it the student's logits and pooled features of the whole batch; draw the batches with
    :class:`IntraClassBatchSampler` as the official code does (plain shuffled batches also work, with
    fewer similar neighbours to ensemble)::

        sampler = IntraClassBatchSampler(train_labels, anchors=32, intra_imgs=3)
        loader = DataLoader(train_set, batch_sampler=sampler)
        criterion = BAKELoss()
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            for images, labels in loader:
                logits, features = model(images, return_features=True)
                loss = criterion(logits, features, labels)
    """

    def __init__(self, omega: float = 0.5, temperature: float = 4.0, lam: float = 1.0) -> None:
        super().__init__()
        BAKEConfig(omega=omega, temperature=temperature, lam=lam)  # checks the ranges
        self.omega, self.temperature, self.lam = omega, temperature, lam

    def forward(self, logits: Tensor, features: Tensor, labels: Tensor) -> Tensor:
        ce, kd = bake_loss(logits, features, labels, self.omega, self.temperature, self.lam)
        return ce + kd
