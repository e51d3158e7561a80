"""The held-out evaluation node: plumbing with tiny models, the queue-time LPIPS check, bad input, the text."""

import pytest
import torch

from nodes import comfy_bridge as bridge
from nodes.dust3r_nodes import ReconXDust3rAlign
from nodes.evaluation_nodes import ReconXEvaluateHeldOut, format_heldout_metrics
from nodes.gaussian_nodes import ReconXFitGaussians
from nodes.loader_nodes import ReconXDust3rLoader
from reconx_core.errors import InputError
from reconx_core.evaluation import SceneResult
from reconx_core.testing import TINY_DUST3R, write_tiny_models
from reconx_core.types import Cameras
from tests.scene_factory import plane_scene


@pytest.fixture
def models(tmp_path, monkeypatch):
    write_tiny_models(tmp_path)
    monkeypatch.setattr(bridge, "_FALLBACK_MODELS_DIR", tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no LPIPS backbone anywhere
    return tmp_path


def test_held_out_photo_is_scored_with_text_and_comparison(models, one_thread):
    views = plane_scene(n_views=3, height=64, width=96).images.permute(0, 2, 3, 1)  # ComfyUI IMAGE layout
    with torch.inference_mode():
        (dust3r,) = ReconXDust3rLoader().load(TINY_DUST3R, "auto", "auto")
        scene, *_ = ReconXDust3rAlign().align(views[:2], dust3r, "complete", 5, 0.01, "cosine", 1.0, 2, False)
        splat, _ = ReconXFitGaussians().fit(scene, 5, 0.8, 0.2, 0.0, 0, False, 2000, 0)
        out = ReconXEvaluateHeldOut().evaluate(splat, scene, dust3r, views[2:], 5, 2, "off")
    text, sheet = out["result"]
    assert out["ui"]["text"] == [text]
    lines = text.splitlines()
    assert lines[0].split() == ["photo", "PSNR", "SSIM"]       # LPIPS off
    assert lines[1].split()[0] == "1" and len(lines[1].split()) == 3
    assert any(line.strip().startswith("mean refined") for line in lines)  # refine_steps 2
    h, w = scene.cameras.height, scene.cameras.width
    assert sheet.shape == (1, h, 4 * w + 3 * 4, 3) and 0 <= float(sheet.min()) and float(sheet.max()) <= 1


def test_missing_lpips_backbone_is_reported_when_the_prompt_is_queued(models):
    message = ReconXEvaluateHeldOut.VALIDATE_INPUTS("vgg")
    assert isinstance(message, str) and "vgg16-397923af.pth" in message and "lpips = off" in message
    assert "ReconX Evaluate Held-out Photos" in message
    assert ReconXEvaluateHeldOut.VALIDATE_INPUTS("off") is True
    assert "must be one of" in ReconXEvaluateHeldOut.VALIDATE_INPUTS("squeeze")
    (models / "reconx" / "vgg16-397923af.pth").write_bytes(b"present")  # found without being read
    assert ReconXEvaluateHeldOut.VALIDATE_INPUTS("vgg") is True


def test_held_out_photo_of_another_shape_is_a_clear_error(models):
    """The tiny DUSt3R sees 224x224 crops; a scene aligned at 96x64 cannot take them."""
    scene = plane_scene(n_views=2, height=64, width=96)
    with torch.inference_mode():
        (dust3r,) = ReconXDust3rLoader().load(TINY_DUST3R, "auto", "auto")
        splat, _ = ReconXFitGaussians().fit(scene, 2, 0.8, 0.2, 0.0, 0, False, 1000, 0)
        with pytest.raises(InputError, match="same size and orientation"):
            ReconXEvaluateHeldOut().evaluate(splat, scene, dust3r, torch.rand(1, 96, 64, 3), 2, 0, "off")


def test_metrics_text_lists_every_photo_and_the_means():
    cams = Cameras(torch.eye(4).repeat(2, 1, 1), torch.eye(3).repeat(2, 1, 1), 4, 4)
    result = SceneResult("heldout", [2, 3], {"psnr": [20.0, 30.0], "ssim": [0.5, 0.7], "lpips": [0.2, 0.4]},
                         torch.zeros(2, 3, 4, 4), cams)
    lines = format_heldout_metrics(result).splitlines()
    assert lines[0].split() == ["photo", "PSNR", "SSIM", "LPIPS"]
    assert [float(x) for x in lines[3].split()[1:]] == [25.0, 0.6, pytest.approx(0.3)]
