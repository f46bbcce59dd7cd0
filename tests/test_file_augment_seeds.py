"""Random crops and flips of image files: each rank's own, and the same again when a run is replayed.

The split holds one image file 16 times, so any difference between two views comes from the augmentation
draws alone. Every rank seeds its global RNG alike (``seed_everything``), as a torchrun job does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from aikd.data import EpochBatchSampler, FileSplit
from aikd.data.augment import BatchAugment
from aikd.data.loaders import DataBundle, Loading, ShardedBatchSampler

N, BATCH, SEED = 16, 8, 3
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> DataBundle:
    path = tmp_path_factory.mktemp("images") / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    split = FileSplit([path] * N, torch.zeros(N, dtype=torch.int64), ["noise"])
    return DataBundle("files", split, split, 1, 3, 32, BatchAugment(MEAN, STD, 4, True, True),
                      Loading(BATCH, BATCH, 1, True))


def views(bundle: DataBundle, rank: int, epoch: int = 0, start: int = 0, workers: int = 1) -> list[torch.Tensor]:
    """The augmented images of rank ``rank``'s batches of ``epoch`` (of 2 ranks), from batch ``start`` on."""
    torch.manual_seed(SEED)  # what seed_everything leaves on every rank
    loading = bundle.loading
    bundle.loading = Loading(loading.batch_size, loading.eval_batch_size, workers, True)
    try:
        sampler = ShardedBatchSampler(EpochBatchSampler(N, BATCH, SEED), rank, 2)
        loader = bundle.loader(True, sampler, seed=SEED)
        loader.set_epoch(epoch, start)
        return [images for images, _, _ in loader]
    finally:
        bundle.loading = loading


def test_each_rank_draws_its_own_crops_and_flips(bundle):
    rank0, rank1 = views(bundle, 0), views(bundle, 1)
    assert not any(torch.equal(a, b) for a, b in zip(rank0, rank1, strict=True))


def test_the_views_replay_exactly(bundle):
    first = views(bundle, 0)
    again = views(bundle, 0)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(first, views(bundle, 0, workers=0), strict=True))  # any workers
    assert torch.equal(views(bundle, 0, start=1)[0], first[1])  # a resumed epoch draws what it would have drawn
    assert not torch.equal(views(bundle, 0, epoch=1)[0], first[0])  # and the next epoch other views
