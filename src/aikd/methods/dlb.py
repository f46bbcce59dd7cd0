"""DLB: self-distillation from the last mini-batch (Shen et al., CVPR 2022; Meta-knowledge-Lab/DLB).

Every step trains on B new samples and on the B samples that were new in the step before (a fresh
random view of each: the augmentation is drawn again). On that shared half the student is pulled toward
its own softened predictions of the previous step, which are stored detached:

    L = CE([z_shared; z_new], [y_shared; y_new])                        mean over all rows
        + alpha T^2 (1 / |S|) sum_{j in S} KL(p(z_last_j; T) || p(z_shared_j; T))

z_new, z_shared: the student's logits now (two forward passes, as in the official dlb.py:75,82);
z_last_j: its logits for sample j one step earlier (on that step's view), no gradient. S: the shared rows
whose stored prediction is there (all of them, except after the run's first step, a skipped step or a resume
under another number of processes, where the term is 0 for the rows without one). Defaults T = 3, alpha = 1.

The loader's batch is ``[new | shared]`` (2B images; ``data.batch_size`` = B, the new samples), drawn by
:class:`LastBatchSampler`, whose batches depend only on (seed, epoch): a resumed run skips the batches it
already trained on and sees the same ones. ``paired_batches`` holds: the two halves are the same size, so

* under data parallelism each rank takes the same slice of both halves (src/aikd/data/loaders.py,
  ``ShardedBatchSampler``), and its shared rows are exactly the new rows it trained on one step earlier;
* Mixup / CutMix mix within each half with one ratio (src/aikd/data/mixing.py): the shared half is in the
  order the new half had one step earlier, so each sample has the same partner in both steps (the ratio, the
  box and the crops are drawn again).

``last_batch: partial`` reproduces the official code's last batch of an epoch (r = N mod B new samples with the
B shared ones, then B new with r shared); its halves differ in size, so it is refused with several processes
or with Mixup / CutMix. See docs/methods/dlb.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aikd.checks import require
from aikd.data.loaders import EpochSampler, epoch_generator
from aikd.errors import ConfigError
from aikd.methods.base import Batch, Method, MethodContext, StepOutput, non_negative, positive, register_method
from aikd.methods.functional import kl_rows_at

LastBatch = Literal["pad", "partial"]


def _ce_rows(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of every row, for class indices (N,) or probabilities (N, C) (a mixed batch)."""
    if targets.ndim == 1:
        return F.cross_entropy(logits, targets, reduction="none")
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)


def dlb_loss(new_logits: Tensor, new_targets: Tensor, shared_logits: Tensor, shared_targets: Tensor,
             last_logits: Tensor, found: Tensor, alpha: float = 1.0, temperature: float = 3.0
             ) -> tuple[Tensor, Tensor]:
    """DLB's two terms: (CE over every row, alpha T^2 KL on the shared rows), both scalars.

        CE  = (sum_i CE(y_i, z_i)) / (|new| + |shared|)            over [shared; new]   (dlb.py:83-85)
        KL  = alpha T^2 sum_j f_j KL(p(z_last_j; T) || p(z_shared_j; T)) / max(sum_j f_j, 1)  (dlb.py:86-95)

    ``last_logits`` (k, C): the previous step's logits for the shared rows, detached here (the official
    ``pre_out.detach()``); ``found`` (k,) bool: which of them are real (rows without one add 0; with every
    row found the KL is the official ``batchmean``). Targets are class indices or probabilities.
    """
    ce = torch.cat([_ce_rows(shared_logits, shared_targets), _ce_rows(new_logits, new_targets)]).mean()
    f = found.to(shared_logits.dtype)
    last = torch.where(found.unsqueeze(1), last_logits.detach().to(shared_logits.dtype), 0.0)  # no NaN from unset rows
    kl_rows = kl_rows_at(last, shared_logits, temperature) * f
    kl = alpha * temperature * temperature * kl_rows.sum() / f.sum().clamp_min(1)
    return ce, kl


class LastBatchSampler(EpochSampler):
    """Batches ``[new | shared]``: B new samples, then the B that were new in the batch before.

    Each epoch is a permutation of the training set (seeded by (seed, epoch), like
    :class:`~aikd.data.loaders.EpochBatchSampler`) cut into chunks of B new samples, so every sample is new
    once per epoch. The shared half of the epoch's first batch is the previous epoch's last chunk (the official
    code carries its last batch over the epoch boundary); the run's very first batch has none, and repeats its
    new chunk there (DLB reads no prediction for it and runs no second forward pass).

    ``last_batch``: where N = qB + r with 0 < r < B,

    * ``"pad"`` (default): the last chunk is completed with the first B - r samples of the epoch's
      permutation (new a second time in that epoch), so both halves always hold B samples, as data
      parallelism and the mixing pairs need;
    * ``"partial"``: the official behaviour, a last chunk of r new samples (its batch holds r + B), whose r
      are the next epoch's first shared half (B + r). One process only.

    Usable with a plain DataLoader: ``DataLoader(dataset, batch_sampler=sampler)``, with
    ``sampler.set_epoch(epoch)`` before each epoch.
    """

    group_size = 2  # [new | shared]: sharded half by half, so a rank's shared rows were its own new ones

    def __init__(self, num_train: int, batch_size: int, seed: int = 0, last_batch: LastBatch = "pad") -> None:
        require(last_batch in ("pad", "partial"), "dlb.last_batch", last_batch, "must be pad or partial")
        self.num_train, self.batch_size, self.seed, self.last_batch = num_train, batch_size, seed, last_batch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_train / self.batch_size)  # one step per chunk of new samples

    @property
    def num_samples(self) -> int:
        """New samples per epoch (with padding: every chunk full, so a sharded run never drops the last batch)."""
        return len(self) * self.batch_size if self.last_batch == "pad" else self.num_train

    def chunks(self, epoch: int) -> list[list[int]]:
        """The epoch's chunks of new samples, in order."""
        g = epoch_generator(self.seed, epoch)
        order = torch.randperm(self.num_train, generator=g)
        if self.last_batch == "pad":
            order = order.repeat(math.ceil(self.num_samples / self.num_train))[: self.num_samples]
        return [chunk.tolist() for chunk in order.split(self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        chunks = self.chunks(self.epoch)
        # the previous epoch's last chunk; before the run's first batch none (pad: its own new chunk, unread)
        first = chunks[0] if self.last_batch == "pad" else []
        shared = self.chunks(self.epoch - 1)[-1] if self.epoch > 0 else first
        for new in chunks:
            yield new + shared
            shared = new


class LastLogits(nn.Module):
    """The previous step's logits of its new samples and their dataset indices (buffers, in ``state_dict()``).

    In a run of W processes every write holds all ranks' rows, rank after rank, in blocks of equal size (each
    rank's padded as ``Strategy.gather_rows`` pads it): every rank keeps the same state, so the checkpoint that
    rank 0 writes resumes every rank. Rank r reads its own block. The buffers take the saved shapes on load.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("logits", torch.zeros(0, num_classes))
        self.register_buffer("index", torch.zeros(0, dtype=torch.long))

    @property
    def empty(self) -> bool:
        return self.index.shape[0] == 0

    def write(self, logits: Tensor, index: Tensor) -> None:
        self.logits = logits.detach().float()
        self.index = index.detach().long()

    def read(self, index: Tensor, rank: int = 0, world_size: int = 1) -> tuple[Tensor, Tensor]:
        """(k, C) stored logits for the k shared rows of this rank and (k,) whether each is the stored sample's.

        Positions are fixed (this rank's block, in order); a stored index that is not the row's (a skipped
        step, a resume under another number of processes) marks the row not found. No host sync.
        """
        k = index.shape[0]
        rows = self.index.shape[0] // world_size
        if rows < k:  # shapes only: nothing stored for this layout
            return self.logits.new_zeros(k, self.logits.shape[1]), torch.zeros_like(index, dtype=torch.bool)
        block = slice(rank * rows, rank * rows + k)
        return self.logits[block], self.index[block] == index

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("logits", "index"):
            saved = state_dict.get(prefix + name)
            if saved is not None:  # take the saved shape; the default loader then copies the values
                current = getattr(self, name)
                setattr(self, name, torch.empty(saved.shape, dtype=current.dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


@dataclass
class DLBConfig:
    alpha: float = 1.0  # weight of the KL term (paper Sec. 4.1; dlb.py --alpha has no default)
    temperature: float = 3.0  # T (paper Sec. 4.1; dlb.py --T has no default, its run name "TP3")
    last_batch: LastBatch = "pad"  # "partial": the official code's unequal last batches (one process, no mixing)

    def __post_init__(self) -> None:
        non_negative("dlb.alpha", self.alpha)
        positive("dlb.temperature", self.temperature)
        require(self.last_batch in ("pad", "partial"), "dlb.last_batch", self.last_batch, "must be pad or partial")


@register_method("dlb", DLBConfig)
class DLB(Method):
    """DLB inside aikd's loop: batches ``[new | shared]`` from :class:`LastBatchSampler`, see the module docstring."""

    label = "DLB"
    paired_batches = True  # equal halves (last_batch: pad): sharded and mixed half by half

    def __init__(self, hparams: DLBConfig, ctx: MethodContext) -> None:
        super().__init__(hparams, ctx)
        if hparams.last_batch == "partial" and ctx.strategy.world_size > 1:
            raise ConfigError("dlb.last_batch=partial (the official code's last batch of r + B samples) needs one "
                              "process: its halves differ in size, and a rank's slice of them is not its own last "
                              "batch. Use dlb.last_batch=pad with several processes.")
        self.last = LastLogits(ctx.num_classes)
        self.shared_rows = 0  # last_batch=partial: rows of the next batch's shared half (host state, get_extra_state)

    @classmethod
    def loss_terms(cls, hparams: DLBConfig) -> set[str]:
        return {"ce", "dlb"}

    def batch_sampler(self, batch_size: int, seed: int) -> LastBatchSampler:
        return LastBatchSampler(self.ctx.num_train, batch_size, seed, self.hparams.last_batch)

    def _split(self, rows: int) -> int:
        """Rows of this batch's shared half (host arithmetic only)."""
        if self.hparams.last_batch == "pad":
            return rows // 2
        shared, self.shared_rows = self.shared_rows, rows - self.shared_rows
        return shared

    def training_step(self, model: nn.Module, batch: Batch) -> StepOutput:
        h = self.hparams
        if h.last_batch == "partial" and batch.targets.ndim == 2:
            raise ConfigError("dlb.last_batch=partial cannot be mixed (data.mix=mixup or cutmix): its halves differ "
                              "in size at the epoch's ends, and mixing pairs rows half by half. Use "
                              "dlb.last_batch=pad, or data.mix=none.")
        shared = self._split(len(batch.indices))
        new = len(batch.indices) - shared
        logits = model(batch.images[:new]).float()
        if shared == 0 or self.last.empty:  # the run's first step: CE on the new samples (dlb.py:96-97)
            ce = _ce_rows(logits, batch.targets[:new]).mean()
            zero = logits.new_zeros(())
            return StepOutput(logits, {"ce": ce, "dlb": zero}, {"targets_found": zero},
                              saved={"index": batch.indices[:new]})
        # The second forward pass with gradient goes through the bare student (as BSS's): under DDP the
        # gradients of both passes reach the same parameters and are averaged once.
        student = self.ctx.student if self.ctx.student is not None else model
        shared_logits = student(batch.images[new:]).float()
        strategy = self.ctx.strategy
        last, found = self.last.read(batch.indices[new:], strategy.rank, strategy.world_size)
        ce, kl = dlb_loss(logits, batch.targets[:new], shared_logits, batch.targets[new:], last, found,
                          h.alpha, h.temperature)
        return StepOutput(logits, {"ce": ce, "dlb": kl}, {"targets_found": found.float().mean()},
                          saved={"index": batch.indices[:new]})

    def on_step_end(self, model: nn.Module, batch: Batch, output: StepOutput) -> None:
        """Keep this step's predictions of its new samples for the next step (every rank's rows)."""
        gather = self.ctx.gather_step_rows
        self.last.write(gather(output.logits.detach()), gather(output.saved["index"]))

    def get_extra_state(self) -> dict[str, Any]:
        return {"shared_rows": self.shared_rows}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.shared_rows = int(state.get("shared_rows", 0))


class DLBLoss(nn.Module):
    """DLB as one loss module for a training loop of your own, with :class:`LastBatchSampler` as the
    DataLoader's ``batch_sampler`` (``last_batch="pad"``: every batch is ``[new | shared]``, two equal halves).

    It holds the last call's logits of the new half (saved with ``state_dict()``) and returns CE over both
    halves plus alpha T^2 KL toward them on the shared half; the first call has no stored logits and returns
    CE on the new half (run the shared forward anyway, or skip it while ``criterion.empty``).

        sampler = LastBatchSampler(len(train_set), batch_size=64, seed=0)
        loader = DataLoader(train_set, batch_sampler=sampler, num_workers=4)
        criterion = DLBLoss(num_classes=100)
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            for images, labels in loader:
                new, shared = images.chunk(2)
                y_new, y_shared = labels.chunk(2)
                loss = criterion(model(new), y_new, model(shared), y_shared)
                optimizer.zero_grad(); loss.backward(); optimizer.step()

    Rows are matched by position (the shared half is the previous new half, in order). Under data parallelism
    give each rank its own ``LastBatchSampler`` slice (or use ``aikd train``, which handles it) and save each
    rank's ``state_dict()``: the stored logits are that rank's.
    """

    def __init__(self, num_classes: int, alpha: float = 1.0, temperature: float = 3.0) -> None:
        super().__init__()
        DLBConfig(alpha=alpha, temperature=temperature)  # checks the ranges
        self.alpha, self.temperature = alpha, temperature
        self.last = LastLogits(num_classes)
        self.terms: dict[str, Tensor] = {}  # the last call's CE and KL terms, for logging

    @property
    def empty(self) -> bool:
        """No stored logits yet: the next call trains on the new half alone."""
        return self.last.empty

    def forward(self, new_logits: Tensor, new_labels: Tensor, shared_logits: Tensor | None = None,
                shared_labels: Tensor | None = None) -> Tensor:
        new_logits = new_logits.float()
        positions = torch.arange(new_logits.shape[0], device=new_logits.device)
        if self.last.empty or shared_logits is None or shared_labels is None:
            ce = _ce_rows(new_logits, new_labels).mean()
            kl = new_logits.new_zeros(())
        else:
            last, found = self.last.read(torch.arange(shared_logits.shape[0], device=new_logits.device))
            ce, kl = dlb_loss(new_logits, new_labels, shared_logits.float(), shared_labels, last, found,
                              self.alpha, self.temperature)
        if self.training:
            self.last.write(new_logits, positions)
        self.terms = {"ce": ce.detach(), "dlb": kl.detach()}
        return ce + kl
