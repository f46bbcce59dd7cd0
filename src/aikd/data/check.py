"""Finding image files that do not decode, before a run meets them mid-epoch (``aikd check-data``,
``data.skip_bad_files``), with the decoding training does (src/aikd/data/images.py)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from aikd.data.images import decode_problem
from aikd.data.splits import FileSplit


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
