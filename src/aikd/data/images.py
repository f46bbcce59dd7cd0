"""Decoding an image file into the 8-bit RGB picture every model here takes: the one place that does it.

Training (src/aikd/data/loaders.py), ``aikd check-data`` and ``data.skip_bad_files``
(src/aikd/data/check.py) all decode through :func:`read_rgb`, so a file the check passes is a file
training reads, and reads the same way.

How each PIL mode becomes RGB, as torchvision users expect:

* 16-bit grey (``I;16*``, and ``I`` holding 0..65535, as older Pillow opens 16-bit PNGs): scaled to
  8 bits by dropping the low byte (``v >> 8``), as ``torchvision.transforms.v2.functional.to_dtype``
  does with ``scale=True``. ``Image.convert("RGB")`` would clip every value above 255 to white.
* palette (``P``, ``PA``), grey with alpha (``LA``), ``RGBA``, ``CMYK``, 1-bit (``1``) and the rest:
  PIL's own conversion, as torchvision's ``ImageFolder`` loader does (alpha is dropped, the
  palette's colours are looked up, 1-bit pixels become 0 or 255).
* 32-bit float (``F``) and 32-bit integers outside 0..65535: refused, naming the file, since such
  pixels have no range an 8-bit image could keep.

Any failure, whatever raises it (a truncated file, garbage, PIL's decompression-bomb limit), is one
reason naming the exception, never a traceback.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from aikd.errors import DataError

SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


class _NoEightBitForm(Exception):
    """Pixels that no 8-bit image can hold faithfully (float, or integers outside 16 bits)."""


def read_rgb(path: Path) -> Image.Image:
    """The file's pixels as an 8-bit RGB image; DataError naming the file and the reason if it cannot be."""
    image, problem = _decode(path)
    if problem is not None:
        raise DataError(f"Cannot decode image '{path}': {problem}.")
    return image


def decode_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image (missing, unreadable, not an image, truncated, too large), or None.

    It decodes every pixel, as training will: a header check (PIL's verify) lets a truncated JPEG through.
    """
    return _decode(path)[1]


def _decode(path: Path) -> tuple[Image.Image | None, str | None]:
    try:
        with Image.open(path) as img:
            return to_rgb(img), None
    except _NoEightBitForm as err:
        return None, str(err)
    except Exception as err:  # whatever PIL raises underneath (OSError, DecompressionBombError, SyntaxError, ...)
        return None, f"{type(err).__name__}: {str(err) or 'cannot be decoded'}"


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` (any PIL mode) as an 8-bit RGB image, decoded; see the module's notes for each mode."""
    if img.mode in SIXTEEN_BIT or img.mode == "I":
        return _sixteen_bit_to_rgb(img)
    if img.mode == "F":
        raise _NoEightBitForm("32-bit float pixels (PIL mode F) have no fixed range to scale to 8 bits; "
                              "save the image as 8- or 16-bit")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # the palette's transparency is dropped with the alpha below, without a warning
    rgb = img.convert("RGB")
    rgb.load()
    return rgb


def _sixteen_bit_to_rgb(img: Image.Image) -> Image.Image:
    pixels = np.asarray(img).astype(np.int64)
    if pixels.size and (pixels.min() < 0 or pixels.max() > 0xFFFF):
        raise _NoEightBitForm(f"32-bit integer pixels ({pixels.min()}..{pixels.max()}) are outside the 16-bit "
                              f"range aikd scales to 8 bits; save the image as 8- or 16-bit")
    return Image.fromarray((pixels >> 8).astype(np.uint8)).convert("RGB")
