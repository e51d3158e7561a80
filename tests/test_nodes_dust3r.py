"""Stage-1 nodes called directly (as ComfyUI would), with the tiny DUSt3R fixture as the checkpoint."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from nodes import comfy_bridge as bridge
from nodes.dust3r_nodes import ReconXDust3rAlign
from nodes.loader_nodes import ReconXDust3rLoader
from reconx_core.errors import CheckpointError, InputError
from reconx_core.export import read_point_cloud_ply
from reconx_core.types import Scene
from tests.fixtures import fixture_path


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(bridge, "_FALLBACK_MODELS_DIR", tmp_path)
    (tmp_path / "dust3r").mkdir()
    # "_224_" in the name makes the loader pick the 224 preprocessing, which keeps the test small.
    shutil.copy(fixture_path("tiny_dpt.safetensors"), tmp_path / "dust3r" / "tiny_224_dpt.safetensors")
    return tmp_path / "dust3r"


def comfy_images(*names):
    """ComfyUI IMAGE batch (B, H, W, 3) from the fixture PNGs, as LoadImage would give it."""
    arrays = [np.asarray(Image.open(fixture_path(n)).convert("RGB"), dtype=np.float32) / 255 for n in names]
    return torch.from_numpy(np.stack(arrays))


def test_loader_lists_and_loads_the_checkpoint(models_dir):
    assert "tiny_224_dpt.safetensors" in ReconXDust3rLoader.INPUT_TYPES()["required"]["ckpt_name"][0]
    (model,) = ReconXDust3rLoader().load("tiny_224_dpt.safetensors", "fp32", "cpu")
    assert isinstance(model, bridge.ManagedModel)
    assert model.acquire().image_size == 224


def test_align_node_outputs(models_dir):
    (model,) = ReconXDust3rLoader().load("tiny_224_dpt.safetensors", "auto", "cpu")
    images = comfy_images("dust3r_tiny_img0.png", "dust3r_tiny_img1.png", "dust3r_tiny_img0.png")
    images[2] = images[2].flip(1)  # a third, different view
    scene, depth, mask, ply = ReconXDust3rAlign().align(images, model, "complete", 20, 0.01, "cosine", 1.5, 4, True)
    assert isinstance(scene, Scene) and len(scene) == 3
    H, W = scene.cameras.height, scene.cameras.width
    assert (H, W) == (224, 224)  # DUSt3R's 224 preprocessing: short side to 224, centre square crop
    assert depth.shape == (3, H, W, 3) and mask.shape == (3, H, W)
    assert 0 <= float(mask.min()) and float(mask.max()) < 1
    points, colours = read_point_cloud_ply(bridge.file3d_bytes(ply))
    assert points.shape[0] == int((scene.conf > 1.5).sum()) and torch.isfinite(points).all()
    assert np.isfinite(scene.info["loss"])


def test_align_node_progress_and_interrupt(models_dir):
    (model,) = ReconXDust3rLoader().load("tiny_224_dpt.safetensors", "fp32", "cpu")
    images = comfy_images("dust3r_tiny_img0.png", "dust3r_tiny_img1.png")
    bridge.request_interrupt()
    try:
        with pytest.raises(bridge.Interrupted):
            ReconXDust3rAlign().align(images, model, "complete", 50)
    finally:
        bridge.request_interrupt(False)


@pytest.mark.parametrize("make_images, message", [
    (lambda: comfy_images("dust3r_tiny_img0.png"), "at least 2 views"),
    (lambda: torch.rand(2, 40, 48, 3), "64"),
    (lambda: comfy_images("dust3r_tiny_img0.png", "dust3r_tiny_img1.png").index_fill_(1, torch.tensor([3]), float("nan")),
     "NaN"),
])
def test_align_node_bad_images(models_dir, make_images, message):
    (model,) = ReconXDust3rLoader().load("tiny_224_dpt.safetensors", "fp32", "cpu")
    with pytest.raises(InputError, match=message):
        ReconXDust3rAlign().align(make_images(), model)


def test_loader_rejects_foreign_and_truncated_files(models_dir):
    from safetensors.torch import save_file

    save_file({"unet.weight": torch.zeros(3)}, str(models_dir / "not_dust3r.safetensors"))
    with pytest.raises(CheckpointError, match="patch_embed"):
        ReconXDust3rLoader().load("not_dust3r.safetensors", "fp32", "cpu")
    data = (models_dir / "tiny_224_dpt.safetensors").read_bytes()
    (models_dir / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ReconXDust3rLoader().load("truncated.safetensors", "fp32", "cpu")
    with pytest.raises(CheckpointError, match="not found"):
        ReconXDust3rLoader().load("absent.pth", "fp32", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="half precision is refused only without a GPU")
def test_loader_refuses_half_precision_on_cpu(models_dir):
    with pytest.raises(InputError, match="needs a CUDA GPU"):
        ReconXDust3rLoader().load("tiny_224_dpt.safetensors", "bf16", "cpu")
