"""Image files read as their data says (every PIL mode a user's folder may hold), and an oversized one named.

Real PNG, JPEG and TIFF files written by PIL in an ImageFolder tree, read by the loader's dataset, by
``aikd check-data``, by a training run, and by one with ``data.skip_bad_files``.
"""

from __future__ import annotations

import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aikd.data.images import decode_problem, read_rgb
from aikd.data.loaders import ImageFileDataset
from aikd.data.splits import FileSplit
from aikd.errors import DataError
from helpers import aikd_cli, one_line_error_of

RUN = ["data.name=imagefolder", "model.name=small_cnn", "data.image_size=32", "data.batch_size=8",
       "train.epochs=1", "device=cpu", "data.num_workers=0"]
CONFIG = "configs/fashion_mnist/ce.yaml"
GREY = np.array([[0, 300, 4660], [30000, 51400, 65535]], dtype=np.uint16)  # 16-bit values, 114+ of them above 255


def rgb_of(path: Path) -> np.ndarray:
    return np.asarray(read_rgb(path))


def test_a_16_bit_grey_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(GREY).save(path)
    assert Image.open(path).mode == "I;16"  # what a 16-bit PNG is to PIL
    expected = (GREY >> 8).astype(np.uint8)  # torchvision's to_dtype(uint8, scale=True): the high byte
    assert np.array_equal(rgb_of(path), np.repeat(expected[..., None], 3, axis=2))


def test_a_32_bit_integer_image_of_16_bit_values_is_scaled_and_one_out_of_range_refused(tmp_path):
    path = tmp_path / "grey32.tif"
    Image.fromarray(GREY.astype(np.int32)).save(path)
    assert Image.open(path).mode == "I"  # older Pillow opens 16-bit PNGs so too
    assert np.array_equal(rgb_of(path)[..., 0], (GREY >> 8).astype(np.uint8))
    wide = tmp_path / "wide.tif"
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(wide)
    with pytest.raises(DataError, match=f"'{wide}'.*outside the 16-bit range"):
        read_rgb(wide)
    floats = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.5, 2.0]], dtype=np.float32)).save(floats)
    assert "32-bit float pixels" in decode_problem(floats)


def test_a_palette_png_shows_its_palette_colours_with_or_without_transparency(tmp_path):
    palette = [255, 0, 0, 0, 128, 255, 10, 20, 30] + [0] * (256 * 3 - 9)
    img = Image.new("P", (2, 2))
    img.putpalette(palette)
    img.putdata([0, 1, 2, 1])
    expected = np.array([[[255, 0, 0], [0, 128, 255]], [[10, 20, 30], [0, 128, 255]]], dtype=np.uint8)
    plain, see_through = tmp_path / "palette.png", tmp_path / "palette_t.png"
    img.save(plain)
    img.save(see_through, transparency=1)
    assert Image.open(see_through).mode == "P" and "transparency" in Image.open(see_through).info
    assert np.array_equal(rgb_of(plain), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Palette images with Transparency" warning either
        assert np.array_equal(rgb_of(see_through), expected)


def test_grey_with_alpha_keeps_its_grey_and_drops_the_alpha(tmp_path):
    path = tmp_path / "la.png"
    grey = np.array([[0, 77], [200, 255]], dtype=np.uint8)
    Image.merge("LA", (Image.fromarray(grey), Image.fromarray(np.array([[255, 0], [128, 3]], np.uint8)))).save(path)
    assert Image.open(path).mode == "LA"
    assert np.array_equal(rgb_of(path), np.repeat(grey[..., None], 3, axis=2))


def test_a_cmyk_jpeg_is_converted_as_pil_converts_it(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path, quality=100)  # pure red in ink
    assert Image.open(path).mode == "CMYK"
    red = rgb_of(path).reshape(-1, 3)
    assert (red[:, 0] > 240).all() and (red[:, 1:] < 15).all()


def test_a_1_bit_png_becomes_black_and_white(tmp_path):
    path = tmp_path / "bits.png"
    Image.fromarray(np.array([[True, False], [False, True]])).save(path)
    assert Image.open(path).mode == "1"
    assert np.array_equal(rgb_of(path)[..., 1], np.array([[255, 0], [0, 255]], dtype=np.uint8))


def test_the_training_loader_reads_a_16_bit_image_as_read_rgb_does(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(GREY).save(path)
    split = FileSplit([path], torch.tensor([0]), ["only"])
    image, label, index = ImageFileDataset(split, np.asarray)[0]
    assert np.array_equal(image[..., 2], (GREY >> 8).astype(np.uint8)) and (label, index) == (0, 0)


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A real PNG header of side x side grey pixels (400 M pixels at 20000) in a few bytes: PIL refuses to open
    it (over twice Image.MAX_IMAGE_PIXELS), whatever its pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture
def tree_with_a_bomb(tmp_path) -> tuple[Path, Path]:
    """An ImageFolder tree of real PNGs (8-bit RGB and 16-bit grey) with one oversized PNG in train/."""
    rng = np.random.default_rng(5)
    root = tmp_path / "images"
    for split, count in (("train", 5), ("test", 2)):
        for cls in ("ant", "bee"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for k in range(count):
                pixels = rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)
                if k == 1:
                    Image.fromarray(rng.integers(0, 65536, (36, 36), dtype=np.uint16)).save(folder / f"{k}.png")
                else:
                    Image.fromarray(pixels).save(folder / f"{k}.png")
    return root, bomb_png(root / "train" / "bee" / "9.png")


def test_an_oversized_image_is_named_in_one_line_by_check_data_train_and_skip_bad_files(tree_with_a_bomb, tmp_path):
    root, bomb = tree_with_a_bomb
    assert bomb.stat().st_size < 1000
    check = aikd_cli("check-data", "-c", CONFIG, *RUN, f"data.root={root}")
    assert check.returncode == 1 and "Traceback" not in check.stderr, check.stderr
    assert [line.split("\t")[:2] for line in check.stdout.splitlines()] == [[str(bomb), "training"]]
    assert "DecompressionBombError" in check.stdout and "1 bad image files" in check.stderr

    train = aikd_cli("train", "-q", "-c", CONFIG, "-o", str(tmp_path / "run"), *RUN, f"data.root={root}")
    assert train.returncode == 2
    assert one_line_error_of(train.stderr).startswith(f"aikd: error: Cannot decode image '{bomb}': "
                                                      f"DecompressionBombError")

    skip = aikd_cli("train", "-q", "-c", CONFIG, "-o", str(tmp_path / "skip"), *RUN, f"data.root={root}",
                    "data.skip_bad_files=true")
    assert skip.returncode == 0 and "Traceback" not in skip.stderr, skip.stderr
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert [entry.split(" (")[0] for entry in summary["skipped_files"]] == [str(bomb)]
    assert summary["num_train"] == 10
