"""Finding image files that do not decode, before a run meets them mid-epoch (``aikd check-data``,
``data.skip_bad_files``)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from aikd.data.splits import FileSplit


def decode_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image (missing, unreadable, not an image, truncated), or None.

    It decodes every pixel, as training will: a header check (PIL's verify) lets a truncated JPEG through.
    """
    try:
        with Image.open(path) as img:
            img.convert("RGB").load()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        return f"{type(err).__name__}: {str(err) or 'cannot be decoded'}"
    return None


def find_bad_files(split: FileSplit, workers: int = 4, progress: Callable[[int], None] | None = None
                   ) -> list[tuple[Path, str]]:
    """Every file of ``split`` that does not decode, with the reason, in the split's order.

    Decoding releases the GIL in PIL's C code, so a few threads scan several files at once.
    """
    bad = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for n, (path, problem) in enumerate(zip(split.paths, pool.map(decode_problem, split.paths), strict=True)):
            if problem is not None:
                bad.append((path, problem))
            if progress is not None:
                progress(n + 1)
    return bad


def without(split: FileSplit, bad: list[tuple[Path, str]]) -> FileSplit:
    """``split`` less the ``bad`` files."""
    drop = {path for path, _ in bad}
    keep = torch.tensor([i for i, path in enumerate(split.paths) if path not in drop], dtype=torch.long)
    return split.subset(keep)
