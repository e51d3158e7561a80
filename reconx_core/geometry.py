"""Camera geometry shared by every stage: rotations, back-projection, similarity transforms, intrinsics.

Conventions (DESIGN.md): OpenCV cameras (x right, y down, z forward), camera-to-world 4x4 poses, intrinsics in
pixels with pixel centres at integer coordinates. Quaternions here are wxyz (the Gaussians' and gsplat's order);
rotations go through roma, whose own quaternions are xyzw. The alignment keeps its official xyzw
parameterisation in `reconx_core.align.geometry`.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import roma
import torch
import torch.nn.functional as F

from .errors import InputError
from .types import Cameras


# ----------------------------------------------------------------------------------------------- rotations
def quat_to_rotmat(quats: torch.Tensor) -> torch.Tensor:
    """(..., 4) wxyz quaternions, normalised here (any norm > 0) -> (..., 3, 3) rotation matrices."""
    q = F.normalize(quats, dim=-1)
    return roma.unitquat_to_rotmat(torch.cat([q[..., 1:], q[..., :1]], dim=-1))


def rotmat_to_quat(rotations: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) rotation matrices -> (..., 4) unit wxyz quaternions with w >= 0 (one of the two signs)."""
    xyzw = roma.rotmat_to_unitquat(rotations)
    wxyz = torch.cat([xyzw[..., 3:], xyzw[..., :3]], dim=-1)
    return torch.where(wxyz[..., :1] < 0, -wxyz, wxyz)


def axis_angle_to_rotmat(rotvec: torch.Tensor) -> torch.Tensor:
    """(..., 3) axis-angle (radians) -> (..., 3, 3), Rodrigues' formula; differentiable at 0."""
    return roma.rotvec_to_rotmat(rotvec)


def slerp(q0: torch.Tensor, q1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Shortest-arc spherical interpolation. q0, q1: (N, 4) unit wxyz; t: (N,) in [0, 1]. Returns (N, 4) wxyz."""
    dot = (q0 * q1).sum(-1, keepdim=True)
    q1 = torch.where(dot < 0, -q1, q1)
    theta = torch.acos(dot.abs().clamp(max=1.0))
    s = torch.sin(theta)
    t = t[:, None]
    near = s < 1e-6                                      # almost equal: linear is exact enough and stable
    w0 = torch.where(near, 1 - t, torch.sin((1 - t) * theta) / s.clamp_min(1e-12))
    w1 = torch.where(near, t, torch.sin(t * theta) / s.clamp_min(1e-12))
    return F.normalize(w0 * q0 + w1 * q1, dim=-1)


def rotation_angle_deg(rot_a: torch.Tensor, rot_b: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) x2 -> (...,) angle of rot_a^T rot_b in degrees (geodesic distance on SO(3))."""
    return torch.rad2deg(roma.rotmat_geodesic_distance(rot_a, rot_b))


# ----------------------------------------------------------------------------------------------- pixels and points
def pixel_grid(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(H, W, 2) pixel coordinates (u, v) = (column, row), centres at integers (DUSt3R's `xy_grid`)."""
    v, u = torch.meshgrid(torch.arange(height, device=device, dtype=dtype),
                          torch.arange(width, device=device, dtype=dtype), indexing="ij")
    return torch.stack((u, v), dim=-1)


def transform_points(matrix: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Apply a 4x4 transform to points. matrix (4, 4) with points (..., 3), or (N, 4, 4) with points (N, ..., 3)."""
    if matrix.dim() == 2:
        return points @ matrix[:3, :3].transpose(0, 1) + matrix[:3, 3]
    shape = points.shape
    flat = points.reshape(shape[0], -1, 3)
    return torch.baddbmm(matrix[:, None, :3, 3], flat, matrix[:, :3, :3].transpose(1, 2)).reshape(shape)


def backproject_depth(depths: torch.Tensor, intrinsics: torch.Tensor,
                      cam_to_world: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Back-project z-depth maps through pinhole cameras.

    depths: (N, H, W) z-depth; intrinsics: (N, 3, 3) pixels (zero skew); cam_to_world: optional (N, 4, 4).
    Returns (N, H, W, 3): camera-frame points, or world-frame points when cam_to_world is given.
    Computed as d * (u - cx) / fx, the order of DUSt3R's `_fast_depthmap_to_pts3d`, so results agree with the
    official code to the last bit where fx = fy.
    """
    N, H, W = depths.shape
    grid = pixel_grid(H, W, depths.device, depths.dtype)
    pp = intrinsics[:, None, None, :2, 2]
    focal = torch.stack((intrinsics[:, 0, 0], intrinsics[:, 1, 1]), dim=-1)[:, None, None]
    d = depths.unsqueeze(-1)
    cam = torch.cat((d * (grid - pp) / focal, d), dim=-1)
    if cam_to_world is None:
        return cam
    return cam @ cam_to_world[:, None, :3, :3].transpose(-1, -2) + cam_to_world[:, None, None, :3, 3]


def camera_depths(points: torch.Tensor, cameras: Cameras) -> torch.Tensor:
    """z-depth (N, H, W) of world points (N, H, W, 3), each map in its own camera."""
    w2c = torch.linalg.inv(cameras.cam_to_world.to(points))
    return torch.einsum("nj,nhwj->nhw", w2c[:, 2, :3], points) + w2c[:, 2, 3][:, None, None]


def project_points(points: torch.Tensor, cameras: Cameras) -> Tuple[torch.Tensor, torch.Tensor]:
    """World points (M, 3) into every camera: pixels (N, M, 2) (centres at integers) and z-depths (N, M)."""
    w2c = torch.linalg.inv(cameras.cam_to_world.to(points))
    cam = points[None] @ w2c[:, :3, :3].transpose(1, 2) + w2c[:, None, :3, 3]
    z = cam[..., 2]
    uvw = cam @ cameras.intrinsics.to(points).transpose(1, 2)
    return uvw[..., :2] / z.clamp_min(1e-12)[..., None], z


def robust_center(points: torch.Tensor) -> torch.Tensor:
    """(3,) per-axis median of points (M, 3): a centre that floaters do not pull."""
    if points.ndim != 2 or points.shape[0] == 0:
        raise InputError("no points to take a centre of")
    return points.median(dim=0).values


# ----------------------------------------------------------------------------------------------- intrinsics
def scale_intrinsics(intrinsics: torch.Tensor, sx: float, sy: float, x0: float = 0.0, y0: float = 0.0) -> torch.Tensor:
    """Intrinsics (N, 3, 3) after cropping at (x0, y0) and resizing by (sx, sy) with align_corners=False.

    Pixel centres sit at integer coordinates, so a pixel u of the crop lands at u' = s (u + 0.5) - 0.5:
    cx' = sx (cx - x0 + 0.5) - 0.5, fx' = sx fx (and likewise in y). Returns a new tensor.
    """
    K = intrinsics.clone()
    K[:, 0, 0] *= sx
    K[:, 1, 1] *= sy
    K[:, 0, 2] = sx * (K[:, 0, 2] - x0 + 0.5) - 0.5
    K[:, 1, 2] = sy * (K[:, 1, 2] - y0 + 0.5) - 0.5
    return K


def resize_cameras(cameras: Cameras, width: int, height: int) -> Cameras:
    """The same cameras for the whole image resized to width x height (pixel centres kept consistent)."""
    K = scale_intrinsics(cameras.intrinsics, width / cameras.width, height / cameras.height)
    return Cameras(cameras.cam_to_world, K, width, height)


def intrinsics_from_focal(focals: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(N,) focal lengths in pixels -> (N, 3, 3) intrinsics with the principal point at (W/2, H/2) (DUSt3R)."""
    K = torch.zeros(focals.shape[0], 3, 3, dtype=focals.dtype, device=focals.device)
    K[:, 0, 0] = K[:, 1, 1] = focals
    K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = width / 2, height / 2, 1
    return K


def focal_from_fov(fov_deg: float, size: int) -> float:
    """Focal length in pixels of a field of view `fov_deg` across `size` pixels."""
    return size / (2 * math.tan(math.radians(fov_deg) / 2))


# ----------------------------------------------------------------------------------------------- similarity transforms
def similarity_matrix(scale: float, rot: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """(3, 3) rotation, (3,) translation and a scalar scale -> (4, 4) [s R | t] (the translation is not scaled)."""
    mat = torch.eye(4, dtype=rot.dtype, device=rot.device)
    mat[:3, :3] = rot * scale
    mat[:3, 3] = trans.reshape(3)
    return mat


def transform_poses(cam_to_world: torch.Tensor, scale: float, rot: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """(N, 4, 4) camera-to-world poses carried by the similarity X' = s R X + t: [R R_i | s R c_i + t] (the cameras
    stay rigid: the scale moves their centres only). Computed in the poses' dtype."""
    R, t = rot.to(cam_to_world), trans.to(cam_to_world).reshape(3)
    out = cam_to_world.clone()
    out[:, :3, :3] = R @ cam_to_world[:, :3, :3]
    out[:, :3, 3] = scale * cam_to_world[:, :3, 3] @ R.T + t
    return out


def transform_cameras(cameras: Cameras, scale: float, rot: torch.Tensor, trans: torch.Tensor) -> Cameras:
    """Cameras carried by the similarity X' = s R X + t (see `transform_poses`); intrinsics unchanged."""
    return Cameras(transform_poses(cameras.cam_to_world, scale, rot, trans), cameras.intrinsics.clone(),
                   cameras.width, cameras.height)


def camera_similarity(source_c2w: torch.Tensor, target_c2w: torch.Tensor, depth_scale: Optional[float] = None
                      ) -> Tuple[float, torch.Tensor, torch.Tensor]:
    """Similarity X_target = s R X_source + t carrying cameras of one frame onto the same cameras in another.

    source_c2w, target_c2w: (K, 4, 4) camera-to-world poses of the same K >= 2 views in the two frames.
    Closed form from orientations and centres, so K = 2 is enough:
      R = argmax_{R in SO(3)} tr(R^T M),  M = sum_k R^target_k (R^source_k)^T + K * C A^T / (|C|_F |A|_F)
    (the chordal mean of the relative rotations plus the Umeyama cross-covariance of the centred camera centres
    C = c^target - mean, A = c^source - mean, normalised so both terms weigh alike); s = |C|_F / |A|_F, the ratio
    of the centres' spreads (with two views: the ratio of the baselines); t = mean(c^target) - s R mean(c^source).
    When the centres coincide in either frame (a camera turning on the spot) they say nothing about scale:
    R is then the chordal mean alone and s = `depth_scale` (e.g. the ratio of the views' depths), if given;
    otherwise that case is an InputError.
    Returns (scale: float, rot (3, 3), trans (3,)), float64 on the input's device.
    """
    src, dst = source_c2w.double(), target_c2w.double()
    if src.shape != dst.shape or src.dim() != 3 or src.shape[1:] != (4, 4):
        raise InputError(f"source and target poses must both be (K, 4, 4), got {tuple(src.shape)} and "
                         f"{tuple(dst.shape)}")
    K = src.shape[0]
    a, c = src[:, :3, 3], dst[:, :3, 3]
    A, C = a - a.mean(0), c - c.mean(0)
    norm_a, norm_c = float(A.norm()), float(C.norm())
    target_same = norm_c <= 1e-6 * max(float(c.norm(dim=-1).max()), 1.0)
    source_same = norm_a <= 1e-6 * max(float(a.norm(dim=-1).max()), 1.0)
    rotations = (dst[:, :3, :3] @ src[:, :3, :3].transpose(1, 2)).sum(0)
    if target_same or source_same:
        if depth_scale is None or not math.isfinite(depth_scale) or depth_scale <= 0:
            which = "target" if target_same else "source"
            raise InputError(f"the {which} cameras all sit at one camera centre, so the scale between the two "
                             "frames is undefined; use views taken from different positions")
        rot, scale = roma.special_procrustes(rotations), float(depth_scale)
    else:
        rot = roma.special_procrustes(rotations + K * (C.T @ A) / (norm_c * norm_a))
        scale = norm_c / norm_a
    trans = c.mean(0) - scale * rot @ a.mean(0)
    return scale, rot, trans


def refine_cameras(cameras: Cameras, deltas: torch.Tensor) -> Cameras:
    """Apply small se(3) corrections in each camera's own frame.

    deltas: (N, 6) float, (rotation axis-angle in radians, translation in world units) per camera.
    Returns Cameras with cam_to_world @ [R(d) | t(d)].
    """
    T = torch.eye(4, device=deltas.device, dtype=deltas.dtype).repeat(len(cameras), 1, 1)
    T[:, :3, :3] = axis_angle_to_rotmat(deltas[:, :3])
    T[:, :3, 3] = deltas[:, 3:]
    return Cameras(cameras.cam_to_world @ T, cameras.intrinsics, cameras.width, cameras.height)
