"""scripts/gpu_check.sh on a machine without CUDA: it stops at once, says why, and writes nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_without_cuda_the_gpu_check_stops_at_once_with_the_reason(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "gpu_check: no CUDA device" in done.stderr and "--dry-run" in done.stderr
    assert not out.exists()
