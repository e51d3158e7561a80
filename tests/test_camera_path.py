"""Camera paths: through the given cameras (slerp + spline/linear) and an orbit."""

import math

import pytest
import torch

from reconx_core.camera_path import interpolate_cameras, orbit_cameras, quat_to_rotmat, rotmat_to_quat, slerp
from reconx_core.errors import InputError
from tests.synthetic_textured import arc_cameras

pytestmark = pytest.mark.numeric  # float32 tolerances: CI runs it again on a second numeric path (test-numeric)
# Rotations and unit quaternions (magnitude 1) keep absolute bounds of 1e-6 (8 eps) to 1e-5 (84 eps), relative to
# their magnitude in effect: measured at most 6 % of each bound on five numeric paths.
EPS32 = torch.finfo(torch.float32).eps


def random_rotations(n, seed=0):
    q = torch.nn.functional.normalize(torch.randn(n, 4, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return quat_to_rotmat(q), q


def test_quaternion_round_trip_and_orthonormal():
    R, q = random_rotations(200)
    q2 = rotmat_to_quat(R)
    torch.testing.assert_close(quat_to_rotmat(q2), R, atol=1e-5, rtol=0)
    torch.testing.assert_close(q2.abs(), q.abs() * torch.sign(q[:, :1]).abs(), atol=1e-5, rtol=0)  # q or -q
    torch.testing.assert_close(R @ R.transpose(1, 2), torch.eye(3).expand(200, 3, 3), atol=1e-5, rtol=0)
    # 180-degree rotations (trace -1) are where naive formulas fail.
    flips = torch.diag_embed(torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1]]))
    torch.testing.assert_close(quat_to_rotmat(rotmat_to_quat(flips)), flips, atol=1e-6, rtol=0)


def test_slerp_constant_angular_speed():
    axis = torch.nn.functional.normalize(torch.tensor([0.3, -0.5, 0.8]), dim=0)
    angle = 2.0
    q0 = torch.tensor([[1.0, 0, 0, 0]])
    q1 = torch.cat([torch.tensor([math.cos(angle / 2)]), math.sin(angle / 2) * axis])[None]
    for t in (0.0, 0.25, 0.5, 0.9, 1.0):
        q = slerp(q0, q1, torch.tensor([t]))
        expect = torch.cat([torch.tensor([math.cos(t * angle / 2)]), math.sin(t * angle / 2) * axis])[None]
        torch.testing.assert_close(q, expect, atol=1e-6, rtol=0)
    # shortest arc: -q1 is the same rotation and gives the same path
    torch.testing.assert_close(slerp(q0, -q1, torch.tensor([0.3])), slerp(q0, q1, torch.tensor([0.3])), atol=1e-6, rtol=0)


@pytest.mark.parametrize("positions", ["spline", "linear"])
def test_path_visits_every_camera(positions):
    cams = arc_cameras([-0.4, -0.1, 0.2, 0.5])
    cams.intrinsics[2, 0, 0] *= 1.2
    path = interpolate_cameras(cams, 13, positions=positions)   # cameras land on frames 0, 4, 8, 12
    assert len(path) == 13 and (path.width, path.height) == (cams.width, cams.height)
    torch.testing.assert_close(path.cam_to_world[::4], cams.cam_to_world, atol=1e-5, rtol=0)
    torch.testing.assert_close(path.intrinsics[::4], cams.intrinsics)
    R = path.cam_to_world[:, :3, :3]
    torch.testing.assert_close(R @ R.transpose(1, 2), torch.eye(3).expand(13, 3, 3), atol=1e-5, rtol=0)
    # The arc's cameras all look at the origin from radius 3: the path stays close to that circle,
    # and consecutive steps are even (no jumps).
    centres = path.cam_to_world[:, :3, 3]
    r = centres[:, [0, 2]].norm(dim=-1)
    assert (r - 3.0).abs().max() < (0.025 if positions == "spline" else 0.05)
    if positions == "spline":  # inner segments have true neighbours on both sides: much closer to the arc
        assert (r[4:9] - 3.0).abs().max() < 2e-3
    steps = (centres[1:] - centres[:-1]).norm(dim=-1)
    assert steps.max() / steps.min() < 1.1


def test_spline_is_smoother_than_linear_at_the_cameras():
    cams = arc_cameras([-0.6, -0.2, 0.2, 0.6])
    def kink(path):  # largest change of direction between consecutive steps
        d = torch.nn.functional.normalize(path.cam_to_world[1:, :3, 3] - path.cam_to_world[:-1, :3, 3], dim=-1)
        return torch.acos((d[1:] * d[:-1]).sum(-1).clamp(-1, 1)).max()
    assert kink(interpolate_cameras(cams, 31, "spline")) < 0.5 * kink(interpolate_cameras(cams, 31, "linear"))


def test_orbit_circles_the_center_looking_at_it():
    cams = arc_cameras([-0.3, 0.0, 0.3])
    orbit = orbit_cameras(cams, 24)
    centre = torch.zeros(3)   # the arc cameras look at the origin; the default centre must find it
    eyes = orbit.cam_to_world[:, :3, 3]
    torch.testing.assert_close(eyes[0], cams.cam_to_world[0, :3, 3], atol=1e-4, rtol=0)
    fwd = orbit.cam_to_world[:, :3, 2]
    to_centre = torch.nn.functional.normalize(centre - eyes, dim=-1)
    assert ((fwd * to_centre).sum(-1) > 1 - 1e-5).all()
    dist = (eyes - centre).norm(dim=-1)
    assert (dist - dist[0]).abs().max() < 1e-4
    # A full turn: evenly spaced angles, back near the start after 24 frames.
    steps = (eyes[1:] - eyes[:-1]).norm(dim=-1)
    assert steps.max() / steps.min() < 1.001
    assert ((eyes[-1] + steps[0] * 0) - eyes[0]).norm() < 1.01 * steps.mean()
    R = orbit.cam_to_world[:, :3, :3]
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(24), atol=1e-5, rtol=0)


def test_bad_arguments():
    cams = arc_cameras([0.0, 0.3])
    with pytest.raises(InputError, match="frames"):
        interpolate_cameras(cams, 0)
    with pytest.raises(InputError, match="positions"):
        interpolate_cameras(cams, 5, positions="bezier")
    one = interpolate_cameras(cams[0], 4)
    assert torch.equal(one.cam_to_world, cams.cam_to_world[:1].expand(4, 4, 4))


def test_viewcrafter_path_matches_the_official_one():
    """`viewcrafter_path` against pvd_utils.generate_traj_interp's own output (tests/data/viewcrafter_tiny_io:
    3 poses, ns = 5): poses to 1e-6 (the official spline runs in float64 on float32 inputs; measured 1.4e-7),
    focals and principal points exactly the official weights j/(ns-2)."""
    from pathlib import Path

    from safetensors.torch import load_file

    from reconx_core.camera_path import segment_path, viewcrafter_path
    from reconx_core.types import Cameras

    io = load_file(str(Path(__file__).resolve().parent / "data" / "viewcrafter_tiny_io.safetensors"))
    f, pp = io["traj_in_focal"][:, 0], io["traj_in_pp"]
    K = torch.zeros(3, 3, 3)
    K[:, 0, 0] = K[:, 1, 1] = f
    K[:, :2, 2], K[:, 2, 2] = pp, 1
    cams = Cameras(io["traj_in_c2w"].double(), K.double(), 512, 288)
    path = viewcrafter_path(cams, 5)
    assert len(path) == 9 and path.cam_to_world.dtype == torch.float64
    torch.testing.assert_close(path.cam_to_world, io["traj_out_c2w"], atol=1e-6, rtol=0)
    # float32 values of magnitude 410 (ulp 3.1e-5): relative, 8 eps (3.9e-4 here); an absolute 1e-4 was 3.3 ulps and
    # the focals measure 1 ulp off on every numeric path. Weights j/(ns-1) instead would be 0.83 px off.
    torch.testing.assert_close(path.intrinsics[:, 0, 0].float(), io["traj_out_focal"][:, 0], atol=0, rtol=8 * EPS32)
    torch.testing.assert_close(path.intrinsics[:, :2, 2].float(), io["traj_out_pp"], atol=0, rtol=8 * EPS32)
    # the same through segment_path; the other kinds visit the references at frames k (L-1) too
    torch.testing.assert_close(segment_path(cams, 5, "viewcrafter").cam_to_world, path.cam_to_world)
    for kind in ("linear", "spline"):
        other = segment_path(cams.to(dtype=torch.float32), 5, kind)
        assert len(other) == 9
        torch.testing.assert_close(other.cam_to_world[[0, 4, 8]], io["traj_in_c2w"], atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="unknown segment path"):
        segment_path(cams, 5, "bezier")
    with pytest.raises(InputError, match="at least 2 cameras"):
        viewcrafter_path(cams[0], 5)
