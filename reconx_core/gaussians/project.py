"""EWA projection of 3D Gaussians into a pinhole camera, with gsplat's conventions.

Same math as gsplat's `fully_fused_projection` (pinhole, 3DGS): covariance R S S^T R^T, Jacobian of the
perspective map with the view-frustum clamp at 1.3x the field of view, a 0.3 px^2 low-pass added to the 2D
covariance (eps2d), near/far culling on the camera z, an opacity-aware bounding box
(extend = min(3.33, sqrt(2 ln(255 opacity))), so that outside it alpha < 1/255) and off-image culling.
One difference in convention only: our pixel centres sit at integer coordinates (DESIGN.md), so means2d are in
that frame; gsplat's equal ours minus 0.5 when it is given cx + 0.5, cy + 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..geometry import quat_to_rotmat

ALPHA_THRESHOLD = 1.0 / 255.0
GAUSSIAN_EXTEND = 3.33


def covariance_3d(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """World-frame covariances R diag(s^2) R^T.

    quats: (N, 4) wxyz; scales: (N, 3) linear standard deviations. Returns (N, 3, 3).
    """
    M = quat_to_rotmat(quats) * scales[:, None, :]
    return M @ M.transpose(-1, -2)


@dataclass
class Projected:
    """Gaussians projected into one camera (N = all Gaussians, culled ones flagged by `visible`).

    means2d: (N, 2) pixels, centres at integer coordinates.   conics: (N, 3) upper triangle (a, b, c) of the
    inverse 2D covariance.   depths: (N,) camera z.   radii: (N, 2) int32 half-sizes of the bounding box in
    pixels (0 where culled).   visible: (N,) bool.   opacities: (N,) in [0, 1].
    """

    means2d: torch.Tensor
    conics: torch.Tensor
    depths: torch.Tensor
    radii: torch.Tensor
    visible: torch.Tensor
    opacities: torch.Tensor


def project_gaussians(means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, opacities: torch.Tensor,
                      world_to_cam: torch.Tensor, K: torch.Tensor, width: int, height: int,
                      near: float = 0.01, far: float = 1e10, eps2d: float = 0.3) -> Projected:
    """Project Gaussians into one camera (differentiable in means2d, conics, depths, opacities).

    means: (N, 3) world frame; quats: (N, 4) wxyz; scales: (N, 3) linear; opacities: (N,) in [0, 1].
    world_to_cam: (4, 4) OpenCV; K: (3, 3) pixels, principal point in the integer-centre convention.
    """
    R, t = world_to_cam[:3, :3], world_to_cam[:3, 3]
    mc = means @ R.T + t                                   # (N, 3) camera frame
    # Camera-frame covariance V V^T with V = R_cam R(q) diag(s); V's columns come from one (3N, 3) @ (3, 3)
    # product (batched 3x3 matmuls are slow on CPUs).
    M = quat_to_rotmat(quats) * scales[:, None, :]        # (N, 3, 3), columns R(q)_j s_j
    V = (M.transpose(1, 2).reshape(-1, 3) @ R.T).reshape(-1, 3, 3)   # (N, 3 columns, 3 camera coordinates)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    tx, ty, tz = mc.unbind(-1)
    tz_safe = torch.where(tz.abs() > 1e-6, tz, torch.full_like(tz, 1e-6))
    # Clamp the direction used by the Jacobian to 1.3x the frustum (as gsplat does) so Gaussians far outside
    # the image do not get huge footprints; the limits use gsplat's +0.5 principal point.
    cxg, cyg = cx + 0.5, cy + 0.5
    tan_fx, tan_fy = 0.5 * width / fx, 0.5 * height / fy
    ux = (tx / tz_safe).clamp(min=-(cxg / fx + 0.3 * tan_fx), max=(width - cxg) / fx + 0.3 * tan_fx)
    uy = (ty / tz_safe).clamp(min=-(cyg / fy + 0.3 * tan_fy), max=(height - cyg) / fy + 0.3 * tan_fy)
    # Jacobian J = [[fx / z, 0, -fx ux / z], [0, fy / z, -fy uy / z]]; the rows of J V, then cov2d = (J V)(J V)^T.
    jv0 = (fx / tz_safe)[:, None] * (V[..., 0] - ux[:, None] * V[..., 2])     # (N, 3)
    jv1 = (fy / tz_safe)[:, None] * (V[..., 1] - uy[:, None] * V[..., 2])
    a = (jv0 * jv0).sum(-1) + eps2d
    b = (jv0 * jv1).sum(-1)
    c = (jv1 * jv1).sum(-1) + eps2d
    det = (a * c - b * b).clamp_min(1e-10)
    conics = torch.stack([c / det, -b / det, a / det], dim=-1)
    means2d = torch.stack([fx * tx / tz_safe + cx, fy * ty / tz_safe + cy], dim=-1)

    with torch.no_grad():
        op = opacities.detach()
        extend = torch.sqrt(2.0 * torch.log((op / ALPHA_THRESHOLD).clamp_min(1.0))).clamp(max=GAUSSIAN_EXTEND)
        rx = torch.ceil(extend * a.detach().sqrt())
        ry = torch.ceil(extend * c.detach().sqrt())
        m = means2d.detach()
        # gsplat tests the box against [0, W) in its +0.5 frame; in ours that is [-0.5, W - 0.5).
        visible = ((tz > near) & (tz < far) & (op >= ALPHA_THRESHOLD) & (rx > 0)
                   & (m[:, 0] + rx > -0.5) & (m[:, 0] - rx < width - 0.5)
                   & (m[:, 1] + ry > -0.5) & (m[:, 1] - ry < height - 0.5))
        radii = torch.stack([rx, ry], dim=-1).where(visible[:, None], torch.zeros_like(m)).to(torch.int32)
    return Projected(means2d, conics, tz, radii, visible, opacities)
