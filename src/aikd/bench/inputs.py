"""Input pipeline: aikd's data path against the textbook torchvision one, on the same files.

Both sides read real file formats written (or found) in a temporary folder: Fashion-MNIST's IDX files and
CIFAR-100's python pickles. aikd reads them with :func:`aikd.data.load_data` and serves augmented,
normalized batches through its training loader and :meth:`DataBundle.to_device` (one tensor op per batch).
The reference is what the methods' official codes do: a ``torchvision.datasets`` dataset with per-image PIL
transforms (RandomCrop with padding, RandomHorizontalFlip, ToTensor, Normalize) in a ``DataLoader``, at its
best worker count on this machine. Worker start-up and the first batch are outside every timed window.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from aikd.data.augment import crop_padding_for
from aikd.data.loaders import DataBundle, load_data
from aikd.data.readers import DATASETS, FASHION_MNIST_ROOT
from aikd.data.settings import DataConfig

Batches = Generator[tuple[Tensor, Tensor], None, None]  # (augmented, normalized float images, labels), forever

FASHION_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")
FILE_FORMATS = {"fashion-mnist": "IDX (ubyte)", "cifar100": "CIFAR-100 python pickle"}


# ---------------------------------------------------------------- the files both sides read


def write_idx(path: Path, array: np.ndarray) -> None:
    """An unsigned-byte IDX file: the MNIST family's format (magic 0x0000 08 ndim, big-endian sizes, data)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def fashion_mnist_files(root: Path, source: Path | None = Path(FASHION_MNIST_ROOT),
                        synthetic_train: int = 10_000) -> str:
    """Put Fashion-MNIST's four unzipped IDX files in ``root/FashionMNIST/raw/``; return where they came from.

    That folder is what ``torchvision.datasets.FashionMNIST`` requires, and aikd's reader finds the files there
    too, so both sides read the very same files. They are Debian's real ones (decompressed) when ``source``
    holds them, else random images in the same format (``synthetic_train`` training images, a tenth as many
    test images).
    """
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    if source is not None and all((source / f"{stem}.gz").is_file() for stem in FASHION_STEMS):
        for stem in FASHION_STEMS:
            with gzip.open(source / f"{stem}.gz") as packed, open(raw / stem, "wb") as unpacked:
                shutil.copyfileobj(packed, unpacked)
        return f"Fashion-MNIST from {source}"
    rng = np.random.default_rng(0)
    for prefix, count in (("train", synthetic_train), ("t10k", max(10, synthetic_train // 10))):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28), dtype=np.uint8))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(count, dtype=np.uint8) % 10)
    return "random images in Fashion-MNIST's IDX format"


class _Python2Pickler(pickle._Pickler):
    """Writes ``bytes`` as Python 2 ``str`` opcodes, as in the official CIFAR files (pickled by Python 2).

    Readers load those as ``bytes`` with ``encoding="bytes"`` (aikd, the CIFAR page's recipe) and as ``str``
    with ``encoding="latin1"`` (torchvision). Python 3's own protocol-2 bytes would not load as ``str``, and
    torchvision would then miss the ``'data'`` key. The pure-Python pickler is the one whose opcodes can be
    chosen per type.
    """

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def save_python2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + len(obj).to_bytes(4, "little") + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def _write_python2_pickle(path: Path, obj: dict[bytes, Any]) -> None:
    with open(path, "wb") as fh:
        _Python2Pickler(fh, protocol=2).dump(obj)


def write_cifar100_files(root: Path, train_images: int = 10_000, test_images: int = 1_000, seed: int = 0) -> Path:
    """Random images in CIFAR-100's official python layout: ``root/cifar-100-python/{train,test,meta}``.

    Each split is a dict with b'data' (uint8, N x 3072, channel-major rows), b'fine_labels',
    b'coarse_labels', b'filenames' and b'batch_label'; meta holds b'fine_label_names' and
    b'coarse_label_names'. Returns the folder.
    """
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_images), ("test", test_images)):
        fine = [i % 100 for i in range(count)]
        _write_python2_pickle(folder / split, {
            b"filenames": [f"image_{i:06d}.png".encode() for i in range(count)],
            b"batch_label": f"{split}ing batch 1 of 1".encode(),
            b"fine_labels": fine,
            b"coarse_labels": [label // 5 for label in fine],
            b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
        })
    _write_python2_pickle(folder / "meta", {
        b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)],
    })
    return folder


# ---------------------------------------------------------------- the two pipelines


def _written_cifar100_class() -> type:
    from torchvision.datasets import CIFAR100

    class WrittenCifar100(CIFAR100):
        """CIFAR-100 read exactly as torchvision reads it, without the md5 check of the official archive.

        The files written here hold other images, so their checksums differ; with no md5, torchvision only
        checks that each file exists.
        """

        train_list: ClassVar[list] = [["train", None]]
        test_list: ClassVar[list] = [["test", None]]
        meta: ClassVar[dict] = {"filename": "meta", "key": "fine_label_names", "md5": None}

    return WrittenCifar100


def textbook_transform(name: str, size: int):
    """RandomCrop(padding) + RandomHorizontalFlip + ToTensor + Normalize, per PIL image, with aikd's statistics."""
    from torchvision import transforms as T

    info = DATASETS.get(name)
    return T.Compose([T.RandomCrop(size, padding=crop_padding_for(size)), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(info.mean, info.std)])


def torchvision_dataset(name: str, root: Path) -> Dataset:
    """The training split of ``name`` under ``root``, read by torchvision's own dataset class."""
    from torchvision.datasets import FashionMNIST

    if name == "fashion-mnist":
        return FashionMNIST(str(root), train=True, download=False, transform=textbook_transform(name, 28))
    if name == "cifar100":
        return _written_cifar100_class()(str(root), train=True, download=False,
                                         transform=textbook_transform(name, 32))
    raise ValueError(f"no torchvision reference for dataset '{name}'")


def aikd_bundle(name: str, root: Path, batch_size: int) -> DataBundle:
    """The dataset read by aikd's own reader, exactly as a training run would (``data.name``, ``data.root``)."""
    return load_data(DataConfig(name=name, root=str(root), batch_size=batch_size))


def aikd_batches(bundle: DataBundle, seed: int = 0) -> Batches:
    """aikd's training loader plus on-device augmentation and normalization, epoch after epoch."""
    loader = bundle.loader(train=True, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for images, labels, _ in loader:
            yield bundle.to_device(images, train=True, generator=generator), labels
        epoch += 1


def torchvision_batches(dataset: Dataset, batch_size: int, workers: int, seed: int = 0) -> Batches:
    """A shuffling DataLoader over ``dataset``, epoch after epoch; workers persist across epochs."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed))
    while True:
        yield from loader


def worker_counts() -> list[int]:
    """DataLoader worker counts worth trying here: 0, 1, 2, then powers of two up to the CPU count."""
    cpus = os.cpu_count() or 1
    return [w for w in (0, 1, 2, 4, 8, 16) if w <= cpus]


# ---------------------------------------------------------------- measurements


def images_per_second(batches: Batches, count: int, min_seconds: float = 0.0) -> float:
    """Images/s over at least ``count`` batches and ``min_seconds``; the first batch (start-up) is not timed."""
    next(batches)
    start, images, done = time.perf_counter(), 0, 0
    while done < count or time.perf_counter() - start < min_seconds:
        images += len(next(batches)[0])
        done += 1
    return images / (time.perf_counter() - start)


def _closing(batches: Batches, measure: Callable[[Batches], float]) -> float:
    """Run ``measure(batches)``, then close the stream so a DataLoader's workers stop now, not at exit."""
    try:
        return measure(batches)
    finally:
        batches.close()


def compare_loaders(name: str, root: Path, source: str, batches: int, workers: list[int],
                    batch_size: int = 128) -> dict[str, Any]:
    """Augmented, normalized training images/s of aikd's path and of torchvision's at each worker count."""
    bundle = aikd_bundle(name, root, batch_size)
    dataset = torchvision_dataset(name, root)
    ours = _closing(aikd_batches(bundle), lambda b: images_per_second(b, batches, min_seconds=0.5))
    theirs = {w: _closing(torchvision_batches(dataset, batch_size, w), lambda b: images_per_second(b, batches))
              for w in workers}
    best = max(theirs, key=theirs.__getitem__)
    return {"dataset": name, "format": FILE_FORMATS[name], "source": source,
            "shape": "x".join(str(d) for d in bundle.train.images.shape[1:]), "batch": batch_size,
            "train_images": {"aikd": len(bundle.train), "torchvision": len(dataset)},
            "aikd_images_per_s": ours, "torchvision_images_per_s_by_workers": {str(w): v for w, v in theirs.items()},
            "torchvision_workers": best, "torchvision_images_per_s": theirs[best],
            "loader_speedup": ours / theirs[best]}


def training_images_per_second(batches: Batches, model: torch.nn.Module, steps: int) -> float:
    """Images/s of CE training steps (forward, backward, SGD step) fed by ``batches``; the first is not timed."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()

    def train_step(images: Tensor, labels: Tensor) -> None:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    train_step(*next(batches))
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        batch_images, labels = next(batches)
        train_step(batch_images, labels)
        images += len(batch_images)
    return images / (time.perf_counter() - start)


def compare_end_to_end(name: str, root: Path, steps: int, workers: int, batch_size: int = 128,
                       model_name: str = "small_cnn") -> dict[str, Any]:
    """The same CE training of ``model_name`` fed once by each loader (torchvision at ``workers`` workers)."""
    from aikd.models import build_model

    bundle = aikd_bundle(name, root, batch_size)
    feeds = {"aikd": lambda: aikd_batches(bundle),
             "torchvision": lambda: torchvision_batches(torchvision_dataset(name, root), batch_size, workers)}
    rates = {}
    for side, feed in feeds.items():
        torch.manual_seed(0)  # the same initial weights for both
        model = build_model(model_name, bundle.num_classes, bundle.in_channels, bundle.image_size)
        rates[side] = _closing(feed(), lambda b, m=model: training_images_per_second(b, m, steps))
    return {"dataset": name, "model": model_name, "batch": batch_size, "steps": steps,
            "torchvision_workers": workers, "aikd_images_per_s": rates["aikd"],
            "torchvision_images_per_s": rates["torchvision"], "speedup": rates["aikd"] / rates["torchvision"]}
