"""CS-KD (class-wise self-knowledge distillation, Yun et al. CVPR 2020).

Every batch holds B anchors and, for each, another random sample of the same
class (possibly itself). The student is trained with CE on the anchors and
pulled toward its own softened prediction on the partners:

    L = CE(q, p(z_anchor)) + lambda T^2 KL(p(z_partner; T) || p(z_anchor; T))

The partners' forward runs without gradient, in train mode, as in the
official code. Defaults T = 4, lambda = 1 (CIFAR); the fine-grained configs
use lambda = 3 and batch 32. ``data.batch_size`` is the number of anchors B;
the loader's batch holds 2B images.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aikd.data.loaders import EpochSampler, epoch_generator
from aikd.errors import ConfigError
from aikd.methods.base import Batch, Method, StepOutput, non_negative, positive, register_method
from aikd.methods.functional import distillation_kl


class ClassPairBatchSampler(EpochSampler):
    """Batches of B shuffled anchors followed by one same-class partner each.

    Every sample is an anchor exactly once per epoch. The draw depends only on
    (seed, epoch), like :class:`~aikd.data.loaders.EpochBatchSampler`.
    """

    group_size = 2  # [anchors | partners]

    def __init__(self, labels: Tensor, batch_size: int, seed: int = 0) -> None:
        self.labels = labels.cpu()
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        order = torch.argsort(self.labels, stable=True)
        counts = torch.bincount(self.labels)
        self.by_class = order  # indices grouped by class
        self.class_start = torch.cumsum(counts, 0) - counts
        self.class_count = counts

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        g = epoch_generator(self.seed, self.epoch)
        anchors = torch.randperm(len(self.labels), generator=g)
        cls = self.labels[anchors]
        offset = (torch.rand(len(anchors), generator=g) * self.class_count[cls]).long()
        partners = self.by_class[self.class_start[cls] + offset]
        for i in range(len(self)):
            chunk = slice(i * self.batch_size, (i + 1) * self.batch_size)
            yield anchors[chunk].tolist() + partners[chunk].tolist()

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        full, rest = divmod(len(self.labels), self.batch_size)
        return full + (1 if rest > 1 else 0)  # one anchor alone cannot train BatchNorm


@dataclass
class CSKDConfig:
    lam: float = 1.0  # lambda, weight of the class-wise term
    temperature: float = 4.0

    def __post_init__(self) -> None:
        non_negative("cskd.lam", self.lam)
        positive("cskd.temperature", self.temperature)


@register_method("cskd", CSKDConfig)
class CSKD(Method):
    label = "CS-KD"

    paired_batches = True

    @classmethod
    def loss_terms(cls, hparams: CSKDConfig) -> set[str]:
        return {"ce", "cls"}

    def batch_sampler(self, batch_size: int, seed: int) -> ClassPairBatchSampler:
        if self.ctx.train_labels is None:
            raise ConfigError("cskd needs the training labels to pair samples of the same class.")
        return ClassPairBatchSampler(self.ctx.train_labels, batch_size, seed)

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        h = self.hparams
        half = len(batch.indices) // 2
        logits = model(batch.images[:half])
        with torch.no_grad():
            partner_logits = model(batch.images[half:]).float()
        return StepOutput(logits, {
            "ce": F.cross_entropy(logits, batch.targets[:half]),
            "cls": h.lam * distillation_kl(partner_logits, logits.float(), h.temperature),
        })
