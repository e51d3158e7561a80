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


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """The tiny random-weight models written once per module into a models folder (dust3r/, reconx/)."""
    from reconx_core.testing import write_tiny_models

    root = tmp_path_factory.mktemp("models")
    write_tiny_models(root)
    return root


@pytest.fixture
def use_models(models_dir, monkeypatch):
    """`models_dir` as the pack's model folders (the nodes' fallback when ComfyUI is absent)."""
    from nodes import comfy_bridge as bridge

    monkeypatch.setattr(bridge, "_FALLBACK_MODELS_DIR", models_dir)
