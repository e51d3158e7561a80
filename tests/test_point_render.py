"""Point-cloud renders: ground truth on a ray-cast scene, and ViewCrafter's compositing rule on hand-made points.

Ground truth: the synthetic scene of tests/synthetic_textured.py (textured sphere, wall and floor; every pixel's
colour and 3D point exact). The two reference views' true point maps (2 x 96 x 64 points) are rendered at the true
in-between cameras of a 7-frame linear path and compared with the ray-cast images there. Measured (this machine,
1 thread, and on the AVX2 numeric path): on the five in-between frames 86.3 % of the pixels are covered
(coverage >= 0.9; 82.6 % to 90.5 % per frame) and their PSNR is 28.85 dB (28.50 to 29.50 dB per frame; the
composited colour, as the video models see it; 29.64 dB after dividing by the coverage). What is lost: the wall
behind the sphere that neither reference saw, the image borders outside both references, and the blur of 1 px
splats over points resampled from other views. The bounds below are those figures rounded down (86 %, 28.8 dB),
so a change that makes the renders less faithful fails.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from reconx_core.camera_path import segment_path
from reconx_core.errors import InputError
from reconx_core.geometry import resize_cameras
from reconx_core.structure import default_radius, render_point_cloud, render_scene_path
from reconx_core.types import Cameras
from tests.synthetic_textured import arc_cameras, make_scene, render_exact

pytestmark = pytest.mark.numeric


def psnr(a, b):
    return float(-10 * torch.log10(((a - b) ** 2).mean()))


def test_true_point_cloud_renders_the_true_in_between_views(one_thread):
    refs = arc_cameras([-0.3, 0.3], 96, 64)
    images, _, points = render_exact(refs)
    path = segment_path(refs, 7, "linear")
    truth, _, _ = render_exact(path)
    out = render_point_cloud(points.reshape(-1, 3), images.permute(0, 2, 3, 1).reshape(-1, 3), path)
    assert out.rgb.shape == (7, 64, 96, 3) and out.mask.shape == (7, 64, 96) and out.depth.shape == (7, 64, 96)
    inner = slice(1, 6)
    covered = out.mask[inner] >= 0.9
    rendered = out.rgb[inner].permute(0, 3, 1, 2)
    coverage = float(covered.float().mean())
    err = ((rendered - truth[inner]) ** 2).mean(1)[covered]
    value = float(-10 * torch.log10(err.mean()))
    assert coverage >= 0.86, f"coverage {coverage:.3f}"
    assert value >= 28.8, f"PSNR {value:.2f} dB on {coverage:.1%} of the pixels"
    # the depth z-buffer: the front point's depth, close to the true depth where covered
    _, true_depth, _ = render_exact(path[3])
    rel = ((out.depth[3] - true_depth[0]).abs() / true_depth[0])[out.mask[3] >= 0.9]
    assert float(rel.median()) < 0.01


def brute_force(points, colours, K, width, height, radius, per_pixel):
    """ViewCrafter's rule written pixel by pixel (PyTorch3D points + AlphaCompositor, spec section 3)."""
    u = K[0, 0] * points[:, 0] / points[:, 2] + K[0, 2]
    v = K[1, 1] * points[:, 1] / points[:, 2] + K[1, 2]
    rgb, cover, depth = torch.zeros(height, width, 3), torch.zeros(height, width), torch.zeros(height, width)
    for j in range(height):
        for i in range(width):
            d2 = (u - i) ** 2 + (v - j) ** 2
            cand = ((d2 < radius ** 2) & (points[:, 2] > 0)).nonzero().squeeze(1).tolist()
            cand = sorted(cand, key=lambda k: float(points[k, 2]))[:per_pixel]
            trans = 1.0
            for n, k in enumerate(cand):
                a = 1 - float(d2[k]) / radius ** 2
                rgb[j, i] += trans * a * colours[k]
                trans *= 1 - a
                if n == 0:
                    depth[j, i] = points[k, 2]
            cover[j, i] = 1 - trans
    return rgb, cover, depth


@pytest.mark.parametrize("radius, per_pixel", [(1.5, 10), (2.3, 3)])
def test_compositing_follows_viewcrafters_rule(radius, per_pixel):
    g = torch.Generator().manual_seed(0)
    W, H = 12, 9
    # 150 points in front of the camera, clustered so that pixels have more candidates than per_pixel, plus a few
    # behind it that must not show
    box = torch.rand(150, 3, generator=g) * torch.tensor([0.6, 0.45, 2.0]) + torch.tensor([-0.3, -0.2, 1.0])
    points = torch.cat([box, torch.tensor([[0.0, 0.0, -1.0], [0.1, 0.0, -0.5]])])
    colours = torch.rand(points.shape[0], 3, generator=g)
    K = torch.tensor([[10.0, 0, 6.0], [0, 10.0, 4.5], [0, 0, 1]])
    cams = Cameras(torch.eye(4)[None], K[None], W, H)
    out = render_point_cloud(points, colours, cams, radius=radius, points_per_pixel=per_pixel)
    rgb, cover, depth = brute_force(points, colours, K, W, H, radius, per_pixel)
    # the same sums in another order: float32 rounding of ~10 terms of size <= 1
    torch.testing.assert_close(out.rgb[0], rgb.clamp(0, 1), rtol=0, atol=2e-6)
    torch.testing.assert_close(out.mask[0], cover, rtol=0, atol=2e-6)
    torch.testing.assert_close(out.depth[0], depth, rtol=0, atol=0)


def test_holes_are_black_and_a_lone_point_is_a_disc():
    K = torch.tensor([[20.0, 0, 8.0], [0, 20.0, 8.0], [0, 0, 1]])
    cams = Cameras(torch.eye(4)[None], K[None], 16, 16)
    point = torch.tensor([[0.1, -0.05, 2.0]])              # projects to (9.0, 7.5)
    out = render_point_cloud(point, torch.tensor([[1.0, 0.5, 0.25]]), cams, radius=2.0)
    v, u = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    alpha = (1 - ((u - 9.0) ** 2 + (v - 7.5) ** 2) / 4.0).clamp_min(0)
    torch.testing.assert_close(out.mask[0], alpha, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.rgb[0], alpha[..., None] * torch.tensor([1.0, 0.5, 0.25]), rtol=0, atol=1e-6)
    assert float(out.rgb[0][alpha == 0].abs().max()) == 0 and float(out.depth[0][alpha == 0].abs().max()) == 0
    assert float(out.depth[0][alpha > 0].min()) == 2.0


def test_default_radius_is_viewcrafters():
    assert default_radius(512, 288) == pytest.approx(1.44)   # ViewCrafter's 0.01 NDC at its render size
    assert default_radius(512, 320) == pytest.approx(1.6) and default_radius(1024, 576) == pytest.approx(2.88)
    assert default_radius(64, 64) == 1.0                       # never below 1 px


def test_scene_path_renders(one_thread):
    scene = make_scene([-0.3, 0.0, 0.3], 96, 64)
    out = render_scene_path(scene, 5, 64, 48, path="viewcrafter")
    assert len(out) == 9 and out.size == (48, 64) and out.reference_index.tolist() == [0, 4, 8]
    assert out.segment(1) == slice(4, 9)
    torch.testing.assert_close(out.cameras.cam_to_world[[0, 4, 8]], out.reference_cameras.cam_to_world)
    # at a reference camera the scene's own points give back the (cropped, resized) photo: measured 27.4 dB, the
    # blur of 1 px splats of three views' points over an image resized by 2/3
    covered = out.mask[4] >= 0.9
    assert float(covered.float().mean()) > 0.95
    assert psnr(out.frames[4].permute(1, 2, 0)[covered], out.references[1].permute(1, 2, 0)[covered]) > 27
    # made at half size and upsampled: ViewCrafter's 1024 models were trained on such renders
    half = render_scene_path(scene, 5, 64, 48, path="viewcrafter", downsample=2)
    small = render_point_cloud(*scene.confident_points(), resize_cameras(out.cameras, 32, 24))
    up = F.interpolate(small.rgb.permute(0, 3, 1, 2), size=(48, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(half.frames, up.clamp(0, 1))
    assert half.radius == default_radius(32, 24) and half.info["downsample"] == 2
    with pytest.raises(InputError, match="at 1/2 size"):
        render_scene_path(scene, 5, 63, 48, downsample=2)


def test_bad_input():
    cams = arc_cameras([0.0], 8, 8)
    with pytest.raises(InputError, match="colours"):
        render_point_cloud(torch.zeros(5, 3), torch.zeros(4, 3), cams)
    with pytest.raises(InputError, match="too large"):
        render_point_cloud(torch.zeros(5, 3), torch.zeros(5, 3), cams, radius=100)
    empty = render_point_cloud(torch.zeros(0, 3), torch.zeros(0, 3), cams)
    assert float(empty.mask.abs().max()) == 0 and empty.rgb.shape == (1, 8, 8, 3)
    with pytest.raises(InputError, match="at least 2 views"):
        render_scene_path(make_scene([0.0], 16, 16), 5)
    assert math.isfinite(float(render_point_cloud(torch.tensor([[0.0, 0.0, 3.0], [float("nan")] * 3]),
                                                  torch.ones(2, 3), cams).mask.sum()))
