"""Turning splits into batches of (images, labels, dataset indices).

Both kinds of loader draw their batches from an epoch batch sampler whose
order depends only on (seed, epoch). That makes runs reproducible, lets a
resumed run replay an epoch exactly, and is the shape a distributed sampler
needs (each rank takes a slice of the same permutation).
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from aikd.data.augment import BatchAugment, crop_padding_for, file_transforms
from aikd.data.images import read_rgb
from aikd.data.readers import DATASETS
from aikd.data.settings import DataConfig
from aikd.data.splits import ArraySplit, FileSplit, Split, stratified_indices
from aikd.errors import DataError

BatchTuple = tuple[Tensor, Tensor, Tensor]  # images, labels, indices


@runtime_checkable
class EpochSampler(Protocol):
    """What the loaders read from an epoch batch sampler: :class:`EpochBatchSampler`, or a method's own
    (``Method.batch_sampler``: CS-KD's pairs, BAKE's same-class groups, DLB's last batch, DDGSD's two views),
    each of which declares it by subclassing.

    Its batches must depend only on (seed, epoch), so that a resumed run replays an epoch (the loaders'
    :class:`ResumableBatchSampler` skips the batches done) and every rank draws the same ones. A run of several
    processes (:class:`ShardedBatchSampler`) reads ``num_samples`` and ``batch_size`` too: ``divmod`` of the two
    gives the epoch's full batches and the size of its last one, which is dropped when too small to give every
    rank two samples.
    """

    num_samples: int  # the samples an epoch's batches are cut from (CS-KD: its anchors)
    batch_size: int  # how many of them one batch takes
    # Images each of them brings into its batch, laid out [the B samples | the (group_size - 1) B others, each
    # sample's together, in the samples' order]: CS-KD's partners, DDGSD's second views and DLB's shared half
    # (2), BAKE's M same-class companions (M + 1). Sharding keeps every sample with its own.
    group_size: int = 1

    def set_epoch(self, epoch: int) -> None: ...

    def __iter__(self) -> Iterator[list[int]]: ...

    def __len__(self) -> int: ...


class EpochBatchSampler(EpochSampler):
    """Shuffled (or sequential) batches of indices, reproducible from (seed, epoch).

    A last batch of a single sample is dropped while shuffling: BatchNorm
    cannot train on one sample, and the sample is seen in other epochs.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0,
                 shuffle: bool = True) -> None:
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        return torch.randperm(self.num_samples, generator=epoch_generator(self.seed, self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order().tolist()
        for start in range(0, len(self), 1):
            yield order[start * self.batch_size:(start + 1) * self.batch_size]

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full + (1 if rest > 1 or (rest == 1 and not self.shuffle) else 0)


class ResumableBatchSampler:
    """Wraps an epoch batch sampler so that one epoch can start at a given batch.

    A run resumed from a mid-epoch checkpoint draws the epoch's batch order
    again (it depends only on seed and epoch) and skips the batches it already
    trained on; the skip applies to the next epoch only.
    """

    def __init__(self, inner) -> None:
        self.inner = inner
        self.start = 0
        self.epoch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.start, self.epoch = start_batch, epoch

    def __iter__(self) -> Iterator[list[int]]:
        start, self.start = self.start, 0
        yield from itertools.islice(iter(self.inner), start, None)

    def __len__(self) -> int:
        return len(self.inner)


class ShardedBatchSampler:
    """One rank's share of every global batch of an epoch batch sampler (data-parallel training).

    ``data.batch_size`` stays the global batch: the inner sampler draws the same
    batches on every rank (its order depends only on seed and epoch) and rank r
    keeps the r-th contiguous slice of each, so N ranks together train on exactly
    the batches a single process would, each on batch_size / N samples. Where the
    sampler's samples bring others with them (``group_size`` > 1: CS-KD's
    [anchors | partners], BAKE's [anchors | companions]) the anchors are sliced and
    each keeps its own, in the same layout. A last global batch too small to give
    every rank two samples (BatchNorm cannot train on one) is dropped on all ranks,
    so they always take the same number of steps.
    """

    def __init__(self, inner: EpochSampler, rank: int, world_size: int) -> None:
        self.inner, self.rank, self.world_size = inner, rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def _share(self, items: list[int]) -> list[int]:
        size, extra = divmod(len(items), self.world_size)
        start = self.rank * size + min(self.rank, extra)
        return items[start:start + size + (self.rank < extra)]

    def __iter__(self) -> Iterator[list[int]]:
        others = self.inner.group_size - 1
        for batch in itertools.islice(iter(self.inner), len(self)):
            if others:
                count = len(batch) // (others + 1)
                anchors = self._share(list(range(count)))
                yield [batch[i] for i in anchors] + [batch[count + i * others + j] for i in anchors
                                                     for j in range(others)]
            else:
                yield self._share(batch)

    def __len__(self) -> int:
        batches = len(self.inner)
        full, rest = divmod(self.inner.num_samples, self.inner.batch_size)
        last_is_partial = batches > full
        return batches - (1 if last_is_partial and rest < 2 * self.world_size else 0)


class BlockBatchSampler:
    """Sequential batches over one rank's contiguous block of a split (distributed evaluation).

    Rank r takes samples [r * N / W, (r + 1) * N / W): no sample is padded in or
    left out, and the ranks' predictions, gathered in rank order, are the
    split's predictions in dataset order.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int) -> None:
        self.start = num_samples * rank // world_size
        self.stop = num_samples * (rank + 1) // world_size
        self.batch_size = batch_size

    def set_epoch(self, epoch: int) -> None:
        """Evaluation order does not change between epochs."""

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(self.start, self.stop, self.batch_size):
            yield list(range(start, min(start + self.batch_size, self.stop)))

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.batch_size)


def rank_train_sampler(sampler: EpochSampler | None, num_samples: int, batch_size: int, seed: int,
                       rank: int, world_size: int) -> EpochSampler | ShardedBatchSampler | None:
    """This rank's training batches: the method's epoch sampler (None: the loader's shuffled batches) alone, or,
    in a run of several processes, this rank's slice of every global batch (``data.batch_size`` stays global)."""
    if world_size == 1:
        return sampler
    sampler = sampler or EpochBatchSampler(num_samples, batch_size, seed)
    return ShardedBatchSampler(sampler, rank, world_size)


def rank_eval_sampler(num_samples: int, batch_size: int, rank: int, world_size: int) -> BlockBatchSampler | None:
    """This rank's contiguous block of a split (gathered in rank order, every sample counts once); None alone."""
    return None if world_size == 1 else BlockBatchSampler(num_samples, batch_size, rank, world_size)


class TensorLoader:
    """Batches straight out of in-memory uint8 tensors, which live on the training device: one index op per batch.

    The whole split is copied to ``device`` once, and each epoch's batch order once at the epoch's start (from
    pinned memory, without waiting for the device); a batch is then a slice of that order and a gather on the
    device, so a step makes no host-to-device copy (on the CPU the same ops give the same batches).
    """

    def __init__(self, split: ArraySplit, batch_sampler, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device or "cpu")
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_sampler = ResumableBatchSampler(batch_sampler)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.batch_sampler.set_epoch(epoch, start_batch)

    def __iter__(self) -> Iterator[BatchTuple]:
        batches = list(self.batch_sampler)
        order = torch.as_tensor([i for batch in batches for i in batch], dtype=torch.int64)
        if self.device.type == "cuda":
            order = order.pin_memory().to(self.device, non_blocking=True)
        else:
            order = order.to(self.device)
        start = 0
        for batch in batches:
            idx = order[start:start + len(batch)]
            start += len(batch)
            yield self.images[idx], self.labels[idx], idx

    def __len__(self) -> int:
        return len(self.batch_sampler)


class ImageFileDataset(Dataset):
    """Decodes one image file per item and returns (image, label, index).

    With a ``seed`` (training), an item is asked for by (epoch, index), and its random crop and flip come from
    its own stream, seeded by (seed, epoch, index). DataLoader workers would otherwise draw from streams seeded
    by the global RNG, which is the same on every rank (every rank drew the same crop and flip sequence), and
    which a resumed run cannot replay. Keyed by the sample, a view depends on nothing else: not on the rank,
    the number of workers or ranks, nor on where a resumed epoch starts.
    """

    def __init__(self, split: FileSplit, transform, seed: int | None = None) -> None:
        self.split = split
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: int | tuple[int, int] | tuple[int, int, int]) -> tuple[Tensor, int, int]:
        epoch, index, repeat = (*key, 0)[:3] if isinstance(key, tuple) else (0, key, 0)
        path: Path = self.split.paths[index]
        img = read_rgb(path)
        if self.seed is None:
            return self.transform(img), int(self.split.labels[index]), index
        with torch.random.fork_rng(devices=[]):  # the process's own stream (the main one, without workers) stays
            torch.manual_seed(sample_seed(self.seed, epoch, index, repeat))
            return self.transform(img), int(self.split.labels[index]), index


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of a sampler's draws in one epoch (its batch order; CS-KD's, BAKE's, DLB's own): one stream
    per (run seed, epoch), the same in every process and on every resume, whatever ran before."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch))


def epoch_seed(seed: int, epoch: int) -> int:
    """One number per (run seed, epoch): the seed of :func:`epoch_generator`, and the base of :func:`sample_seed`."""
    return seed * 1_000_003 + epoch


def sample_seed(seed: int, epoch: int, index: int, repeat: int = 0) -> int:
    """The seed of one sample's augmentation in one epoch: distinct for every (seed, epoch, index), and for
    every ``repeat``, the sample's earlier copies in the same batch (DDGSD's two views, a CS-KD partner that
    is its anchor): each copy is a view of its own, as in the in-memory augmentation."""
    base = (epoch_seed(seed, epoch) * 2_147_483_659 + index) % 2**63
    return base if repeat == 0 else (base * 1_000_033 + repeat) % 2**63


class EpochKeys:
    """A batch sampler's batches as (epoch, index, repeat) keys, for a dataset that draws per sample
    (:class:`ImageFileDataset`); runs in the main process, so it sees each ``set_epoch``. ``repeat`` counts the
    index's earlier copies in the same batch, so that copies get views of their own."""

    def __init__(self, batches: ResumableBatchSampler) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        epoch = self.batches.epoch
        for batch in self.batches:
            seen: dict[int, int] = {}
            keys = []
            for i in batch:
                i = int(i)
                keys.append((epoch, i, seen.get(i, 0)))
                seen[i] = seen.get(i, 0) + 1
            yield keys

    def __len__(self) -> int:
        return len(self.batches)


def _worker_message(text: str) -> str:
    """The DataError's own message out of a DataLoader worker's report ("Caught DataError in DataLoader
    worker process 0. Original Traceback ... aikd.errors.DataError: <message>")."""
    for line in reversed(text.strip().splitlines()):
        for prefix in ("aikd.errors.DataError: ", "DataError: "):
            if line.startswith(prefix):
                return line[len(prefix):].strip()
    return text


class FileLoader:
    """A DataLoader over image files with workers, pinned memory and prefetching."""

    def __init__(self, dataset: ImageFileDataset, batch_sampler, num_workers: int,
                 pin_memory: bool) -> None:
        self.batch_sampler = ResumableBatchSampler(batch_sampler)
        self.loader = DataLoader(
            dataset, batch_sampler=EpochKeys(self.batch_sampler), num_workers=num_workers,
            pin_memory=pin_memory, persistent_workers=num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
        )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.batch_sampler.set_epoch(epoch, start_batch)

    def __iter__(self) -> Iterator[BatchTuple]:
        try:
            yield from self.loader
        except DataError as err:  # raised in a worker: PyTorch puts the worker's traceback into the message
            raise DataError(_worker_message(str(err))) from None

    def __len__(self) -> int:
        return len(self.batch_sampler)


@dataclass(frozen=True)
class Loading:
    """How a bundle's loaders batch: plain values taken from ``data.*`` once."""

    batch_size: int
    eval_batch_size: int
    num_workers: int | None  # image files: None = min(8, CPUs per rank)
    file_augment: bool  # image files: crop + flip (data.augment: standard)

    @classmethod
    def of(cls, cfg: DataConfig) -> Loading:
        return cls(cfg.batch_size, cfg.eval_batch_size, cfg.num_workers, cfg.augment == "standard")


@dataclass
class DataBundle:
    """Both splits of a dataset plus what the model and loop need to know about them."""

    name: str
    train: Split
    test: Split
    num_classes: int
    in_channels: int
    image_size: int
    augment: BatchAugment  # device-side normalization (and augmentation for in-memory data)
    loading: Loading  # batch sizes and workers
    holdout: Split | None = None  # training images kept out of training, for temperature scaling
    eval_split: str = "test"  # what ``test`` holds: the test split, or the validation images (data.val_size)
    skipped_files: list[str] = field(default_factory=list)  # files left out by data.skip_bad_files, with why

    @property
    def in_memory(self) -> bool:
        return isinstance(self.train, ArraySplit)

    def loader(self, train: bool, batch_sampler=None, seed: int = 0, pin_memory: bool = False,
               split: Split | None = None, device: torch.device | str | None = None) -> TensorLoader | FileLoader:
        """A loader over one split (training or test, or ``split`` for evaluation), with the given
        batch sampler or the default one; in-memory data is held on ``device`` (default: the CPU), image files
        are read into pinned memory with ``pin_memory``."""
        split = split if split is not None else self.train if train else self.test
        if batch_sampler is None:
            size = self.loading.batch_size if train else self.loading.eval_batch_size
            batch_sampler = EpochBatchSampler(len(split), size, seed, shuffle=train)
        if isinstance(split, ArraySplit):
            return TensorLoader(split, batch_sampler, device)
        transform = file_transforms(self.image_size, train, self.loading.file_augment, self.augment.padding,
                                    self.augment.flip)
        workers = self.loading.num_workers
        if workers is None:  # the node's CPUs are shared by the ranks torchrun started on it
            ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            workers = min(8, max(1, (os.cpu_count() or 1) // ranks_here))
        dataset = ImageFileDataset(split, transform, seed if train else None)
        return FileLoader(dataset, batch_sampler, workers, pin_memory)

    def to_device(self, images: Tensor, train: bool, generator: torch.Generator | None) -> Tensor:
        """Finish a batch on the device: in-memory uint8 images are augmented and normalized, image files'
        (augmented by the loader's workers) normalized."""
        if not self.in_memory:
            return self.augment.normalize_files(images)
        return self.augment.train(images, generator) if train else self.augment.normalize(images)


FASHION_HINT = ", or install it with sudo apt-get install dataset-fashion-mnist"


def load_data(cfg: DataConfig) -> DataBundle:
    """Read both splits of ``cfg.name``, apply the subset limits, and set up augmentation."""
    info = DATASETS.get(cfg.name)
    root = Path(cfg.root or info.default_root).expanduser()
    if info.default_root and not root.exists() and not cfg.download:
        raise DataError(
            f"Dataset folder '{root}' for '{cfg.name}' does not exist. Set data.root to the folder "
            f"holding it{' (' + info.layout_hint + ')' if info.layout_hint else ''}"
            f"{FASHION_HINT if cfg.name == 'fashion-mnist' else ''}."
        )
    train = info.reader(root, True, cfg.download)
    _require_every_class(train, cfg.name, root)
    picked = stratified_indices(train.labels, cfg.train_limit or len(train), cfg.subset_seed)
    validation = pick_validation(train, picked, cfg.val_size, cfg.subset_seed)
    if validation is not None:  # the test split is not even read: settings are chosen on validation images
        picked, test = validation
    else:
        test = info.reader(root, False, False)
        if cfg.test_limit is not None:
            test = test.subset(stratified_indices(test.labels, cfg.test_limit, cfg.subset_seed))
    if cfg.train_limit is not None or validation is not None:
        train = train.subset(picked)
    for split, which in ((train, "training"), (test, "test")):
        if len(split) == 0:
            raise DataError(f"Dataset '{cfg.name}' under '{root}' has an empty {which} split.")
    skipped: list[str] = []
    if cfg.skip_bad_files and isinstance(train, FileSplit):
        train, test, skipped = _skip_bad_files(train, test)
    train, holdout = split_holdout(train, cfg.holdout, cfg.subset_seed)
    num_classes = len(train.classes)
    if isinstance(train, ArraySplit):
        in_channels, image_size = train.images.shape[1], train.images.shape[-1]
    else:
        in_channels, image_size = 3, cfg.image_size or info.image_size
    mean, std = info.mean, info.std
    padding = crop_padding_for(image_size) if cfg.crop_padding is None else cfg.crop_padding
    flip = info.flip if cfg.flip is None else cfg.flip
    augment = BatchAugment(mean, std, padding, flip, cfg.augment == "standard")
    return DataBundle(cfg.name, train, test, num_classes, in_channels, image_size, augment, Loading.of(cfg), holdout,
                      "validation" if validation is not None else "test", skipped)


def _skip_bad_files(train: FileSplit, test: FileSplit) -> tuple[FileSplit, FileSplit, list[str]]:
    """Both splits less the files that do not decode (data.skip_bad_files), and a line for each left out."""
    from aikd.data.check import find_bad_files, without

    skipped = []
    for name, split in (("training", train), ("test", test)):
        bad = find_bad_files(split)
        for path, problem in bad:
            skipped.append(f"{path} ({name} split): {problem}")
        if bad:
            kept = without(split, bad)
            if name == "training":
                train = kept
            else:
                test = kept
    if skipped:
        print(f"aikd: data.skip_bad_files: left out {len(skipped)} image files that do not decode:\n  "
              + "\n  ".join(skipped), file=sys.stderr, flush=True)
    return train, test, skipped


def pick_validation(train: Split, picked: Tensor, size: int, seed: int) -> tuple[Tensor, Split] | None:
    """(training indices left, validation split) for ``data.val_size`` images; None when it is 0.

    The validation images are a stratified pick among the training images that ``picked`` (the
    train_limit subset) leaves out, so a run on validation trains on exactly the images of the
    final run. Where too few are left out (no train_limit), they are carved out of ``picked``.
    The pick depends on ``seed`` (data.subset_seed) only: every method is chosen on the same images.
    """
    if size == 0:
        return None
    unused = torch.ones(len(train), dtype=torch.bool)
    unused[picked] = False
    pool = torch.nonzero(unused).flatten()
    if len(pool) < size:
        pool, carve = picked, True
    else:
        carve = False
    if size >= len(pool):
        raise DataError(f"data.val_size={size} leaves no training images: the training split has "
                        f"{len(train)} images and the training subset {len(picked)}.")
    chosen = pool[stratified_indices(train.labels[pool], size, seed + 2)]
    if carve:
        keep = torch.ones(len(train), dtype=torch.bool)
        keep[chosen] = False
        picked = picked[keep[picked]]
    return picked, train.subset(chosen)


def split_holdout(train: Split, fraction: float, seed: int) -> tuple[Split, Split | None]:
    """Withhold a stratified ``fraction`` of the training split; (train, None) when it is 0.

    The held-out pick depends on ``seed`` (data.subset_seed) only, so every method
    and training seed is calibrated on the same images.
    """
    size = round(fraction * len(train))
    if size == 0:
        return train, None
    if size >= len(train):
        raise DataError(f"data.holdout={fraction} leaves no training images out of {len(train)}.")
    held = stratified_indices(train.labels, size, seed + 1)
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[held] = False
    return train.subset(torch.nonzero(keep).flatten()), train.subset(held)


def _require_every_class(train: Split, name: str, root: Path) -> None:
    """A class without training images cannot be learned and skews every metric: refuse it by name.

    Checked for image-file datasets, whose class list comes from folders or split files; the
    in-memory sets have fixed class lists that their readers already check labels against.
    """
    if not isinstance(train, FileSplit):
        return
    counts = torch.bincount(train.labels, minlength=len(train.classes))
    empty = [train.classes[i] for i in torch.nonzero(counts == 0).flatten().tolist()]
    if empty:
        shown = ", ".join(f"'{c}'" for c in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        verb = "class {} has" if len(empty) == 1 else "classes {} have"
        raise DataError(f"Dataset '{name}' under '{root}': {verb.format(shown)} no training images. Add images, "
                        f"or remove the class from the dataset's class list (its folder or split-file entries).")
