"""reconx_core.align.pnp: the PnP behind the spanning-tree init (its fixture parity is in test_align.py)."""

import math

import cv2
import numpy as np
import pytest
import roma
import torch

from reconx_core.align import image_confidence
from reconx_core.align.geometry import pixel_grid
from reconx_core.align.init import chain_spanning_tree
from reconx_core.align.pnp import _algebraic_system, pnp_camera_pose, solve_pnp
from tests.fixtures import load_tensors

pytestmark = [pytest.mark.usefixtures("one_thread"),  # see tests/conftest.py
              pytest.mark.numeric]  # float32 parity with OpenCV: CI runs it again on a second numeric path

# Bounds: the float64 tests keep absolute bounds of 1e-9 to 1e-12 on values of magnitude <= 3 (>= 1e3 x eps64 times
# the conditioning; measured <= 7.8e-16, and 2.5e-12 against OpenCV's iterative SQPnP). Float32 results are held
# relative to their magnitude, in units of eps32 (below); measured under five numeric paths (default,
# MKL_CBWR=COMPATIBLE, MKL/oneDNN AVX2, those + ATEN avx2, ATEN default).
EPS32 = torch.finfo(torch.float32).eps


def _scene(n=400, focal=300.0, pp=(128.0, 96.0), seed=0):
    """Points in front of a known camera and their exact pixels; returns points, pixels, world_to_cam (4, 4)."""
    gen = torch.Generator().manual_seed(seed)
    rot = roma.rotvec_to_rotmat(torch.tensor([0.3, -0.5, 0.2], dtype=torch.float64))
    trans = torch.tensor([0.4, -0.2, 3.0], dtype=torch.float64)
    cam = torch.rand(n, 3, generator=gen, dtype=torch.float64) * torch.tensor([2.0, 1.5, 2.0]) \
        + torch.tensor([-1.0, -0.75, 1.0])
    pixels = cam[:, :2] / cam[:, 2:] * focal + torch.tensor(pp, dtype=torch.float64)
    points = (cam - trans) @ rot  # world = R^T (cam - t)
    world_to_cam = torch.eye(4, dtype=torch.float64)
    world_to_cam[:3, :3], world_to_cam[:3, 3] = rot, trans
    return points, pixels, world_to_cam


def _algebraic_cost(points, pixels, focal, pp, rot, trans):
    m = (pixels - torch.tensor(pp, dtype=torch.float64)) / focal
    cam = points @ rot.T + trans
    return float((cam[:, :2] - m * cam[:, 2:]).square().sum())


def test_exact_correspondences_give_the_exact_pose():
    points, pixels, truth = _scene()
    world_to_cam, n_inliers = solve_pnp(points, pixels, 300.0, (128.0, 96.0))
    assert n_inliers == 400
    assert (world_to_cam - truth).abs().max() < 1e-9


def test_outliers_are_trimmed_at_the_reprojection_threshold():
    points, pixels, truth = _scene(seed=1)
    gen = torch.Generator().manual_seed(2)
    bad = torch.randperm(400, generator=gen)[:100]  # a quarter of the matches 20-100 px off
    angle = torch.rand(100, generator=gen, dtype=torch.float64) * 2 * math.pi
    size = 20 + 80 * torch.rand(100, generator=gen, dtype=torch.float64)
    pixels = pixels.clone()
    pixels[bad] += torch.stack((angle.cos(), angle.sin()), -1) * size[:, None]
    world_to_cam, n_inliers = solve_pnp(points, pixels, 300.0, (128.0, 96.0))
    assert n_inliers == 300
    assert (world_to_cam - truth).abs().max() < 1e-9


def test_noisy_pose_minimises_the_algebraic_cost_that_opencv_sqpnp_minimises():
    points, pixels, _ = _scene(seed=3)
    pixels = pixels + torch.randn(pixels.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    world_to_cam, _ = solve_pnp(points, pixels, 300.0, (128.0, 96.0))
    rot, trans = world_to_cam[:3, :3], world_to_cam[:3, 3]
    assert torch.allclose(rot @ rot.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    best = _algebraic_cost(points, pixels, 300.0, (128.0, 96.0), rot, trans)
    # t(R) and r^T Omega r are the closed-form elimination of t: same cost, same translation
    m = (pixels - torch.tensor((128.0, 96.0), dtype=torch.float64)) / 300.0
    omega, p_mat = _algebraic_system(points, m)
    assert float(rot.reshape(9) @ omega @ rot.reshape(9)) == pytest.approx(best, rel=1e-9)
    assert torch.allclose(p_mat @ rot.reshape(9), trans, atol=1e-12)
    # a local minimum on SO(3) x R^3: every small rotation (translation re-optimised) costs more
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        delta = torch.randn(3, generator=gen, dtype=torch.float64) * 1e-4
        other = roma.rotvec_to_rotmat(delta) @ rot
        assert _algebraic_cost(points, pixels, 300.0, (128.0, 96.0), other, p_mat @ other.reshape(9)) > best


def test_unknown_focal_is_searched_and_fewer_than_four_points_fail():
    H, W = 384, 512
    candidates = torch.logspace(math.log10(W / 2), math.log10(W * 3), 21, dtype=torch.float64).tolist()
    focal = candidates[13]  # 21 candidates in [W/2, 3W], as the official fast_pnp tries
    rot = roma.rotvec_to_rotmat(torch.tensor([0.1, 0.2, -0.1], dtype=torch.float64))
    depth = 1.0 + 4.0 * torch.rand(H, W, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    uv = pixel_grid(H, W, "cpu", torch.float64)
    cam = torch.cat(((uv - torch.tensor((W / 2, H / 2))) / focal * depth[..., None], depth[..., None]), -1)
    trans = torch.tensor([0.1, 0.0, 0.5], dtype=torch.float64)
    pts_world = ((cam - trans) @ rot).float()
    mask = torch.ones(H, W, dtype=torch.bool)
    found, cam_to_world = pnp_camera_pose(pts_world, mask)
    assert found == pytest.approx(focal, rel=1e-12)  # its neighbours, 9 % off, leave points beyond 5 px
    truth = torch.eye(4, dtype=torch.float64)
    truth[:3, :3], truth[:3, 3] = rot.T, -rot.T @ trans
    assert cam_to_world.dtype == torch.float32
    # float32 points (each rounded by eps/2) through a float64 solve, stored in float32: 64 eps of the pose's
    # magnitude (7.6e-6) for the conditioning; measured 8.7e-8 (0.7 eps) on every path. A half-pixel slip of the
    # pixel grid still fails it: 6.5e-4.
    torch.testing.assert_close(cam_to_world.double(), truth, rtol=0, atol=64 * EPS32 * float(truth.abs().max()))
    few = torch.zeros(H, W, dtype=torch.bool)
    few[0, :3] = True
    assert pnp_camera_pose(pts_world, few, focal) is None


def _opencv_pose(points, pixels, focal, pp):
    """The official `fast_pnp` call for one focal: world_to_cam (4, 4) float64 and the inlier count."""
    K = np.float32([(focal, 0, pp[0]), (0, focal, pp[1]), (0, 0, 1)])
    ok, rvec, tvec, inliers = cv2.solvePnPRansac(points.float().numpy(), pixels.float().numpy(), K, None,
                                                 iterationsCount=10, reprojectionError=5, flags=cv2.SOLVEPNP_SQPNP)
    assert ok
    world_to_cam = torch.eye(4, dtype=torch.float64)
    world_to_cam[:3, :3] = torch.from_numpy(cv2.Rodrigues(rvec)[0])
    world_to_cam[:3, 3] = torch.from_numpy(tvec.ravel())
    return world_to_cam, len(inliers)


@pytest.mark.parametrize("seed", range(5))
def test_matches_opencv_sqpnp_on_noisy_matches_with_outliers(seed):
    points, pixels, _ = _scene(n=500, seed=10 + seed)
    gen = torch.Generator().manual_seed(seed)
    pixels = pixels + 0.2 * torch.randn(pixels.shape, generator=gen, dtype=torch.float64)
    pixels[torch.randperm(500, generator=gen)[:50]] += 60.0  # 10 % gross outliers
    pixels = pixels.float().double()  # what OpenCV receives from DUSt3R: float32
    ours, n_ours = solve_pnp(points.float().double(), pixels, 300.0, (128.0, 96.0))
    theirs, n_theirs = _opencv_pose(points, pixels, 300.0, (128.0, 96.0))
    assert n_ours == n_theirs == 450
    assert (ours - theirs).abs().max() < 1e-8


def test_matches_opencv_on_the_alignment_fixture_views():
    """The two views the fixture's spanning-tree init poses by PnP, exactly as the official code calls OpenCV."""
    ga = load_tensors("dust3r_globalalign.safetensors")
    edges, conf_i, conf_j = ga["in_edges"], ga["in_pred1_conf"], ga["in_pred2_conf"]
    im_conf = image_confidence(edges, conf_i, conf_j, 4)
    pts3d, focals, _, tree = chain_spanning_tree(edges.tolist(), ga["in_pred1_pts3d"],
                                                 ga["in_pred2_pts3d_in_other_view"], conf_i, conf_j, im_conf, 3.0)
    posed_by_tree = {i for i, _ in tree}  # the root, and every later edge's view i through its Procrustes
    by_pnp = [v for v in range(4) if v not in posed_by_tree]
    assert len(by_pnp) == 2
    H, W = 32, 48
    pixels = pixel_grid(H, W, "cpu")
    for v in by_pnp:
        mask = im_conf[v] > 3.0
        _, ours = pnp_camera_pose(pts3d[v], mask, focals[v])
        world_to_cam, n_inliers = _opencv_pose(pts3d[v][mask], pixels[mask], focals[v], (W / 2, H / 2))
        assert n_inliers == int(mask.sum())
        # OpenCV's float64 pose, inverted in float64, against ours in float32: rounding to float32 plus a few
        # float32 operations, 8 eps of the pose's magnitude (1.2e-6 here). Measured: equal on all five paths (0.8 eps
        # against a float32 inverse, which an absolute 3e-7 left 2.5x for); a half-pixel slip of the grid: 9.6e-3.
        reference = torch.linalg.inv(world_to_cam).float()
        torch.testing.assert_close(ours, reference, rtol=0, atol=8 * EPS32 * float(reference.abs().max()))
