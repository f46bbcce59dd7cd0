"""Readers for every supported dataset, each in the layout its authors publish.

Each reader takes the dataset's root folder and the split (train or test) and
returns an :class:`~aikd.data.splits.ArraySplit` (small images, held in memory)
or a :class:`~aikd.data.splits.FileSplit` (image files decoded by workers).
Missing or malformed files raise :class:`~aikd.errors.DataError` naming the
file and the fix.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import pickle
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from aikd.data.splits import ArraySplit, FileSplit, Split
from aikd.errors import DataError
from aikd.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """How to read a dataset and the defaults that go with it."""

    reader: Callable[[Path, bool, bool], Split]  # (root, train, download)
    default_root: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int  # training resolution used by the paper for this set
    flip: bool = True  # horizontal flips preserve the label
    layout_hint: str = ""  # what the root folder must contain, for error messages


DATASETS: Registry[DatasetInfo] = Registry("dataset", "data.name")


def _require(path: Path, dataset: str, hint: str) -> Path:
    if not path.exists():
        raise DataError(
            f"Dataset '{dataset}': '{path}' is missing. {hint} "
            f"Point data.root at the folder that holds it."
        )
    return path


# ---------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Any failure while a file is read or checked becomes a DataError naming the file and the cause.

    The readers raise DataError with a precise message where they can tell what is wrong; a damaged file
    can still break the parsing underneath in ways no check foresees (a flipped byte in a pickle's opcode
    stream, a size that asks for more memory than there is), and the user must still learn which file it was.
    """
    try:
        yield
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"Cannot read '{path}': it is damaged or not in the expected format "
                        f"({type(err).__name__}: {str(err)[:200]}).") from None


def download_with_torchvision(dataset: Callable[..., Any], root: Path, train: bool, name: str) -> None:
    """``data.download=true``: fetch the files with torchvision; no network (or any failure of the download) is
    one DataError naming the dataset, the folder and the cause, not urllib's traceback."""
    try:
        dataset(str(root), train=train, download=True)
    except Exception as err:
        cause = getattr(err, "reason", None) or err
        raise DataError(f"Cannot download {name} into '{root}' (data.download=true): {type(err).__name__}: "
                        f"{' '.join(str(cause).split())[:200]}. Without a network, copy the files there and leave "
                        f"data.download off.") from None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): the MNIST family's array format."""
    with reading(path):
        return _read_idx(path)


def _read_idx(path: Path) -> np.ndarray:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(f"Cannot read IDX file '{path}': {err}.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"'{path}' is not an unsigned-byte IDX file (bad magic number).")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(shape)):
        raise DataError(
            f"IDX file '{path}' is truncated or padded: header says shape {shape}, "
            f"file holds {len(raw) - header} bytes of data."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path | None:
    for folder in (root, root / "FashionMNIST" / "raw"):
        for name in (f"{stem}.gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


def read_fashion_mnist(root: Path, train: bool, download: bool) -> ArraySplit:
    prefix = "train" if train else "t10k"
    paths = [_find_idx(root, f"{prefix}-{kind}-idx{n}-ubyte") for kind, n in (("images", 3), ("labels", 1))]
    if None in paths and download:
        from torchvision.datasets import FashionMNIST

        download_with_torchvision(FashionMNIST, root, train, "Fashion-MNIST")
        paths = [_find_idx(root, f"{prefix}-{k}-idx{n}-ubyte") for k, n in (("images", 3), ("labels", 1))]
    if None in paths:
        raise DataError(
            f"Fashion-MNIST files '{prefix}-images-idx3-ubyte.gz' and '{prefix}-labels-idx1-ubyte.gz' "
            f"are not in '{root}'. Install Debian's copy with "
            f"'sudo apt-get install dataset-fashion-mnist' (files land in {FASHION_MNIST_ROOT}), "
            f"or, on a machine with internet, set data.download=true to fetch them with torchvision."
        )
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(
            f"Fashion-MNIST files in '{root}' disagree: {images.shape} images, {labels.shape} labels."
        )
    return _array_split(images[:, None], labels, FASHION_CLASSES, paths[1])


def _array_split(images: np.ndarray, labels: np.ndarray, classes: list[str], source: Path | str
                 ) -> ArraySplit:
    labels_t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    bad = (labels_t < 0) | (labels_t >= len(classes))
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise DataError(
            f"'{source}': label {int(labels_t[i])} of sample {i} is outside 0..{len(classes) - 1}."
        )
    return ArraySplit(torch.from_numpy(np.array(images, copy=True)), labels_t, classes)


DATASETS.register("fashion-mnist")(DatasetInfo(
    read_fashion_mnist, FASHION_MNIST_ROOT, (0.2860,), (0.3530,), 28,
    layout_hint="train-images-idx3-ubyte.gz and friends",
))


# ---------------------------------------------------------------- digits (scikit-learn)

def read_digits(root: Path, train: bool, download: bool) -> ArraySplit:
    """scikit-learn's 8x8 digits: a fixed stratified 80/20 split (seed 0)."""
    from sklearn.datasets import load_digits

    from aikd.data.splits import stratified_indices

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    test_idx = stratified_indices(labels, len(labels) // 5, seed=0)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[test_idx] = False
    keep = torch.nonzero(mask if train else ~mask).flatten().numpy()
    return _array_split(images[keep], bunch.target[keep], [str(d) for d in range(10)], "digits")


DATASETS.register("digits")(DatasetInfo(read_digits, "", (0.3053,), (0.3759,), 8, flip=False))


# ---------------------------------------------------------------- CIFAR

class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches while refusing anything but numpy arrays.

    The official CIFAR files are pickles; a plain ``pickle.load`` would run any
    code a tampered file names. This unpickler allows only the globals that
    rebuild numpy arrays, so such a file fails instead of executing.
    """

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
        ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR file")


def _load_cifar_pickle(path: Path) -> dict:
    with reading(path):
        return _unpickle_cifar(path)


def _unpickle_cifar(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            data = _ArrayOnlyUnpickler(io.BytesIO(fh.read()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise DataError(f"'{path}' is not a valid CIFAR python batch: {err}.") from None
    if not isinstance(data, dict):
        raise DataError(f"'{path}' is not a valid CIFAR python batch: expected a dict.")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def _cifar_folder(root: Path, name: str, dataset: str) -> Path:
    folder = root if (root / ("test_batch" if name.startswith("cifar-10-") else "test")).is_file() \
        else root / name
    return _require(folder, dataset, f"Expected the official python version ('{name}' folder).")


def _cifar_array(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _load_cifar_pickle(_require(path, path.parent.name, "A CIFAR batch file is missing."))
    with reading(path):
        if "data" not in batch or label_key not in batch:
            raise DataError(f"'{path}' lacks the '{'data' if 'data' not in batch else label_key}' entry.")
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"'{path}': 'data' is {data.dtype} of shape {data.shape}, expected uint8 (N, 3072).")
        labels = np.asarray(batch[label_key])
        if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"'{path}': '{label_key}' holds {labels.shape} {labels.dtype} values for "
                            f"{len(data)} images; expected one integer label per image.")
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if len(bad):
            raise DataError(f"'{path}': label {int(labels[bad[0]])} of image {int(bad[0])} in this file is "
                            f"outside 0..{num_classes - 1}.")
        return data.reshape(-1, 3, 32, 32), labels


def _cifar_classes(path: Path, key: str, count: int) -> list[str]:
    if path.is_file():
        names = _load_cifar_pickle(path).get(key)
        if names is not None:
            with reading(path):
                names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
                if len(names) != count:
                    raise DataError(f"'{path}': '{key}' names {len(names)} classes, expected {count}.")
                return names
    return [str(i) for i in range(count)]


def read_cifar10(root: Path, train: bool, download: bool) -> ArraySplit:
    if download:
        from torchvision.datasets import CIFAR10

        download_with_torchvision(CIFAR10, root, train, "CIFAR-10")
    folder = _cifar_folder(root, "cifar-10-batches-py", "cifar10")
    files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    parts = [_cifar_array(folder / f, "labels", 10) for f in files]
    classes = _cifar_classes(folder / "batches.meta", "label_names", 10)
    return _array_split(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                        classes, folder)


def read_cifar100(root: Path, train: bool, download: bool) -> ArraySplit:
    if download:
        from torchvision.datasets import CIFAR100

        download_with_torchvision(CIFAR100, root, train, "CIFAR-100")
    folder = _cifar_folder(root, "cifar-100-python", "cifar100")
    images, labels = _cifar_array(folder / ("train" if train else "test"), "fine_labels", 100)
    classes = _cifar_classes(folder / "meta", "fine_label_names", 100)
    return _array_split(images, labels, classes, folder)


DATASETS.register("cifar10")(DatasetInfo(
    read_cifar10, "data/cifar10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 32))
DATASETS.register("cifar100")(DatasetInfo(
    read_cifar100, "data/cifar100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 32))


# ---------------------------------------------------------------- image-file datasets

def _read_lines(path: Path, dataset: str, hint: str) -> list[str]:
    _require(path, dataset, hint)
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _file_split(dataset: str, items: list[tuple[Path, str]], classes: list[str], source: Path
                ) -> FileSplit:
    """Build a FileSplit from (path, class name) pairs, checking every file exists."""
    index = {c: i for i, c in enumerate(classes)}
    missing = [p for p, _ in items if not p.is_file()]
    if missing:
        raise DataError(
            f"Dataset '{dataset}': {len(missing)} image(s) listed in '{source}' are missing, "
            f"first '{missing[0]}'. Re-extract the archive under data.root."
        )
    unknown = sorted({c for _, c in items if c not in index})
    if unknown:
        raise DataError(f"Dataset '{dataset}': '{source}' names unknown class '{unknown[0]}'.")
    labels = torch.tensor([index[c] for _, c in items], dtype=torch.int64)
    return FileSplit([p for p, _ in items], labels, classes)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_tiny_imagenet(root: Path, train: bool, download: bool) -> FileSplit:
    """Tiny-ImageNet-200: train/<wnid>/images/*.JPEG; val/ with val_annotations.txt (the test split)."""
    name = "tiny-imagenet"
    wnids_file = root / "wnids.txt"
    if wnids_file.is_file():
        classes = _read_lines(wnids_file, name, "")
    else:
        classes = sorted(p.name for p in _require(root / "train", name, "Expected train/<wnid>/images/.")
                         .iterdir() if p.is_dir())
    if train:
        items = [(p, c) for c in classes
                 for p in _images_in(_require(root / "train" / c, name, f"Class folder of '{c}'."))]
        return _file_split(name, items, classes, root / "train")
    ann = root / "val" / "val_annotations.txt"
    lines = _read_lines(ann, name, "Expected val/val_annotations.txt (file, wnid, box).")
    items = []
    for n, line in enumerate(lines, 1):
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) < 2:
            raise DataError(f"'{ann}' line {n} should be 'FILE<TAB>WNID...', got {line!r}.")
        items.append((root / "val" / "images" / parts[0], parts[1]))
    return _file_split(name, items, classes, ann)


def read_cub200(root: Path, train: bool, download: bool) -> FileSplit:
    """CUB-200-2011 with its official images.txt / image_class_labels.txt / train_test_split.txt."""
    name = "cub200"
    base = root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root
    hint = "Expected the CUB_200_2011 folder with its .txt index files."
    paths = dict(line.split(" ", 1) for line in _read_lines(base / "images.txt", name, hint))
    labels = dict(line.split() for line in _read_lines(base / "image_class_labels.txt", name, hint))
    split = dict(line.split() for line in _read_lines(base / "train_test_split.txt", name, hint))
    classes_file = base / "classes.txt"
    if classes_file.is_file():
        classes = [line.split(" ", 1)[1] for line in _read_lines(classes_file, name, hint)]
    else:
        classes = [str(i) for i in sorted({int(v) for v in labels.values()})]
    by_number = {str(i + 1): c for i, c in enumerate(classes)}
    items = []
    for image_id, rel in paths.items():
        if image_id not in split or image_id not in labels:
            raise DataError(f"Dataset 'cub200': image id {image_id} of '{base / 'images.txt'}' has "
                            f"no entry in train_test_split.txt or image_class_labels.txt.")
        if (split[image_id] == "1") == train:
            if labels[image_id] not in by_number:
                raise DataError(f"Dataset 'cub200': class {labels[image_id]} of image {image_id} "
                                f"is outside 1..{len(classes)}.")
            items.append((base / "images" / rel, by_number[labels[image_id]]))
    return _file_split(name, items, classes, base / "train_test_split.txt")


def read_stanford_dogs(root: Path, train: bool, download: bool) -> FileSplit:
    """Stanford Dogs: train_list.mat / test_list.mat (file_list, labels 1..120) and Images/."""
    from scipy.io import loadmat

    name = "stanford-dogs"
    mat_path = _require(root / ("train_list.mat" if train else "test_list.mat"), name,
                        "Expected the official lists.tar contents (train_list.mat, test_list.mat).")
    try:
        mat = loadmat(str(mat_path))
    except Exception as err:  # scipy raises several types for bad files
        raise DataError(f"Cannot read '{mat_path}' as a MATLAB file: {err}.") from None
    if "file_list" not in mat or "labels" not in mat:
        raise DataError(f"'{mat_path}' lacks 'file_list' or 'labels'.")
    files = [str(np.asarray(f).flatten()[0]) for f in mat["file_list"].flatten()]
    numbers = [int(v) for v in np.asarray(mat["labels"]).flatten()]
    classes = sorted({f.split("/")[0] for f in files}) if train else None
    if classes is None:  # class names come from the folders, numbered as the train list
        classes = sorted(p.name for p in _require(root / "Images", name, "Expected Images/.")
                         .iterdir() if p.is_dir())
    if any(not 1 <= n <= len(classes) for n in numbers):
        bad = next(n for n in numbers if not 1 <= n <= len(classes))
        raise DataError(f"'{mat_path}': label {bad} is outside 1..{len(classes)}.")
    items = [(root / "Images" / f, classes[n - 1]) for f, n in zip(files, numbers, strict=True)]
    return _file_split(name, items, classes, mat_path)


def read_mit67(root: Path, train: bool, download: bool) -> FileSplit:
    """MIT Indoor-67: TrainImages.txt / TestImages.txt of 'class/file.jpg' under Images/."""
    name = "mit67"
    listing = root / ("TrainImages.txt" if train else "TestImages.txt")
    lines = _read_lines(listing, name, "Expected TrainImages.txt and TestImages.txt beside Images/.")
    images = root / "Images"
    classes = sorted(p.name for p in _require(images, name, "Expected Images/<class>/.").iterdir()
                     if p.is_dir())
    items = [(images / rel, rel.split("/")[0]) for rel in lines]
    return _file_split(name, items, classes, listing)


def read_fgvc_aircraft(root: Path, train: bool, download: bool) -> FileSplit:
    """FGVC-Aircraft (variant level, 100 classes): images_variant_{trainval,test}.txt."""
    name = "fgvc-aircraft"
    base = root / "data" if (root / "data").is_dir() else root
    listing = base / ("images_variant_trainval.txt" if train else "images_variant_test.txt")
    hint = "Expected the fgvc-aircraft-2013b/data folder with images/ and the split files."
    pairs = [line.split(" ", 1) for line in _read_lines(listing, name, hint)]
    if any(len(p) != 2 for p in pairs):
        raise DataError(f"'{listing}' has a line without a variant name.")
    variants_file = base / "variants.txt"
    if variants_file.is_file():
        classes = _read_lines(variants_file, name, hint)
    else:
        trainval = base / "images_variant_trainval.txt"
        classes = sorted({ln.split(" ", 1)[1] for ln in _read_lines(trainval, name, hint)})
    items = [(base / "images" / f"{image_id}.jpg", variant) for image_id, variant in pairs]
    return _file_split(name, items, classes, listing)


def read_imagefolder(root: Path, train: bool, download: bool) -> FileSplit:
    """A generic tree: root/train/<class>/* and root/test/<class>/* (or root/val/)."""
    name = "imagefolder"
    split_dir = root / "train"
    if not train:
        split_dir = root / "test" if (root / "test").is_dir() else root / "val"
    _require(split_dir, name, "Expected train/<class>/ and test/<class>/ (or val/<class>/).")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    items = [(p, d.name) for d in sorted(split_dir.iterdir()) if d.is_dir() for p in _images_in(d)]
    if not items:
        raise DataError(f"Dataset 'imagefolder': no images under '{split_dir}'.")
    return _file_split(name, items, classes, split_dir)


for _name, _reader, _root, _size in (
    ("tiny-imagenet", read_tiny_imagenet, "data/tiny-imagenet-200", 64),
    ("cub200", read_cub200, "data/CUB_200_2011", 224),
    ("stanford-dogs", read_stanford_dogs, "data/stanford-dogs", 224),
    ("mit67", read_mit67, "data/mit67", 224),
    ("fgvc-aircraft", read_fgvc_aircraft, "data/fgvc-aircraft-2013b", 224),
    ("imagefolder", read_imagefolder, "data/imagefolder", 224),
):
    DATASETS.register(_name)(DatasetInfo(_reader, _root, IMAGENET_MEAN, IMAGENET_STD, _size))
