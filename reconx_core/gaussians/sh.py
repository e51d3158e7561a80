"""Real spherical harmonics up to degree 4, in the basis and sign convention of 3DGS / gsplat.

The Gaussians' colour is `max(0, 0.5 + sum_k sh[k] * Y_k(dir))`, where `dir` is the unit vector from the camera
centre to the Gaussian's mean in the world frame. The constants are the standard real-SH normalisations
(Sloan, "Efficient Spherical Harmonic Evaluation", JCGT 2013), written out so the degrees can be read off.
"""

from __future__ import annotations

import torch

from ..errors import InputError

SH_C0 = 0.28209479177387814  # Y_0^0 = 1 / (2 sqrt(pi))


def num_sh_bases(degree: int) -> int:
    """Number of SH coefficients per colour channel for `degree` (0-4): (degree + 1)**2."""
    if not 0 <= int(degree) <= 4:
        raise InputError(f"SH degree must be between 0 and 4, got {degree}")
    return (int(degree) + 1) ** 2


def rgb_to_sh_dc(rgb: torch.Tensor) -> torch.Tensor:
    """DC coefficient whose colour is `rgb` (any shape, values in [0, 1])."""
    return (rgb - 0.5) / SH_C0


def sh_dc_to_rgb(dc: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_sh_dc` (no clamping)."""
    return dc * SH_C0 + 0.5


def sh_basis(dirs: torch.Tensor, degree: int) -> torch.Tensor:
    """Real SH basis functions at unit directions.

    dirs: (..., 3) float, unit vectors (x, y, z) in the world frame.
    Returns (..., (degree+1)**2) float, same dtype/device.
    """
    num_sh_bases(degree)
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        out += [-0.4886025119029199 * y, 0.4886025119029199 * z, -0.4886025119029199 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [1.0925484305920792 * x * y, -1.0925484305920792 * y * z,
                0.31539156525252005 * (3.0 * zz - 1.0), -1.0925484305920792 * x * z,
                0.5462742152960396 * (xx - yy)]
    if degree >= 3:
        out += [-0.5900435899266435 * y * (3.0 * xx - yy), 2.890611442640554 * x * y * z,
                -0.4570457994644658 * y * (5.0 * zz - 1.0), 0.3731763325901154 * z * (5.0 * zz - 3.0),
                -0.4570457994644658 * x * (5.0 * zz - 1.0), 1.445305721320277 * z * (xx - yy),
                -0.5900435899266435 * x * (xx - 3.0 * yy)]
    if degree >= 4:
        out += [2.5033429417967046 * x * y * (xx - yy), -1.7701307697799304 * y * z * (3.0 * xx - yy),
                0.9461746957575601 * x * y * (7.0 * zz - 1.0), -0.6690465435572892 * y * z * (7.0 * zz - 3.0),
                0.10578554691520431 * (35.0 * zz * zz - 30.0 * zz + 3.0),
                -0.6690465435572892 * x * z * (7.0 * zz - 3.0), 0.47308734787878004 * (xx - yy) * (7.0 * zz - 1.0),
                -1.7701307697799304 * x * z * (xx - 3.0 * yy),
                0.6258357354491761 * (xx * (xx - 3.0 * yy) - yy * (3.0 * xx - yy))]
    return torch.stack(out, dim=-1)


def sh_to_rgb(sh: torch.Tensor, dirs: torch.Tensor, degree: int | None = None) -> torch.Tensor:
    """View-dependent colour of each Gaussian, as gsplat computes it.

    sh:   (N, K, 3) coefficients, K = (D+1)**2.
    dirs: (N, 3) viewing directions (camera centre -> mean), world frame; normalised here.
    degree: bands to use (<= D); None uses all. Higher bands are ignored (progressive SH training).
    Returns (N, 3) float, clamped at 0 (not at 1, as in gsplat).
    """
    K = sh.shape[1]
    full = int(round(K ** 0.5)) - 1
    degree = full if degree is None else min(int(degree), full)
    n = (degree + 1) ** 2
    basis = sh_basis(torch.nn.functional.normalize(dirs, dim=-1), degree)  # (N, n)
    # A broadcast product and a sum: faster on CPUs than einsum's batched (1, n) @ (n, 3) products.
    return ((basis[:, :, None] * sh[:, :n]).sum(1) + 0.5).clamp_min(0.0)
