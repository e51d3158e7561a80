"""Stage-5 nodes called as ComfyUI calls them (under torch.inference_mode)."""

import tempfile
from pathlib import Path

import pytest
import torch

from nodes import comfy_bridge as bridge
from nodes.gaussian_nodes import ReconXFitGaussians, ReconXRenderGaussians, gaussians_to_splat, splat_to_gaussians
from reconx_core.errors import InputError
from reconx_core.gaussians import load_ply
from reconx_core.types import Gaussians
from tests.scene_factory import plane_scene


def fit(scene, **kw):
    args = dict(steps=20, l1_weight=0.8, ssim_weight=0.2, lpips_weight=0.0, sh_degree=1, densify=False,
                max_points=2000, seed=0)
    args.update(kw)
    with torch.inference_mode():
        return ReconXFitGaussians().fit(scene, **args)


def test_fit_outputs_native_splat_and_ply():
    scene = plane_scene(2, 48, 64)
    splat, ply = fit(scene)
    n = splat.positions.shape[1]
    assert splat.positions.shape == (1, n, 3) and splat.scales.shape == (1, n, 3)
    assert splat.rotations.shape == (1, n, 4) and splat.opacities.shape == (1, n, 1) and splat.sh.shape == (1, n, 4, 3)
    assert torch.allclose(splat.rotations.norm(dim=-1), torch.ones(1, n), atol=1e-5)
    assert float(splat.opacities.min()) >= 0 and float(splat.opacities.max()) <= 1 and float(splat.scales.min()) > 0
    assert splat.positions.device == scene.device
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "g.ply"
        path.write_bytes(bridge.file3d_bytes(ply))
        loaded = load_ply(path)
    assert torch.allclose(loaded.means, splat.positions[0]) and loaded.sh.shape == (n, 4, 3)


def test_fit_rejects_mismatched_frames_confidences_and_scenes():
    scene = plane_scene(2, 48, 64)
    with pytest.raises(InputError, match="3 frames for 2 scene cameras"):
        fit(scene, frames=torch.rand(3, 48, 64, 3))
    with pytest.raises(InputError, match="confidence maps"):
        fit(scene, confidence=torch.rand(3, 48, 64))
    with pytest.raises(InputError, match="RECONX_SCENE"):
        fit("not a scene")


def test_splat_round_trip():
    g = Gaussians(torch.randn(10, 3), torch.nn.functional.normalize(torch.randn(10, 4), dim=-1),
                  torch.randn(10, 3) * 0.1 - 3, torch.randn(10), torch.randn(10, 4, 3))
    back = splat_to_gaussians(gaussians_to_splat(g))
    assert torch.allclose(back.means, g.means) and torch.allclose(back.log_scales, g.log_scales, atol=1e-5)
    assert torch.allclose(back.opacity_logits, g.opacity_logits, atol=1e-4)
    with pytest.raises(InputError, match="SPLAT"):
        splat_to_gaussians(object())


@pytest.mark.parametrize("path", ["through cameras", "orbit"])
def test_render_node(path):
    scene = plane_scene(2, 48, 64)
    splat, _ = fit(scene, steps=5)
    with torch.inference_mode():
        frames, depth, alpha = ReconXRenderGaussians().render(splat, scene, path, 3, 32, 24)
    assert frames.shape == (3, 24, 32, 3) and depth.shape == (3, 24, 32, 3) and alpha.shape == (3, 24, 32)
    assert float(frames.min()) >= 0 and float(frames.max()) <= 1
    assert float(alpha.mean()) > 0.3  # the plane fills most of the view


def test_render_through_cameras_reproduces_the_training_view():
    scene = plane_scene(2, 48, 64)
    splat, _ = fit(scene, steps=150)
    with torch.inference_mode():
        frames, _, _ = ReconXRenderGaussians().render(splat, scene, "through cameras", 2, 0, 0)
    target = scene.images.permute(0, 2, 3, 1)
    mse = ((frames - target) ** 2).mean()
    psnr = -10 * torch.log10(mse)
    assert psnr > 20, f"PSNR {psnr:.1f} dB on the training views after 150 steps"


def test_fit_from_confidence_mapped_views():
    from reconx_core.types import Views

    frames_scene = plane_scene(4, 48, 64)
    conf = torch.ones(4, 48, 64)
    conf[1, :, :32] = 0.0  # a region the confidence mapping distrusts
    frames = frames_scene.images.clone()
    frames[1, :, :, :32] = torch.tensor([1.0, 0.0, 1.0])[:, None, None]  # ... and it is indeed wrong (magenta)
    views = Views(frames=frames, reference_index=torch.tensor([0, 3]), reference_cameras=frames_scene.cameras[torch.tensor([0, 3])],
                  cameras=frames_scene.cameras, conf=conf, pts3d=frames_scene.pts3d)
    splat, _ = fit(plane_scene(2, 48, 64), views=views, steps=150)
    with torch.inference_mode():
        rendered, _, _ = ReconXRenderGaussians().render(splat, frames_scene, "through cameras", 4, 0, 0)
    truth = frames_scene.images.permute(0, 2, 3, 1)
    # the magenta region was ignored: frame 1 renders the true texture there
    error = (rendered[1, :, :32] - truth[1, :, :32]).abs().mean()
    assert error < 0.08, f"mean error {error:.3f} in the zero-confidence region"
