"""A small, dependency-free robust PnP for the alignment's initialisation.

Why not OpenCV: the official code calls `cv2.solvePnPRansac(..., flags=SOLVEPNP_SQPNP)`. OpenCV is a heavy,
often conflicting dependency inside ComfyUI (several opencv-python variants fight over the same module), and
it is used here for one small problem.

The cost is the one OpenCV's SQPnP minimises: the *algebraic* error
    sum_k | [I_2 | -m_k] (R X_k + t) |^2      (m_k = ((u - cx) / f, (v - cy) / f): the pixel's normalised coordinates)
i.e. the camera-frame point's offset from the pixel's ray measured in the image plane and scaled by its depth.
(The object-space error of Lu et al., which projects orthogonally onto the ray, has a different minimiser: on the
alignment fixture the two poses differ by 4e-5, enough to make the alignment's final errors against the ground
truth systematically worse than the official ones. With this cost our initial poses equal the official ones to
float32 rounding.)
t is eliminated in closed form, which leaves a quadratic form r^T Omega r in r = vec(R); its two smallest
eigenvectors, projected onto SO(3) with either sign, start Gauss-Newton descents on the rotation manifold; the
cheapest solution in front of the camera is the minimum OpenCV's SQP iteration reaches. RANSAC is replaced by
deterministic inlier trimming with the same 5-pixel reprojection threshold, so the result does not depend on a
random seed. tests/test_pnp.py checks the poses against OpenCV's (1e-8 on noisy matches with outliers; float32
rounding on the fixture's views).
"""

from __future__ import annotations

import math
from typing import Optional

import roma
import torch

from .geometry import pixel_grid


def _algebraic_system(points: torch.Tensor, normalised: torch.Tensor):
    """Omega (9, 9) and P (3, 9) such that cost(R) = r^T Omega r and t(R) = P r, r = R.reshape(9) (row-major).

    points: (M, 3) world; normalised: (M, 2) normalised image coordinates m_k. float64.
    Per point the residual is A_k (R X_k + t) with A_k = [I_2 | -m_k], so Q_k = A_k^T A_k.
    """
    x, y = normalised.unbind(-1)
    q = torch.zeros(points.shape[0], 3, 3, dtype=points.dtype, device=points.device)
    q[:, 0, 0] = q[:, 1, 1] = 1.0
    q[:, 0, 2] = q[:, 2, 0] = -x
    q[:, 1, 2] = q[:, 2, 1] = -y
    q[:, 2, 2] = x * x + y * y
    q_sum = q.sum(0)
    b_mat = torch.einsum("kab,kc->abc", q, points).reshape(3, 9)
    s_mat = torch.einsum("kab,kc,kd->acbd", q, points, points).reshape(9, 9)
    p_mat = -torch.linalg.solve(q_sum, b_mat)
    omega = s_mat + b_mat.T @ p_mat
    return 0.5 * (omega + omega.T), p_mat


def _refine_rotation(rot: torch.Tensor, omega: torch.Tensor, n_iter: int = 30) -> torch.Tensor:
    """Gauss-Newton on SO(3) for min r^T Omega r, updating R <- exp([delta]x) R."""
    gens = torch.zeros(3, 3, 3, dtype=rot.dtype, device=rot.device)
    gens[0, 1, 2], gens[0, 2, 1] = -1, 1
    gens[1, 0, 2], gens[1, 2, 0] = 1, -1
    gens[2, 0, 1], gens[2, 1, 0] = -1, 1
    for _ in range(n_iter):
        r = rot.reshape(9)
        jac = (gens @ rot).reshape(3, 9).T  # (9, 3): d vec(R) / d delta
        hess = jac.T @ omega @ jac
        grad = jac.T @ omega @ r
        delta = -torch.linalg.solve(hess + 1e-12 * torch.eye(3, dtype=rot.dtype, device=rot.device), grad)
        rot = roma.rotvec_to_rotmat(delta) @ rot
        if float(delta.norm()) < 1e-12:
            break
    return rot


def _solve_algebraic(points: torch.Tensor, normalised: torch.Tensor, init: Optional[torch.Tensor]):
    """Minimiser of the algebraic error over SO(3); returns world-to-camera (R (3,3), t (3,))."""
    omega, p_mat = _algebraic_system(points, normalised)
    _, vecs = torch.linalg.eigh(omega)
    starts = [roma.special_procrustes(sign * math.sqrt(3) * vecs[:, k].reshape(3, 3))
              for k in range(2) for sign in (1.0, -1.0)]
    if init is not None:
        starts.insert(0, init)
    best = None
    for start in starts:
        rot = _refine_rotation(start, omega)
        trans = p_mat @ rot.reshape(9)
        in_front = ((points @ rot.T + trans)[:, 2] > 0).double().mean()
        cost = float(rot.reshape(9) @ omega @ rot.reshape(9))
        key = (float(in_front) < 0.5, cost)  # prefer solutions with the points in front of the camera
        if best is None or key < best[0]:
            best = (key, rot, trans)
    return best[1], best[2]


def solve_pnp(points: torch.Tensor, pixels: torch.Tensor, focal: float, pp, *, reproj_thr: float = 5.0,
              n_rounds: int = 4):
    """Camera pose from 2D-3D correspondences and a known pinhole camera, robust to outliers.

    points: (M, 3) world frame; pixels: (M, 2) (u, v); focal: pixels; pp: (cx, cy).
    Returns (world_to_cam (4, 4) float64, n_inliers) where inliers reproject within `reproj_thr` pixels,
    or None when fewer than 4 correspondences remain.
    """
    points = points.double()
    pixels = pixels.double()
    if points.shape[0] < 4:
        return None
    cx, cy = float(pp[0]), float(pp[1])
    # the official code hands OpenCV a float32 camera matrix: normalise with the focal it actually sees
    focal = float(torch.tensor(focal, dtype=torch.float32))
    normalised = (pixels - pixels.new_tensor((cx, cy))) / focal
    keep = torch.ones(points.shape[0], dtype=torch.bool, device=points.device)
    rot = None
    n_inliers = 0
    for _ in range(n_rounds):
        if int(keep.sum()) < 4:
            return None
        rot, trans = _solve_algebraic(points[keep], normalised[keep], rot)
        cam = points @ rot.T + trans
        proj = cam[:, :2] / cam[:, 2:3] * focal + pixels.new_tensor((cx, cy))
        err = (proj - pixels).norm(dim=-1)
        new_keep = (cam[:, 2] > 0) & (err < reproj_thr)
        n_inliers = int(new_keep.sum())
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    if n_inliers < 4:
        return None
    world_to_cam = torch.eye(4, dtype=torch.float64, device=points.device)
    world_to_cam[:3, :3], world_to_cam[:3, 3] = rot, trans
    return world_to_cam, n_inliers


# A pose has 6 degrees of freedom: this many well-spread correspondences pin it down far below the optimiser's
# first step, and keep the float64 solve cheap at 512x384 (200k pixels a view). Fewer pixels than this (all
# fixture-sized maps) are used as they are, so the init stays identical to the official one there.
MAX_PNP_POINTS = 16384


def pnp_camera_pose(pts_world: torch.Tensor, mask: torch.Tensor, focal: Optional[float] = None, pp=None):
    """Pose (and focal if unknown) of a view whose world point map is known, like the official `fast_pnp`.

    pts_world: (H, W, 3) the view's pixels' 3D points, world frame; mask: (H, W) bool, pixels to use.
    focal: pixels, or None to try 21 focals in [max(H, W)/2, 3 max(H, W)] (geometric) and keep the one with
    the most inliers. pp: (cx, cy) or None for (W/2, H/2).
    Returns (focal, cam_to_world (4, 4) float32 on the points' device) or None if it cannot be solved.
    Masks of more than MAX_PNP_POINTS pixels are subsampled evenly.
    """
    H, W, _ = pts_world.shape
    if int(mask.sum()) < 4:
        return None
    if pp is None:
        pp = (W / 2, H / 2)
    pixels = pixel_grid(H, W, pts_world.device)[mask]
    points = pts_world[mask]
    if points.shape[0] > MAX_PNP_POINTS:  # an even stride keeps the sample spread over the whole image
        pick = torch.linspace(0, points.shape[0] - 1, MAX_PNP_POINTS, device=points.device).round().long()
        pixels, points = pixels[pick], points[pick]
    if focal is None:
        size = max(W, H)
        candidates = torch.logspace(math.log10(size / 2), math.log10(size * 3), 21, dtype=torch.float64).tolist()
    else:
        candidates = [float(focal)]
    best = None
    for cand in candidates:
        res = solve_pnp(points, pixels, cand, pp)
        if res is not None and (best is None or res[1] > best[0]):
            best = (res[1], res[0], cand)
    if best is None:
        return None
    _, world_to_cam, best_focal = best
    return best_focal, torch.linalg.inv(world_to_cam).to(torch.float32)
