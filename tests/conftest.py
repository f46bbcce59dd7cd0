"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny models on one thread, restoring the count afterwards.

    Tiny models gain nothing from a second thread, and OpenMP threads spin badly
    on a CPU shared with another run (5-10x slower).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
