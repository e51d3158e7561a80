"""Shared pytest fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one torch thread, then restore the count.

    Used where results must be bitwise reproducible (the alignment fixture was recorded on one thread: the CPU
    backward is not deterministic on two) and where small tensors run faster without thread hand-offs.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
