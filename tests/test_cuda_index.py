"""Which GPU a process drives: one pure rule for a single process, torchrun's ranks, and one GPU per task."""

from __future__ import annotations

import re

import pytest

from aikd.distributed import cuda_index
from aikd.errors import ConfigError


@pytest.mark.parametrize(("requested", "local_rank", "visible", "index"), [
    ("cuda", None, 4, 0),  # a single process: the first visible GPU
    ("cuda:1", None, 2, 1),  # ... or the one it names
    ("cuda", 3, 8, 3),  # torchrun on an 8-GPU node: the local rank's GPU
    ("auto", 0, 2, 0),
    ("cuda", 3, 1, 0),  # Slurm binds one GPU per task: the only one this process sees, whatever its local rank
    ("cuda:1", 1, 1, 0),
])
def test_the_gpu_each_process_drives(requested, local_rank, visible, index):
    assert cuda_index(requested, local_rank, visible) == index


@pytest.mark.parametrize(("requested", "local_rank", "visible", "message"), [
    ("cuda:2", None, 2, "device=cuda:2 was asked for, but this process sees 2 GPU(s) (cuda:0 to cuda:1)"),
    ("cuda", 4, 2, "Local rank 4 has no GPU: this process sees 2"),
    ("cuda", None, 0, "this process sees no CUDA GPU"),
])
def test_a_gpu_that_is_not_there_is_refused_in_one_line(requested, local_rank, visible, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        cuda_index(requested, local_rank, visible)
    assert "\n" not in str(err.value)
