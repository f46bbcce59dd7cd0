"""Dataset readers, splits, loaders and augmentation, checked against files in the real on-disk layouts.

Every dataset is written into ``tmp_path`` the way its authors publish it (IDX
for Fashion-MNIST, python pickles for CIFAR, MATLAB lists for Stanford Dogs,
text indexes plus JPEG/PNG files for the fine-grained sets) and read back
through :func:`aikd.data.load_data` and the individual readers. Expectations are
computed independently of the code under test.
"""

from __future__ import annotations

import builtins
import gzip
import os
import pickle
import struct
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aikd.config import DataConfig, load_config
from aikd.data import ArraySplit, EpochBatchSampler, FileSplit, load_data, stratified_indices
from aikd.data.augment import BatchAugment, crop_padding_for, random_crop_flip
from aikd.data.loaders import DataBundle, ImageFileDataset, Loading
from aikd.data.readers import (
    FASHION_CLASSES,
    read_cifar10,
    read_cifar100,
    read_fashion_mnist,
    read_idx,
)
from aikd.errors import ConfigError, DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ===================================================================== helpers


def largest_remainder(counts: list[int], limit: int) -> list[list[int]]:
    """Every per-class allocation that the largest-remainder method allows (ties give several)."""
    n = sum(counts)
    exact = [Fraction(c * limit, n) for c in counts]
    floors = [int(e) for e in exact]
    extra = limit - sum(floors)
    fracs = [e - f for e, f in zip(exact, floors, strict=True)]
    # The 'extra' largest remainders must get +1; those tied with the cut-off may go either way.
    cutoff = sorted(fracs, reverse=True)[extra - 1] if extra else None
    sure = [i for i, f in enumerate(fracs) if cutoff is not None and f > cutoff]
    tied = [i for i, f in enumerate(fracs) if cutoff is not None and f == cutoff]
    options = []
    for pick in combinations(tied, extra - len(sure)) if extra else [()]:
        quota = list(floors)
        for i in [*sure, *pick]:
            quota[i] += 1
        options.append(quota)
    return options


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode an unsigned-byte IDX file: magic 0x0000 08 <ndim>, big-endian int32 dims, then data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_image(path: Path, rng: np.random.Generator, size: tuple[int, int] = (8, 8),
                grey: bool = False) -> tuple[int, int, int]:
    """Write a solid random-colour image (JPEG or PNG by suffix) and return its decoded RGB colour."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if grey:
        img = Image.new("L", size, int(rng.integers(30, 226)))
    else:
        img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(30, 226, 3)))
    if path.suffix.lower() == ".png":
        img.save(path, format="PNG")
    else:
        img.save(path, format="JPEG", quality=95)
    with Image.open(path) as back:
        assert back.mode == ("L" if grey else "RGB")
        rgb = np.asarray(back.convert("RGB"))
    assert (rgb == rgb[0, 0]).all(), "a solid-colour test image should decode to a solid colour"
    return tuple(int(c) for c in rgb[0, 0])


@dataclass
class Layout:
    """A dataset written to disk and what a reader must make of it."""

    root: Path
    classes: list[str]
    train: dict[Path, str] = field(default_factory=dict)  # image -> class name
    test: dict[Path, str] = field(default_factory=dict)
    colours: dict[Path, tuple[int, int, int]] = field(default_factory=dict)
    grey: list[Path] = field(default_factory=list)
    listed: Path | None = None  # an image named by a split file (for the missing-image check)

    def add(self, which: dict[Path, str], path: Path, cls: str, rng: np.random.Generator,
            size: tuple[int, int] = (8, 8), grey: bool = False) -> None:
        self.colours[path] = write_image(path, rng, size, grey)
        which[path] = cls
        if grey:
            self.grey.append(path)


def build_tiny_imagenet(base: Path, rng: np.random.Generator) -> Layout:
    root = base / "tiny-imagenet-200"
    wnids = ["n02124075", "n01443537", "n04067472"]  # deliberately not sorted: wnids.txt order rules
    layout = Layout(root, wnids)
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\nn02124075\tEgyptian cat\n")
    for ci, wnid in enumerate(wnids):
        boxes = []
        for k in range(3):
            name = f"{wnid}_{k}.JPEG"
            size = (64, 64) if k == 2 else (8, 8)
            layout.add(layout.train, root / "train" / wnid / "images" / name, wnid, rng, size,
                       grey=(ci == 1 and k == 0))
            boxes.append(f"{name}\t0\t0\t7\t7")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(boxes) + "\n")
    annotations = []
    for k in range(5):
        wnid = wnids[(k * 2) % 3]
        name = f"val_{k}.JPEG"
        layout.add(layout.test, root / "val" / "images" / name, wnid, rng)
        annotations.append(f"{name}\t{wnid}\t{k}\t5\t60\t62")
    (root / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    write_image(root / "test" / "images" / "test_0.JPEG", rng)  # unlabelled official test set: unused
    layout.listed = root / "val" / "images" / "val_3.JPEG"
    return layout


def build_cub200(base: Path, rng: np.random.Generator) -> Layout:
    root = base / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    layout = Layout(base, classes)  # the parent folder (where the tarball was extracted)
    images, labels, split = [], [], []
    image_id = 0
    for ci, cls in enumerate(classes):
        bird = cls.split(".", 1)[1]
        for k in range(4):
            image_id += 1
            rel = f"{cls}/{bird}_{k:04d}_{100 + image_id}.jpg"
            is_train = k != 1
            layout.add(layout.train if is_train else layout.test, root / "images" / rel, cls, rng,
                       grey=(ci == 2 and k == 3))
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {ci + 1}")
            split.append(f"{image_id} {int(is_train)}")
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "classes.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    layout.listed = root / "images" / images[5].split(" ", 1)[1]
    return layout


def build_stanford_dogs(base: Path, rng: np.random.Generator) -> Layout:
    from scipy.io import savemat

    root = base / "stanford-dogs"
    breeds = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog"]
    layout = Layout(root, breeds)
    for which, per_breed, list_name in ((layout.train, 3, "train_list.mat"), (layout.test, 2, "test_list.mat")):
        entries = []
        for bi, breed in enumerate(breeds):
            wnid = breed.split("-", 1)[0]
            for k in range(per_breed):
                rel = f"{breed}/{wnid}_{(10 if which is layout.test else 0) + k + 1}.jpg"
                layout.add(which, root / "Images" / rel, breed, rng, grey=(bi == 0 and k == 0))
                entries.append((rel, bi + 1))
        order = rng.permutation(len(entries))
        entries = [entries[i] for i in order]
        n = len(entries)
        file_list = np.empty((n, 1), dtype=object)
        annotation_list = np.empty((n, 1), dtype=object)
        for i, (rel, _) in enumerate(entries):
            file_list[i, 0] = np.array([rel])
            annotation_list[i, 0] = np.array([rel[:-4]])
        labels = np.array([[lab] for _, lab in entries], dtype=np.float64)
        savemat(root / list_name, {"file_list": file_list, "annotation_list": annotation_list, "labels": labels})
    layout.listed = next(iter(layout.test))
    return layout


def build_mit67(base: Path, rng: np.random.Generator) -> Layout:
    root = base / "mit67"
    classes = ["airport_inside", "bakery", "kitchen"]
    layout = Layout(root, classes)
    train_lines, test_lines = [], []
    for ci, cls in enumerate(classes):
        for k in range(4):
            rel = f"{cls}/{cls}_{k:04d}.jpg"
            is_train = k < 3
            layout.add(layout.train if is_train else layout.test, root / "Images" / rel, cls, rng,
                       size=(12, 8), grey=(ci == 1 and k == 0))
            (train_lines if is_train else test_lines).append(rel)
    (root / "TrainImages.txt").write_text("\n".join(train_lines) + "\n")
    (root / "TestImages.txt").write_text("\n".join(test_lines) + "\n")
    layout.listed = root / "Images" / train_lines[4]
    return layout


def build_fgvc_aircraft(base: Path, rng: np.random.Generator) -> Layout:
    root = base / "fgvc-aircraft-2013b"
    data = root / "data"
    variants = ["707-320", "Cessna 172", "F/A-18", "A300B4"]  # variants.txt order, names with spaces and '/'
    layout = Layout(root, variants)
    trainval, test = [], []
    image_number = 34309
    for vi, variant in enumerate(variants):
        for k in range(3):
            image_id = f"{image_number:07d}"
            image_number += 1013
            is_train = k < 2
            layout.add(layout.train if is_train else layout.test, data / "images" / f"{image_id}.jpg", variant,
                       rng, grey=(vi == 3 and k == 0))
            (trainval if is_train else test).append(f"{image_id} {variant}")
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    (data / "images_variant_trainval.txt").write_text("\n".join(trainval) + "\n")
    (data / "images_variant_test.txt").write_text("\n".join(test) + "\n")
    (data / "images_family_trainval.txt").write_text("".join(f"{ln.split()[0]} Boeing 707\n" for ln in trainval))
    layout.listed = data / "images" / f"{test[1].split(' ', 1)[0]}.jpg"
    return layout


def build_imagefolder(base: Path, rng: np.random.Generator) -> Layout:
    root = base / "folder"
    classes = ["cat", "dog", "fox"]
    layout = Layout(root, classes)
    for ci, cls in enumerate(classes):
        for k in range(3):
            suffix = ".png" if k == 0 else ".jpg"
            layout.add(layout.train, root / "train" / cls / f"{cls}{k}{suffix}", cls, rng, grey=(ci == 0 and k == 0))
        if cls != "fox":  # a test split may lack a class
            layout.add(layout.test, root / "test" / cls / f"t_{cls}.png", cls, rng)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return layout


FILE_DATASETS = {
    "tiny-imagenet": build_tiny_imagenet,
    "cub200": build_cub200,
    "stanford-dogs": build_stanford_dogs,
    "mit67": build_mit67,
    "fgvc-aircraft": build_fgvc_aircraft,
    "imagefolder": build_imagefolder,
}

# Index files whose absence must be reported by name (relative to the layout root).
SPLIT_FILES = [
    ("tiny-imagenet", "val/val_annotations.txt"),
    ("cub200", "CUB_200_2011/images.txt"),
    ("cub200", "CUB_200_2011/image_class_labels.txt"),
    ("cub200", "CUB_200_2011/train_test_split.txt"),
    ("stanford-dogs", "train_list.mat"),
    ("stanford-dogs", "test_list.mat"),
    ("mit67", "TrainImages.txt"),
    ("mit67", "TestImages.txt"),
    ("fgvc-aircraft", "data/images_variant_trainval.txt"),
    ("fgvc-aircraft", "data/images_variant_test.txt"),
]


def file_cfg(name: str, root: Path, **extra) -> DataConfig:
    return DataConfig(name=name, root=str(root), image_size=32, num_workers=0, batch_size=4,
                      eval_batch_size=5, **extra)


def normalized(colour: tuple[int, int, int], mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    return torch.tensor([(c / 255.0 - m) / s for c, m, s in zip(colour, mean, std, strict=True)])


# ===================================================================== Fashion-MNIST (IDX)


def fashion_arrays(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def write_fashion(folder: Path, rng: np.random.Generator, compress: bool) -> dict[str, tuple[np.ndarray, ...]]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train": fashion_arrays(rng, 7), "t10k": fashion_arrays(rng, 5)}
    for prefix, (images, labels) in arrays.items():
        for stem, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            blob = idx_bytes(array)
            if compress:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(blob))
            else:
                (folder / stem).write_bytes(blob)
    return arrays


@pytest.mark.parametrize("layout", ["gzip", "raw", "torchvision"])
def test_fashion_mnist_idx_round_trip(tmp_path, layout):
    rng = np.random.default_rng(1)
    folder = tmp_path / "FashionMNIST" / "raw" if layout == "torchvision" else tmp_path
    arrays = write_fashion(folder, rng, compress=layout != "raw")
    bundle = load_data(DataConfig(name="fashion-mnist", root=str(tmp_path)))
    assert bundle.in_memory and bundle.in_channels == 1 and bundle.image_size == 28
    assert bundle.num_classes == 10 and bundle.train.classes == FASHION_CLASSES
    for split, (images, labels) in ((bundle.train, arrays["train"]), (bundle.test, arrays["t10k"])):
        assert isinstance(split, ArraySplit)
        assert split.images.dtype == torch.uint8
        assert tuple(split.images.shape) == (len(images), 1, 28, 28)
        assert np.array_equal(split.images[:, 0].numpy(), images)
        assert split.labels.dtype == torch.int64
        assert split.labels.tolist() == labels.tolist()


def test_read_idx_matches_header(tmp_path):
    rng = np.random.default_rng(2)
    for shape in [(4,), (3, 5), (2, 3, 4)]:
        array = rng.integers(0, 256, shape, dtype=np.uint8)
        raw_path, gz_path = tmp_path / f"a{len(shape)}", tmp_path / f"a{len(shape)}.gz"
        raw_path.write_bytes(idx_bytes(array))
        gz_path.write_bytes(gzip.compress(idx_bytes(array)))
        for path in (raw_path, gz_path):
            got = read_idx(path)
            assert got.shape == shape and got.dtype == np.uint8
            assert np.array_equal(got, array)


@pytest.mark.parametrize("damage", ["raw-short", "raw-long", "gz-truncated", "gz-corrupt"])
def test_damaged_idx_file_names_the_file(tmp_path, damage):
    rng = np.random.default_rng(3)
    write_fashion(tmp_path, rng, compress=damage.startswith("gz"))
    stem = "train-images-idx3-ubyte"
    path = tmp_path / (f"{stem}.gz" if damage.startswith("gz") else stem)
    blob = path.read_bytes()
    if damage == "raw-short":
        blob = blob[:-1]
    elif damage == "raw-long":
        blob = blob + b"\x00"
    elif damage == "gz-truncated":
        blob = blob[: len(blob) // 2]
    else:  # keep the 10-byte gzip header, make the first deflate block's type the reserved one (0b11)
        blob = blob[:10] + b"\xff" + blob[11:]
    path.write_bytes(blob)
    with pytest.raises(DataError) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    with pytest.raises(DataError) as info:
        load_data(DataConfig(name="fashion-mnist", root=str(tmp_path)))
    assert str(path) in str(info.value)


def test_idx_bad_magic_and_disagreeing_counts(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(struct.pack(">HBB", 0, 0x0D, 1) + struct.pack(">I", 1) + b"\x00\x00\x00\x00")  # float IDX
    with pytest.raises(DataError, match="magic"):
        read_idx(bad)

    rng = np.random.default_rng(4)
    write_fashion(tmp_path / "fm", rng, compress=True)
    images, _ = fashion_arrays(rng, 7)
    (tmp_path / "fm" / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))  # 7 vs 5 labels
    with pytest.raises(DataError, match="disagree"):
        read_fashion_mnist(tmp_path / "fm", False, False)


def test_fashion_mnist_out_of_range_label(tmp_path):
    rng = np.random.default_rng(5)
    write_fashion(tmp_path, rng, compress=False)
    labels = np.array([0, 1, 2, 10, 3, 4, 5], dtype=np.uint8)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(DataError, match="label 10 of sample 3"):
        read_fashion_mnist(tmp_path, True, False)


def test_fashion_mnist_missing_folder_points_to_apt(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_data(DataConfig(name="fashion-mnist", root=str(missing)))
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    assert str(missing) in str(info.value)
    # An existing folder without the files says the same, naming the files it wanted.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as info:
        load_data(DataConfig(name="fashion-mnist", root=str(empty)))
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    assert "train-images-idx3-ubyte.gz" in str(info.value)


def test_fashion_mnist_train_limit_is_stratified(tmp_path):
    rng = np.random.default_rng(6)
    folder = tmp_path
    images = rng.integers(0, 256, (60, 28, 28), dtype=np.uint8)
    labels = np.repeat(np.arange(10, dtype=np.uint8), 6)
    rng.shuffle(labels)
    (folder / "train-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    (folder / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images[:20]))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels[:20]))
    bundle = load_data(DataConfig(name="fashion-mnist", root=str(folder), train_limit=30, subset_seed=3))
    assert len(bundle.train) == 30 and len(bundle.test) == 20
    assert torch.bincount(bundle.train.labels, minlength=10).tolist() == [3] * 10
    # The subset's images are the full set's images at the chosen indices, labels included.
    full = {images[i].tobytes(): int(labels[i]) for i in range(60)}
    for img, lab in zip(bundle.train.images[:, 0].numpy(), bundle.train.labels.tolist(), strict=True):
        assert full[img.tobytes()] == lab


def write_numbered_fashion(folder, n_train: int = 60, n_test: int = 20, seed: int = 6):
    """IDX files with unique images (the first pixel row holds the sample number) and balanced labels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    images[:, 0, 0], images[:, 0, 1] = np.arange(n_train) % 256, np.arange(n_train) // 256
    labels = np.repeat(np.arange(10, dtype=np.uint8), n_train // 10)
    rng.shuffle(labels)
    (folder / "train-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    (folder / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images[:n_test]))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels[:n_test]))
    return images, labels


def _numbers(split) -> set[int]:
    return {int(a) + 256 * int(b) for a, b in split.images[:, 0, 0, :2].tolist()}


def test_validation_comes_from_the_images_the_subset_leaves_out(tmp_path):
    write_numbered_fashion(tmp_path, n_train=100)
    base = DataConfig(name="fashion-mnist", root=str(tmp_path), train_limit=40, holdout=0.25)
    final = load_data(base)
    chosen = load_data(DataConfig(**{**base.__dict__, "val_size": 30}))
    assert chosen.eval_split == "validation" and final.eval_split == "test"
    # The same training (and holdout) images as the final run, and the validation images are none of them.
    assert torch.equal(chosen.train.images, final.train.images) and torch.equal(chosen.holdout.images,
                                                                                 final.holdout.images)
    assert len(chosen.test) == 30 and torch.bincount(chosen.test.labels, minlength=10).tolist() == [3] * 10
    used = _numbers(final.train) | _numbers(final.holdout)
    assert not used & _numbers(chosen.test) and len(_numbers(chosen.test)) == 30
    # The test split is not read at all: its files may even be missing.
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    assert len(load_data(DataConfig(**{**base.__dict__, "val_size": 30})).test) == 30


def test_validation_is_carved_out_of_the_training_split_without_a_subset(tmp_path):
    write_numbered_fashion(tmp_path, n_train=100)
    bundle = load_data(DataConfig(name="fashion-mnist", root=str(tmp_path), val_size=20))
    assert len(bundle.train) == 80 and len(bundle.test) == 20
    assert not _numbers(bundle.train) & _numbers(bundle.test)
    assert _numbers(bundle.train) | _numbers(bundle.test) == set(range(100))
    with pytest.raises(DataError, match="val_size=100"):
        load_data(DataConfig(name="fashion-mnist", root=str(tmp_path), val_size=100))


@pytest.mark.parametrize(("padding", "flip", "offsets", "flips"), [(0, True, {0}, {False, True}),
                                                                   (1, False, {0, 1, 2}, {False}),
                                                                   (None, None, set(range(9)), {False, True})])
def test_crop_padding_and_flip_set_the_augmentation(tmp_path, padding, flip, offsets, flips):
    write_numbered_fashion(tmp_path, n_train=100)
    bundle = load_data(DataConfig(name="fashion-mnist", root=str(tmp_path), crop_padding=padding, flip=flip))
    assert bundle.augment.padding == (4 if padding is None else padding)
    # Where each augmented image's sample number (pixels (0, 0) and (0, 1)) lands shows the crop and the flip.
    g = torch.Generator().manual_seed(0)
    images = bundle.train.images[:64].repeat(8, 1, 1, 1)
    out = random_crop_flip(images, bundle.augment.padding, bundle.augment.flip, g)
    seen_offsets, seen_flips = set(), set()
    p = bundle.augment.padding
    for src, dst in zip(images, out, strict=True):
        for dy in range(-p, p + 1):
            for dx in range(-p, p + 1):
                for flipped in (False, True):
                    shifted = torch.roll(src[0], (dy, dx), (0, 1))
                    view = shifted.flip(1) if flipped else shifted
                    inner = (slice(p, 28 - p), slice(p, 28 - p))
                    if torch.equal(view[inner], dst[0][inner]):
                        seen_offsets.add(dy + p)
                        seen_flips.add(flipped)
    assert seen_offsets == offsets and seen_flips == flips


def test_negative_crop_padding_and_val_size_are_refused():
    with pytest.raises(ConfigError, match=r"data\.crop_padding"):
        load_config(None, ["data.crop_padding=-1"])
    with pytest.raises(ConfigError, match=r"data\.val_size"):
        load_config(None, ["data.val_size=-5"])


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    bundle = load_data(DataConfig(name="fashion-mnist"))
    assert len(bundle.train) == 60000 and len(bundle.test) == 10000
    assert tuple(bundle.train.images.shape) == (60000, 1, 28, 28) and bundle.train.images.dtype == torch.uint8
    assert bundle.num_classes == 10
    assert torch.bincount(bundle.train.labels, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(bundle.test.labels, minlength=10).tolist() == [1000] * 10

    small = load_data(DataConfig(name="fashion-mnist", train_limit=1000))
    assert len(small.train) == 1000 and len(small.test) == 10000
    assert torch.bincount(small.train.labels, minlength=10).tolist() == [100] * 10
    picked = stratified_indices(bundle.train.labels, 1000, 0)
    assert torch.equal(small.train.images, bundle.train.images[picked])
    assert torch.equal(small.train.labels, bundle.train.labels[picked])


# ===================================================================== digits (scikit-learn)


def test_digits_split_is_a_stratified_partition():
    from sklearn.datasets import load_digits

    bundle = load_data(DataConfig(name="digits"))
    assert len(bundle.train) + len(bundle.test) == 1797
    assert len(bundle.test) == 1797 // 5
    assert bundle.in_channels == 1 and bundle.image_size == 8 and bundle.num_classes == 10

    digits = load_digits()
    expected_images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    everything = Counter((img.tobytes(), int(t)) for img, t in zip(expected_images, digits.target, strict=True))
    train = Counter((img[0].tobytes(), int(t)) for img, t in zip(bundle.train.images.numpy(),
                                                                 bundle.train.labels.tolist(), strict=True))
    test = Counter((img[0].tobytes(), int(t)) for img, t in zip(bundle.test.images.numpy(),
                                                                bundle.test.labels.tolist(), strict=True))
    assert train + test == everything  # together exactly the data set: disjoint, nothing lost or repeated

    counts = np.bincount(digits.target, minlength=10).tolist()
    got = torch.bincount(bundle.test.labels, minlength=10).tolist()
    assert got in largest_remainder(counts, 1797 // 5)


# ===================================================================== CIFAR (python pickles)


def dump_official(obj, path: Path) -> None:
    """Pickle like the official (Python 2 era) files: protocol 2, numpy arrays via numpy.core."""
    blob = pickle.dumps(obj, protocol=2)
    blob = blob.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    path.write_bytes(blob)


def cifar_batch(rng: np.random.Generator, n: int, label_key: bytes, num_classes: int, title: str) -> dict:
    return {
        b"batch_label": title.encode(),
        label_key: [int(x) for x in rng.integers(0, num_classes, n)],
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"filenames": [f"image_{i:05d}.png".encode() for i in range(n)],
    }


def write_cifar10(base: Path, rng: np.random.Generator) -> tuple[Path, list[dict], dict]:
    folder = base / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train = [cifar_batch(rng, n, b"labels", 10, f"training batch {i + 1} of 5") for i, n in enumerate([3, 2, 4, 1, 2])]
    for i, batch in enumerate(train):
        dump_official(batch, folder / f"data_batch_{i + 1}")
    test = cifar_batch(rng, 5, b"labels", 10, "testing batch 1 of 1")
    dump_official(test, folder / "test_batch")
    dump_official({b"num_cases_per_batch": 10000, b"label_names": [n.encode() for n in CIFAR10_NAMES],
                   b"num_vis": 3072}, folder / "batches.meta")
    (folder / "readme.html").write_text("<html></html>")
    return folder, train, test


def write_cifar100(base: Path, rng: np.random.Generator) -> tuple[Path, dict, dict, list[str]]:
    folder = base / "cifar-100-python"
    folder.mkdir(parents=True)
    names = [f"fine_{i:02d}" for i in range(100)]
    train = cifar_batch(rng, 7, b"fine_labels", 100, "training batch 1 of 1")
    train[b"coarse_labels"] = [x // 5 for x in train[b"fine_labels"]]
    test = cifar_batch(rng, 4, b"fine_labels", 100, "testing batch 1 of 1")
    test[b"coarse_labels"] = [x // 5 for x in test[b"fine_labels"]]
    dump_official(train, folder / "train")
    dump_official(test, folder / "test")
    dump_official({b"fine_label_names": [n.encode() for n in names],
                   b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)]}, folder / "meta")
    return folder, train, test, names


def assert_cifar_layout(images: torch.Tensor, data: np.ndarray) -> None:
    """pixel [i, c, y, x] == data[i, c*1024 + y*32 + x] (channel-major rows of 32 pixels)."""
    assert images.dtype == torch.uint8
    assert tuple(images.shape) == (len(data), 3, 32, 32)
    got = images.numpy()
    for c in range(3):
        for y in range(32):
            start = c * 1024 + y * 32
            assert np.array_equal(got[:, c, y, :], data[:, start:start + 32])


@pytest.mark.parametrize("point_at", ["parent", "batches-folder"])
def test_cifar10_reads_official_batches(tmp_path, point_at):
    rng = np.random.default_rng(10)
    folder, train, test = write_cifar10(tmp_path, rng)
    root = tmp_path if point_at == "parent" else folder
    bundle = load_data(DataConfig(name="cifar10", root=str(root), batch_size=5))
    assert bundle.num_classes == 10 and bundle.in_channels == 3 and bundle.image_size == 32
    assert bundle.train.classes == CIFAR10_NAMES and bundle.test.classes == CIFAR10_NAMES
    assert_cifar_layout(bundle.train.images, np.concatenate([b[b"data"] for b in train]))
    assert bundle.train.labels.tolist() == [lab for b in train for lab in b[b"labels"]]
    assert_cifar_layout(bundle.test.images, test[b"data"])
    assert bundle.test.labels.tolist() == test[b"labels"]
    # spot checks of the formula on single pixels
    data = np.concatenate([b[b"data"] for b in train])
    for i, c, y, x in [(0, 0, 0, 0), (11, 2, 31, 31), (5, 1, 7, 19), (3, 2, 0, 31)]:
        assert int(bundle.train.images[i, c, y, x]) == int(data[i, c * 1024 + y * 32 + x])

    # loader: uint8 batches of the chosen indices; 12 samples in batches of 5 -> 5, 5, 2
    loader = bundle.loader(train=True, seed=1)
    batches = list(loader)
    assert [len(b[2]) for b in batches] == [5, 5, 2]
    seen = torch.cat([b[2] for b in batches])
    assert sorted(seen.tolist()) == list(range(12))
    for images, labels, idx in batches:
        assert images.dtype == torch.uint8 and tuple(images.shape[1:]) == (3, 32, 32)
        assert torch.equal(images, bundle.train.images[idx])
        assert torch.equal(labels, bundle.train.labels[idx])
    images = batches[0][0]
    expected = (images.double() / 255 - torch.tensor(CIFAR10_MEAN, dtype=torch.float64).view(1, 3, 1, 1)) \
        / torch.tensor(CIFAR10_STD, dtype=torch.float64).view(1, 3, 1, 1)
    got = bundle.to_device(images, train=False, generator=None)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, atol=1e-5)
    augmented = bundle.to_device(images, train=True, generator=torch.Generator().manual_seed(0))
    assert augmented.shape == images.shape and augmented.dtype == torch.float32


def test_cifar10_reader_accepts_python3_pickles(tmp_path):
    rng = np.random.default_rng(11)
    folder, train, _ = write_cifar10(tmp_path, rng)
    for i, batch in enumerate(train):  # re-save with Python 3's default protocol
        (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch, protocol=4))
    split = read_cifar10(tmp_path, True, False)
    assert_cifar_layout(split.images, np.concatenate([b[b"data"] for b in train]))


@pytest.mark.parametrize("point_at", ["parent", "batches-folder"])
def test_cifar100_reads_fine_labels(tmp_path, point_at):
    rng = np.random.default_rng(12)
    folder, train, test, names = write_cifar100(tmp_path, rng)
    root = tmp_path if point_at == "parent" else folder
    bundle = load_data(DataConfig(name="cifar100", root=str(root)))
    assert bundle.num_classes == 100 and bundle.train.classes == names
    assert_cifar_layout(bundle.train.images, train[b"data"])
    assert bundle.train.labels.tolist() == train[b"fine_labels"]
    assert_cifar_layout(bundle.test.images, test[b"data"])
    assert bundle.test.labels.tolist() == test[b"fine_labels"]


def test_cifar_without_meta_numbers_the_classes(tmp_path):
    rng = np.random.default_rng(13)
    folder, _, _ = write_cifar10(tmp_path, rng)
    (folder / "batches.meta").unlink()
    assert read_cifar10(tmp_path, False, False).classes == [str(i) for i in range(10)]


class RunsShell:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch '{self.sentinel}'",))


class WritesFile:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.sentinel)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("payload", [RunsShell, WritesFile])
@pytest.mark.parametrize(("dataset", "target", "whole"), [
    ("cifar10", "data_batch_1", True),
    ("cifar10", "test_batch", False),
    ("cifar10", "batches.meta", True),
    ("cifar100", "train", False),
    ("cifar100", "meta", True),
])
def test_malicious_cifar_pickle_is_refused_without_running(tmp_path, payload, dataset, target, whole):
    rng = np.random.default_rng(14)
    folder = (write_cifar10 if dataset == "cifar10" else write_cifar100)(tmp_path, rng)[0]
    sentinel = tmp_path / "SENTINEL"
    evil = payload(sentinel)
    if whole:
        obj = evil
    else:  # hidden inside an otherwise well-formed batch
        obj = cifar_batch(rng, 2, b"labels" if dataset == "cifar10" else b"fine_labels", 10, "x")
        obj[b"filenames"] = [evil]
    (folder / target).write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(DataError) as info:
        load_data(DataConfig(name=dataset, root=str(tmp_path)))
    assert str(folder / target) in str(info.value)
    assert not sentinel.exists(), "the pickle's payload ran"


@pytest.mark.parametrize("damage", ["truncated", "missing", "wrong-shape", "bad-label", "not-a-dict"])
def test_damaged_cifar_batch(tmp_path, damage):
    rng = np.random.default_rng(15)
    folder, train, _ = write_cifar10(tmp_path, rng)
    path = folder / "data_batch_3"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:500])
    elif damage == "missing":
        path.unlink()
    elif damage == "wrong-shape":
        batch = dict(train[2])
        batch[b"data"] = batch[b"data"][:, :3000]
        dump_official(batch, path)
    elif damage == "bad-label":
        batch = dict(train[2])
        batch[b"labels"] = [0, 10, 1, 2]
        dump_official(batch, path)
    else:
        dump_official([1, 2, 3], path)
    with pytest.raises(DataError) as info:
        read_cifar10(tmp_path, True, False)
    assert str(path) in str(info.value)  # the batch file itself, the label's too
    if damage == "bad-label":
        assert "label 10 of image 1 in this file" in str(info.value)


def damaged_copies(files: dict[str, bytes], rng: np.random.Generator, flips: int, cuts: int):
    """(file name, damaged bytes, what was done): single-byte flips, most in the first 64 bytes (headers, a
    pickle's first opcodes), the rest anywhere, and truncations at random lengths."""
    names = sorted(files)
    for i in range(flips + cuts):
        name = names[int(rng.integers(len(names)))]
        blob = bytearray(files[name])
        if i < flips:
            where = int(rng.integers(min(64, len(blob)))) if rng.random() < 0.7 else int(rng.integers(len(blob)))
            blob[where] ^= 1 << int(rng.integers(8)) if rng.random() < 0.5 else int(rng.integers(1, 256))
            yield name, bytes(blob), f"byte {where} changed"
        else:
            cut = int(rng.integers(len(blob)))
            yield name, bytes(blob[:cut]), f"cut to {cut} bytes"


def fuzz(files: dict[str, bytes], folder: Path, read, rng, flips: int, cuts: int) -> Counter:
    """Each damaged copy is read as the whole dataset: it must load or raise a DataError naming that file."""
    outcomes: Counter = Counter()
    for name, blob, what in damaged_copies(files, rng, flips, cuts):
        for other, original in files.items():
            (folder / other).write_bytes(blob if other == name else original)
        try:
            split = read()
        except DataError as err:
            assert str(folder / name) in str(err), (name, what, str(err))
            outcomes["refused"] += 1
        except Exception as err:
            pytest.fail(f"{name} ({what}) gave {type(err).__name__}: {err}")
        else:
            assert split.images.dtype == torch.uint8 and len(split.images) == len(split.labels)
            assert int(split.labels.min()) >= 0 and int(split.labels.max()) < len(split.classes)
            outcomes["loaded"] += 1
    return outcomes


def test_fuzzed_cifar_files_load_or_name_the_damaged_file(tmp_path):
    rng = np.random.default_rng(23)
    folder, _, _ = write_cifar10(tmp_path / "ten", rng)
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "readme.html"}
    ten = fuzz(files, folder, lambda: read_cifar10(folder, True, False), rng, flips=200, cuts=40)
    folder100, _, _, _ = write_cifar100(tmp_path / "hundred", rng)
    files = {p.name: p.read_bytes() for p in folder100.iterdir()}
    hundred = fuzz(files, folder100, lambda: read_cifar100(folder100, False, False), rng, flips=100, cuts=20)
    assert ten["refused"] > 40 and hundred["refused"] > 20  # the damage was real, not all harmless


def test_fuzzed_idx_files_load_or_name_the_damaged_file(tmp_path):
    rng = np.random.default_rng(29)
    for compress in (True, False):
        folder = tmp_path / ("gz" if compress else "raw")
        write_fashion(folder, rng, compress)
        files = {p.name: p.read_bytes() for p in folder.iterdir()}
        outcomes = fuzz(files, folder, lambda f=folder: read_fashion_mnist(f, True, False), rng, flips=80, cuts=20)
        assert outcomes["refused"] > 20


def test_cifar_missing_folder(tmp_path):
    with pytest.raises(DataError, match="cifar-100-python"):
        read_cifar100(tmp_path, True, False)
    with pytest.raises(DataError, match="does not exist"):
        load_data(DataConfig(name="cifar10", root=str(tmp_path / "absent")))


# ===================================================================== image-file datasets


@pytest.mark.parametrize("name", list(FILE_DATASETS))
def test_file_dataset_splits_labels_and_classes(tmp_path, name):
    layout = FILE_DATASETS[name](tmp_path, np.random.default_rng(20))
    bundle = load_data(file_cfg(name, layout.root))
    assert bundle.name == name and not bundle.in_memory
    assert bundle.num_classes == len(layout.classes) and bundle.in_channels == 3 and bundle.image_size == 32
    for split, expected in ((bundle.train, layout.train), (bundle.test, layout.test)):
        assert isinstance(split, FileSplit)
        assert split.classes == layout.classes
        assert split.labels.dtype == torch.int64
        assert len(split) == len(split.paths) == len(expected)
        got = {Path(p): split.classes[int(y)] for p, y in zip(split.paths, split.labels, strict=True)}
        assert got == expected


@pytest.mark.parametrize("name", list(FILE_DATASETS))
@pytest.mark.parametrize("train", [True, False])
def test_file_dataset_loader_batches(tmp_path, name, train):
    layout = FILE_DATASETS[name](tmp_path, np.random.default_rng(21))
    bundle = load_data(file_cfg(name, layout.root))
    split = bundle.train if train else bundle.test
    batches = list(bundle.loader(train=train, seed=2))
    size = 4 if train else 5
    n = len(split)
    expected_count = n - 1 if train and n % size == 1 else n  # a lone trailing sample is dropped in training
    seen = torch.cat([idx for _, _, idx in batches]).tolist()
    assert len(seen) == len(set(seen)) == expected_count
    assert set(seen) <= set(range(n))
    if not train:
        assert seen == list(range(n))
    for sent, labels, idx in batches:
        b = len(idx)
        assert sent.dtype == torch.uint8 and tuple(sent.shape) == (b, 3, 32, 32)  # the workers send uint8
        images = bundle.to_device(sent, train=train, generator=None)
        assert images.dtype == torch.float32
        assert labels.dtype == torch.int64 and labels.tolist() == split.labels[idx].tolist()
        for k in range(b):
            colour = normalized(layout.colours[Path(split.paths[int(idx[k])])]).view(3, 1, 1)
            # training crops pad by 4 pixels, so only the centre is sure to be image; testing sees all of it
            region = images[k, :, 4:28, 4:28] if train else images[k]
            assert torch.allclose(region, colour.expand_as(region), atol=0.03), (name, split.paths[int(idx[k])])


def test_greyscale_image_becomes_three_channels(tmp_path):
    layout = build_imagefolder(tmp_path, np.random.default_rng(22))
    split = load_data(file_cfg("imagefolder", layout.root)).train
    dataset = ImageFileDataset(split, transform=np.asarray)
    (grey,) = layout.grey
    index = [Path(p) for p in split.paths].index(grey)
    pixels, label, returned = dataset[index]
    assert returned == index and split.classes[label] == "cat"
    assert pixels.shape == (8, 8, 3)
    assert (pixels == np.array(layout.colours[grey], dtype=np.uint8)).all()
    assert len(set(layout.colours[grey])) == 1


def test_undecodable_image_names_the_file(tmp_path):
    layout = build_imagefolder(tmp_path, np.random.default_rng(23))
    bad = layout.root / "train" / "dog" / "dog1.jpg"
    bad.write_bytes(b"this is not a jpeg")
    split = load_data(file_cfg("imagefolder", layout.root)).train
    dataset = ImageFileDataset(split, transform=np.asarray)
    index = [Path(p) for p in split.paths].index(bad)
    with pytest.raises(DataError) as info:
        dataset[index]
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("name", [n for n in FILE_DATASETS if n != "imagefolder"])
def test_listed_but_missing_image(tmp_path, name):
    layout = FILE_DATASETS[name](tmp_path, np.random.default_rng(24))
    assert layout.listed is not None and layout.listed.is_file()
    layout.listed.unlink()
    with pytest.raises(DataError) as info:
        load_data(file_cfg(name, layout.root))
    assert str(layout.listed) in str(info.value)


@pytest.mark.parametrize(("name", "relative"), SPLIT_FILES)
def test_missing_split_file_is_named(tmp_path, name, relative):
    layout = FILE_DATASETS[name](tmp_path, np.random.default_rng(25))
    path = layout.root / relative
    assert path.is_file()
    path.unlink()
    with pytest.raises(DataError) as info:
        load_data(file_cfg(name, layout.root))
    assert str(path) in str(info.value)


def test_cub200_root_may_be_the_cub_folder(tmp_path):
    layout = build_cub200(tmp_path, np.random.default_rng(26))
    bundle = load_data(file_cfg("cub200", layout.root / "CUB_200_2011"))
    got = {Path(p): bundle.test.classes[int(y)] for p, y in zip(bundle.test.paths, bundle.test.labels, strict=True)}
    assert got == layout.test


def test_tiny_imagenet_unknown_wnid_in_annotations(tmp_path):
    layout = build_tiny_imagenet(tmp_path, np.random.default_rng(27))
    ann = layout.root / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="n99999999"):
        load_data(file_cfg("tiny-imagenet", layout.root))


def test_imagefolder_val_fallback_and_missing_split(tmp_path):
    layout = build_imagefolder(tmp_path, np.random.default_rng(28))
    (layout.root / "test").rename(layout.root / "val")
    bundle = load_data(file_cfg("imagefolder", layout.root))
    got = {Path(p).name: bundle.test.classes[int(y)] for p, y in zip(bundle.test.paths, bundle.test.labels,
                                                                     strict=True)}
    assert got == {p.name: c for p, c in layout.test.items()}
    (layout.root / "val").rename(layout.root / "elsewhere")
    with pytest.raises(DataError) as info:
        load_data(file_cfg("imagefolder", layout.root))
    assert str(layout.root / "val") in str(info.value) and "test/" in str(info.value)


def test_stanford_dogs_label_outside_range(tmp_path):
    from scipy.io import loadmat, savemat

    layout = build_stanford_dogs(tmp_path, np.random.default_rng(29))
    path = layout.root / "test_list.mat"
    mat = loadmat(str(path))
    mat["labels"][0, 0] = 4
    savemat(path, {k: v for k, v in mat.items() if not k.startswith("__")})
    with pytest.raises(DataError, match=r"label 4 is outside 1\.\.3"):
        load_data(file_cfg("stanford-dogs", layout.root))


# ===================================================================== stratified_indices


@pytest.mark.parametrize(("counts", "limit", "expected"), [
    ([50, 30, 20], 10, [5, 3, 2]),
    ([5, 3, 2], 4, [2, 1, 1]),  # exact 2.0, 1.2, 0.8: the largest remainder (0.8) gets the spare
    ([7, 7, 1], 5, None),  # exact 2.33, 2.33, 0.33: a three-way tie, any of them may get the spare
    ([2, 3, 5, 10], 7, [1, 1, 2, 3]),  # exact 0.7, 1.05, 1.75, 3.5: spares to 0.75 and 0.7, not by size
])
def test_stratified_indices_proportions(counts, limit, expected):
    labels = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    picked = stratified_indices(labels, limit, seed=5)
    assert len(picked) == limit
    got = torch.bincount(labels[picked], minlength=len(counts)).tolist()
    if expected is not None:
        assert largest_remainder(counts, limit) == [expected]  # the reference agrees, no ties
        assert got == expected
    else:
        assert len(largest_remainder(counts, limit)) == 3
        assert got in largest_remainder(counts, limit)


@pytest.mark.parametrize("case", range(12))
def test_stratified_indices_random_cases(case):
    rng = np.random.default_rng(100 + case)
    k = int(rng.integers(2, 9))
    counts = [int(c) for c in rng.integers(1, 40, k)]
    n = sum(counts)
    limit = int(rng.integers(1, n))
    labels = torch.as_tensor(rng.permutation(np.repeat(np.arange(k) * 3 + 1, counts)))  # sparse class ids
    picked = stratified_indices(labels, limit, seed=case)
    assert len(picked) == limit
    assert picked.tolist() == sorted(set(picked.tolist()))  # sorted, no repeats
    assert int(picked.min()) >= 0 and int(picked.max()) < n
    got = [int((labels[picked] == cls).sum()) for cls in np.arange(k) * 3 + 1]
    assert got in largest_remainder(counts, limit)


def test_stratified_indices_seeding():
    labels = torch.arange(400) % 4
    a = stratified_indices(labels, 100, seed=1)
    assert torch.equal(a, stratified_indices(labels, 100, seed=1))
    assert not torch.equal(a, stratified_indices(labels, 100, seed=2))
    assert torch.bincount(labels[a]).tolist() == [25] * 4


@pytest.mark.parametrize("limit", [6, 7, 1000])
def test_stratified_indices_limit_at_least_n_keeps_everything(limit):
    labels = torch.tensor([2, 0, 1, 1, 0, 2])
    assert stratified_indices(labels, limit, seed=3).tolist() == list(range(6))


# ===================================================================== EpochBatchSampler


@pytest.mark.parametrize(("n", "size"), [(12, 4), (11, 3), (10, 4), (5, 8)])
def test_epoch_batch_sampler_covers_every_index_once(n, size):
    sampler = EpochBatchSampler(n, size, seed=7)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(n))
        assert all(len(b) == size for b in batches[:-1]) and 1 < len(batches[-1]) <= size


def test_epoch_batch_sampler_is_reproducible_per_epoch():
    def order(seed, epoch):
        sampler = EpochBatchSampler(50, 8, seed=seed)
        sampler.set_epoch(epoch)
        return [i for b in sampler for i in b]

    assert order(3, 2) == order(3, 2)
    assert order(3, 2) != order(3, 3)
    assert order(3, 2) != order(4, 2)
    assert order(3, 0) != list(range(50))


def test_epoch_batch_sampler_drops_lone_trailing_sample_when_shuffling():
    sampler = EpochBatchSampler(10, 3, seed=0)
    batches = list(sampler)
    assert len(sampler) == 3 and [len(b) for b in batches] == [3, 3, 3]
    flat = [i for b in batches for i in b]
    assert len(set(flat)) == 9 and set(flat) < set(range(10))


def test_epoch_batch_sampler_sequential_without_shuffle():
    sampler = EpochBatchSampler(10, 3, seed=9, shuffle=False)
    sampler.set_epoch(5)
    assert list(sampler) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert len(sampler) == 4


# ===================================================================== augmentation


def test_crop_padding_for():
    assert [crop_padding_for(s) for s in (8, 16, 27, 28, 32, 64)] == [1, 2, 3, 4, 4, 4]


def test_random_crop_flip_identity_without_padding_or_flip():
    images = torch.randint(0, 256, (6, 3, 9, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = random_crop_flip(images, 0, False, torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8
    assert torch.equal(out, images)


def test_random_crop_flip_forced_flip_is_torch_flip(monkeypatch):
    images = torch.randint(0, 256, (5, 2, 6, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    real_rand = torch.rand

    def always_flip(*size, **kwargs):
        return torch.zeros_like(real_rand(*size, **kwargs))

    monkeypatch.setattr(torch, "rand", always_flip)
    out = random_crop_flip(images, 0, True, torch.Generator().manual_seed(3))
    assert out.dtype == torch.uint8
    assert torch.equal(out, torch.flip(images, dims=[-1]))


@pytest.mark.parametrize(("padding", "flip"), [(4, True), (2, False), (1, True)])
def test_random_crop_flip_matches_per_image_reference(padding, flip):
    n, c, h, w = 16, 3, 10, 12
    images = torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    out = random_crop_flip(images, padding, flip, torch.Generator().manual_seed(11))
    assert out.dtype == torch.uint8 and out.shape == images.shape

    # the same draws, in the same order: top, left, then the flip mask
    g = torch.Generator().manual_seed(11)
    span = 2 * padding + 1
    top = torch.randint(0, span, (n, 1), generator=g).flatten().tolist()
    left = torch.randint(0, span, (n, 1), generator=g).flatten().tolist()
    flips = (torch.rand(n, 1, generator=g) < 0.5).flatten().tolist() if flip else [False] * n
    source = images.numpy()
    for i in range(n):
        padded = np.zeros((c, h + 2 * padding, w + 2 * padding), dtype=np.uint8)
        padded[:, padding:padding + h, padding:padding + w] = source[i]
        crop = padded[:, top[i]:top[i] + h, left[i]:left[i] + w]
        if flips[i]:
            crop = crop[:, :, ::-1]
        assert np.array_equal(out[i].numpy(), crop), i
    if flip:
        assert 0 < sum(flips) < n  # both branches were exercised
    assert len(set(zip(top, left, strict=True))) > 1


def test_batch_augment_normalize_and_train():
    mean, std = (0.2, 0.5, 0.7), (0.3, 0.25, 0.1)
    aug = BatchAugment(mean, std, padding=2, flip=True, augment=True)
    images = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    expected = torch.empty(4, 3, 5, 5, dtype=torch.float64)
    for ch in range(3):
        expected[:, ch] = (images[:, ch].double() / 255.0 - mean[ch]) / std[ch]
    got = aug.normalize(images)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, atol=1e-5)

    # train() = normalize(random_crop_flip(...)) with the same generator draws
    trained = aug.train(images, torch.Generator().manual_seed(6))
    cropped = random_crop_flip(images, 2, True, torch.Generator().manual_seed(6))
    assert torch.allclose(trained, aug.normalize(cropped))
    plain = BatchAugment(mean, std, padding=2, flip=True, augment=False)
    assert torch.allclose(plain.train(images, torch.Generator().manual_seed(6)), got)


def test_class_without_training_images_is_named(tmp_path):
    layout = build_imagefolder(tmp_path, np.random.default_rng(31))
    (layout.root / "train" / "zebra").mkdir()  # a class folder left empty
    (layout.root / "test" / "zebra").mkdir()
    with pytest.raises(DataError, match=r"class 'zebra' has no training images"):
        load_data(file_cfg("imagefolder", layout.root))


# ----------------------------------------------------------------------------- data on the training device

def test_image_files_are_normalized_on_the_device_exactly_as_torchvision_did_in_the_workers():
    from torchvision.transforms import v2

    augment = BatchAugment(CIFAR10_MEAN, CIFAR10_STD, 4, True, True)
    images = torch.randint(0, 256, (4, 3, 9, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    per_image = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(CIFAR10_MEAN),
                                                                                 list(CIFAR10_STD))])
    reference = torch.stack([per_image(v2.functional.to_image(image)) for image in images])
    assert torch.equal(augment.normalize_files(images), reference)  # bit for bit: file runs keep their numbers


def test_in_memory_batches_come_from_the_device_with_one_copy_per_epoch():
    """The split lives on the loader's device; per epoch the batch order is copied there once, and a batch is a
    gather there (meta: a device without values, where a batch made on the CPU would show as a copy)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CopiesToMeta(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            target = kwargs.get("device")
            if func.overloadpacket.__name__ == "_to_copy" and args[0].device.type == "cpu" and target is not None \
                    and torch.device(target).type == "meta":
                CopiesToMeta.count += 1
            return func(*args, **kwargs)

    images = torch.randint(0, 256, (20, 1, 6, 6), dtype=torch.uint8)
    split = ArraySplit(images, torch.arange(20) % 4, ["a", "b", "c", "d"])
    bundle = DataBundle("t", split, split, 4, 1, 6, BatchAugment((0.5,), (0.25,), 1, True, True),
                        Loading(5, 5, 0, True))
    loader = bundle.loader(train=True, seed=1, device="meta")
    with CopiesToMeta():
        batches = list(loader)
    assert len(batches) == 4 and CopiesToMeta.count == 1
    assert all(t.device.type == "meta" for batch in batches for t in batch)
    assert batches[0][0].dtype == torch.uint8

