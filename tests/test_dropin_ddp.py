"""The drop-in losses (AIKDLoss, PSKDLoss) under data parallelism: two real gloo processes, the losses built as
the README builds them (no strategy passed: they find the process group by themselves).

Each rank trains on its own share of every epoch's global shuffle, as a DistributedSampler gives it. A
rank's buffer must hold every sample's previous logits, not only those of its own share of the last epoch,
and the critic must stay the same on every rank, as it does in ``aikd train``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from aikd.methods.aikd import AIKDLoss
from aikd.methods.pskd import PSKDLoss

WORLD, NUM_TRAIN, CLASSES, BATCH_PER_RANK, EPOCHS = 2, 48, 5, 6, 3


def _rank_batches(epoch: int, rank: int) -> list[torch.Tensor]:
    """This rank's batches of one epoch: every WORLD-th index of the epoch's global shuffle (DistributedSampler)."""
    order = torch.randperm(NUM_TRAIN, generator=torch.Generator().manual_seed(100 + epoch))
    return list(order[rank::WORLD].split(BATCH_PER_RANK))


def _train(criterion: nn.Module, rank: int, superior: bool) -> dict:
    """A few epochs of a linear student with ``criterion``; the share of buffer reads that found an entry after
    the first epoch, and the critic's final weights (AIKDLoss)."""
    torch.manual_seed(rank)  # each rank's own images and student (the critic starts from rank 0's)
    images, student = torch.randn(NUM_TRAIN, 8), nn.Linear(8, CLASSES)
    sup = nn.Linear(8, CLASSES).requires_grad_(False)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    labels = torch.arange(NUM_TRAIN) % CLASSES
    hits, reads = 0, 0
    for epoch in range(EPOCHS):
        for idx in _rank_batches(epoch, rank):
            if epoch > 0:
                hits += int(criterion.buffer.read(idx)[1].sum())
                reads += len(idx)
            logits = student(images[idx])
            if isinstance(criterion, PSKDLoss):
                loss = criterion(logits, labels[idx], idx, epoch)
            else:
                loss = criterion(logits, labels[idx], idx, sup(images[idx]) if superior else None)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    critic = criterion.adversary.critic.theta.tolist() if getattr(criterion, "adversary", None) else None
    return {"hit_rate": hits / reads, "critic": critic}


def _worker(rank: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(rank)  # a per-rank seed, as many scripts use: the critics start different
        results = {"pskd": _train(PSKDLoss(CLASSES, NUM_TRAIN, EPOCHS), rank, superior=False),
                   "aikd": _train(AIKDLoss(CLASSES, NUM_TRAIN), rank, superior=True)}
        Path(folder, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("dropin_ddp")
    mp.start_processes(_worker, args=(str(folder),), nprocs=WORLD, start_method="spawn")
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


@pytest.mark.parametrize("loss", ["pskd", "aikd"])
def test_every_rank_finds_every_samples_previous_logits_after_a_reshuffle(ranks, loss):
    assert [r[loss]["hit_rate"] for r in ranks] == [1.0] * WORLD  # a rank-local buffer finds about 1 / WORLD


def test_the_critic_is_the_same_on_every_rank_after_steps_on_different_data(ranks):
    first, second = (torch.tensor(r["aikd"]["critic"]) for r in ranks)
    assert torch.equal(first, second)
