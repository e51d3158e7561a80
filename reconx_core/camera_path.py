"""Camera paths for rendering Gaussians: a smooth path through given cameras, and an orbit around the scene.

Rotations are interpolated by quaternion slerp (constant angular speed, shortest arc); positions either linearly
or by a Catmull-Rom spline through the camera centres (C1-smooth, passes through every camera). Intrinsics are
interpolated linearly. Poses are OpenCV camera-to-world (DESIGN.md).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .errors import InputError
from .geometry import quat_to_rotmat, resize_cameras, robust_center, rotmat_to_quat, slerp
from .types import Cameras, Scene


def _catmull_rom(p: torch.Tensor, seg: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Uniform Catmull-Rom through points p (K, 3) at segment seg (M,) long, local t (M,); ends are mirrored."""
    K = p.shape[0]
    ext = torch.cat([2 * p[:1] - p[1:2], p, 2 * p[-1:] - p[-2:-1]], 0) if K > 1 else p.repeat(3, 1)
    p0, p1, p2, p3 = ext[seg], ext[seg + 1], ext[seg + 2], ext[seg + 3]
    t = t[:, None]
    return 0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t * t
                  + (-p0 + 3 * p1 - 3 * p2 + p3) * t * t * t)


def interpolate_cameras(cameras: Cameras, frames: int, positions: str = "spline") -> Cameras:
    """A path of `frames` cameras visiting the given cameras in order (first and last frames are exactly them).

    cameras: K >= 1 cameras (c2w (K, 4, 4), intrinsics (K, 3, 3)).  frames: >= 1 output cameras.
    positions: "spline" (Catmull-Rom through the centres) or "linear".  Rotations are slerped per segment.
    Returns Cameras of length `frames`, same image size; camera k of the input is frame round(k (frames-1)/(K-1)).
    """
    if frames < 1:
        raise InputError(f"frames must be >= 1, got {frames}")
    if positions not in ("spline", "linear"):
        raise InputError(f"positions must be 'spline' or 'linear', got {positions!r}")
    K = len(cameras)
    c2w, intr = cameras.cam_to_world, cameras.intrinsics
    if K == 1 or frames == 1:
        idx = torch.zeros(frames, dtype=torch.long, device=c2w.device)
        return Cameras(c2w[idx], intr[idx], cameras.width, cameras.height)
    s = torch.linspace(0, K - 1, frames, dtype=torch.float64, device=c2w.device)
    seg = s.floor().long().clamp(max=K - 2)
    t = (s - seg).to(c2w.dtype)
    q = rotmat_to_quat(c2w[:, :3, :3])
    R = quat_to_rotmat(slerp(q[seg], q[seg + 1], t))
    centres = c2w[:, :3, 3]
    if positions == "spline":
        pos = _catmull_rom(centres, seg, t)
    else:
        pos = centres[seg] + t[:, None] * (centres[seg + 1] - centres[seg])
    out = torch.eye(4, dtype=c2w.dtype, device=c2w.device).repeat(frames, 1, 1)
    out[:, :3, :3], out[:, :3, 3] = R, pos
    K_out = intr[seg] + t[:, None, None] * (intr[seg + 1] - intr[seg])
    return Cameras(out, K_out, cameras.width, cameras.height)


def orbit_cameras(cameras: Cameras, frames: int, center: Optional[torch.Tensor] = None,
                  radius: Optional[float] = None, turns: float = 1.0) -> Cameras:
    """`frames` cameras on a circle around `center`, all looking at it, starting at the first camera.

    The circle lies in the plane through the first camera's position perpendicular to the cameras' mean "up"
    (-y axis of OpenCV cameras); its radius is that camera's distance from the axis unless given. Intrinsics and
    image size are the first camera's. center: (3,) world point (default: the point the cameras look at most
    closely, least squares over their optical axes).
    """
    if frames < 1:
        raise InputError(f"frames must be >= 1, got {frames}")
    c2w = cameras.cam_to_world
    dt = c2w.dtype
    if center is None:
        center = _closest_point_to_axes(c2w[:, :3, 3], c2w[:, :3, 2])
    center = torch.as_tensor(center, dtype=dt, device=c2w.device).reshape(3)
    up = torch.nn.functional.normalize(-c2w[:, :3, 1].mean(0), dim=0)   # world direction of image "up"
    start = c2w[0, :3, 3] - center
    height = (start @ up) * up
    radial = start - height
    r = float(radial.norm()) if radius is None else float(radius)
    if r < 1e-9:
        raise InputError("the first camera sits on the orbit axis; pass a radius or a different center")
    e1 = radial / radial.norm()
    e2 = torch.linalg.cross(up, e1)
    angles = torch.arange(frames, dtype=dt, device=c2w.device) * (2 * math.pi * turns / frames)
    eyes = center + height + r * (torch.cos(angles)[:, None] * e1 + torch.sin(angles)[:, None] * e2)
    fwd = torch.nn.functional.normalize(center - eyes, dim=-1)
    right = torch.nn.functional.normalize(torch.linalg.cross(fwd, up.expand_as(fwd), dim=-1), dim=-1)
    down = torch.linalg.cross(fwd, right, dim=-1)
    out = torch.eye(4, dtype=dt, device=c2w.device).repeat(frames, 1, 1)
    out[:, :3, 0], out[:, :3, 1], out[:, :3, 2], out[:, :3, 3] = right, down, fwd, eyes
    return Cameras(out, cameras.intrinsics[:1].expand(frames, 3, 3).clone(), cameras.width, cameras.height)


def _closest_point_to_axes(origins: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Least-squares point nearest to the lines origins + s dirs (K, 3); the mean origin + forward when parallel."""
    d = torch.nn.functional.normalize(dirs, dim=-1)
    P = torch.eye(3, dtype=d.dtype, device=d.device) - d[:, :, None] * d[:, None, :]
    A, b = P.sum(0), (P @ origins[:, :, None]).sum(0)[:, 0]
    if torch.linalg.matrix_rank(A) < 3:
        return origins.mean(0) + d.mean(0)
    return torch.linalg.solve(A, b)


PATH_KINDS = ("through cameras", "orbit")


def scene_path(scene: Scene, kind: str, frames: int, width: int = 0, height: int = 0) -> Cameras:
    """Cameras to render a scene along: "through cameras" (a smooth path visiting every scene camera in order) or
    "orbit" (a circle around the median of the confident points through the first camera's position).

    width, height: output size; 0 keeps the scene's (the intrinsics follow a resize exactly).
    """
    if kind not in PATH_KINDS:
        raise InputError(f"unknown path {kind!r}; choose one of {PATH_KINDS}")
    if kind == "through cameras":
        cameras = interpolate_cameras(scene.cameras, frames)
    else:
        points = scene.confident_points()[0]
        if points.shape[0] == 0:
            points = scene.pts3d.reshape(-1, 3)[torch.isfinite(scene.pts3d.reshape(-1, 3)).all(-1)]
        cameras = orbit_cameras(scene.cameras, frames, center=robust_center(points))
    if width or height:
        cameras = resize_cameras(cameras, width or cameras.width, height or cameras.height)
    return cameras


# ----------------------------------------------------------------------------------------------- video segments
SEGMENT_PATH_KINDS = ("linear", "spline", "viewcrafter")


def viewcrafter_path(cameras: Cameras, frames: int = 25) -> Cameras:
    """ViewCrafter's sparse-view camera path (`generate_traj_interp` of Drexubery/ViewCrafter), quirks included.

    cameras: K >= 2 reference cameras; frames: L >= 2 frames per segment including both ends.
    Returns (K-1)(L-1)+1 cameras; reference k is frame k(L-1), exactly.
    Per consecutive pair (a, b), frames j = 0..L-2 sit at u = j / L (not j / (L-1): the official spline samples
    `linspace(0, 1, L, endpoint=False)` and drops its last value, so each segment's last step is twice as long):
      centre  (1-u) c_a + u c_b;
      rotation from a lerped viewing direction and up vector, z = normalize((1-u) z_a + u z_b),
      y' = (1-u) y_a + u y_b, x = normalize(y' x z), y = z x x (columns of the camera-to-world rotation; not a
      slerp, equal to one only for turns about a fixed axis up to the speed profile);
      focal and principal point (1 - j/(L-2)) K_a + j/(L-2) K_b (the official weights, `interpolate_sequence`,
      reach K_b one frame before the pose does).
    The last reference camera ends the path. Computed in float64 as the official code does (scipy spline on
    numpy), returned in the input dtype. Differences from `segment_path(..., "linear")`: that one slerps the
    rotation at constant angular speed with u = j/(L-1) and interpolates the intrinsics with the same u.
    """
    K = len(cameras)
    if K < 2:
        raise InputError(f"a ViewCrafter path needs at least 2 cameras, got {K}")
    if frames < 2:
        raise InputError(f"frames per segment must be >= 2, got {frames}")
    c2w, intr = cameras.cam_to_world.double(), cameras.intrinsics.double()
    L = int(frames)
    u = torch.arange(L - 1, dtype=torch.float64, device=c2w.device) / L
    w_k = (torch.arange(L - 1, dtype=torch.float64, device=c2w.device) / (L - 2)) if L > 2 else u.new_zeros(1)
    poses, intrinsics = [], []
    for a in range(K - 1):
        A, B = c2w[a], c2w[a + 1]
        lerp = lambda p, q: (1 - u)[:, None] * p + u[:, None] * q  # noqa: E731
        z = torch.nn.functional.normalize(lerp(A[:3, 2], B[:3, 2]), dim=-1)
        x = torch.nn.functional.normalize(torch.linalg.cross(lerp(A[:3, 1], B[:3, 1]), z, dim=-1), dim=-1)
        y = torch.linalg.cross(z, x, dim=-1)
        M = torch.eye(4, dtype=torch.float64, device=c2w.device).repeat(L - 1, 1, 1)
        M[:, :3, 0], M[:, :3, 1], M[:, :3, 2], M[:, :3, 3] = x, y, z, lerp(A[:3, 3], B[:3, 3])
        poses.append(M)
        intrinsics.append(intr[a] + w_k[:, None, None] * (intr[a + 1] - intr[a]))
    poses.append(c2w[-1:])
    intrinsics.append(intr[-1:])
    dtype = cameras.cam_to_world.dtype
    return Cameras(torch.cat(poses).to(dtype), torch.cat(intrinsics).to(cameras.intrinsics.dtype),
                   cameras.width, cameras.height)


def segment_path(cameras: Cameras, frames_per_segment: int, kind: str = "linear") -> Cameras:
    """Cameras for K-1 video segments between K reference cameras, consecutive segments sharing their ends.

    cameras: K >= 2 cameras; frames_per_segment: L >= 2, both ends included. Returns (K-1)(L-1)+1 cameras, reference
    k at frame k(L-1) exactly (the layout of `reconx_core.video.interpolate`'s output).
    kind: "linear" (per segment: rotation slerped at constant angular speed, centre and intrinsics linear, evenly
    in time), "spline" (the same rotations, centres on a Catmull-Rom spline through all references: no kink at the
    references when K > 2) or "viewcrafter" (`viewcrafter_path`: ViewCrafter's own path, the motion its checkpoints
    were trained on).
    """
    if kind not in SEGMENT_PATH_KINDS:
        raise InputError(f"unknown segment path {kind!r}; choose one of {SEGMENT_PATH_KINDS}")
    if len(cameras) < 2:
        raise InputError(f"a path between reference views needs at least 2 cameras, got {len(cameras)}")
    if frames_per_segment < 2:
        raise InputError(f"frames per segment must be >= 2, got {frames_per_segment}")
    if kind == "viewcrafter":
        return viewcrafter_path(cameras, frames_per_segment)
    total = (len(cameras) - 1) * (frames_per_segment - 1) + 1
    return interpolate_cameras(cameras, total, positions=kind)
