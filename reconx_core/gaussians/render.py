"""`render`: one function in front of both rasterizers (gsplat on CUDA, ours anywhere)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..errors import InputError
from ..types import Cameras, Gaussians
from . import rasterize_gsplat
from .project import project_gaussians
from .rasterize_torch import TileLayout, rasterize_torch
from .sh import sh_to_rgb


@dataclass
class RenderOutput:
    """Rendered views.

    rgb:   (N, H, W, 3) float, background composited (values may exceed 1 where SH colours do).
    alpha: (N, H, W) float in [0, 1], accumulated opacity.
    depth: (N, H, W) float, expected camera z of the visible Gaussians, sum(w z) / alpha (0 where alpha < 1e-6).
    means2d: per view (G, 2) projected means (torch backend, kept for densification's gradient statistics).
    radii:   per view (G, 2) int32 box half-sizes (0 = not visible).
    """

    rgb: torch.Tensor
    alpha: torch.Tensor
    depth: torch.Tensor
    means2d: list = field(default_factory=list)
    radii: list = field(default_factory=list)


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in ("auto", "torch", "gsplat"):
        raise InputError(f"unknown render backend {backend!r}; use 'auto', 'torch' or 'gsplat'")
    if backend == "auto":
        return "gsplat" if device.type == "cuda" and rasterize_gsplat.gsplat_available() else "torch"
    if backend == "gsplat" and not (device.type == "cuda" and rasterize_gsplat.gsplat_available()):
        raise InputError("backend='gsplat' needs a CUDA device and the gsplat package (pip install gsplat); "
                         "use backend='torch' or 'auto'")
    return backend


def render(gaussians: Gaussians, cameras: Cameras, backend: str = "auto", background: Optional[torch.Tensor] = None,
           near: float = 0.01, far: float = 1e10, sh_degree: Optional[int] = None, eps2d: float = 0.3,
           tile_size: int = 8, chunk_elems: int = 1 << 19, callback=None) -> RenderOutput:
    """Render Gaussians into every camera, differentiably.

    gaussians: raw parameters (DESIGN.md), world frame.  cameras: N OpenCV cameras, images W x H.
    backend: "gsplat" (CUDA), "torch" (any device) or "auto" (gsplat on CUDA when importable, else torch).
    background: (3,) float colour composited under the Gaussians, or None for black.
    near/far: camera-z culling planes.  sh_degree: SH bands to use (None = all that `gaussians` has).
    tile_size, chunk_elems: the torch rasterizer's tiles and chunk budget (pair-pixels per chunk; memory).
    callback: optional callback(step, total) after each view.
    Returns RenderOutput with rgb (N, H, W, 3), alpha (N, H, W), depth (N, H, W).
    """
    if not isinstance(gaussians, Gaussians) or not isinstance(cameras, Cameras):
        raise InputError("render needs a Gaussians and a Cameras object")
    if len(gaussians) == 0:
        raise InputError("there are no Gaussians to render; check the initialisation (too few confident points?)")
    device = gaussians.device
    cameras = cameras.to(device)
    if background is not None:
        background = torch.as_tensor(background, dtype=gaussians.means.dtype, device=device).reshape(3)
    w2c = cameras.world_to_cam
    quats, scales, opac = gaussians.quats, gaussians.log_scales.exp(), torch.sigmoid(gaussians.opacity_logits)
    degree = gaussians.sh_degree if sh_degree is None else min(int(sh_degree), gaussians.sh_degree)

    if resolve_backend(backend, device) == "gsplat":
        try:
            rgb, alpha, depth, _ = rasterize_gsplat.render_gsplat(
                gaussians.means, quats, scales, opac, gaussians.sh, w2c, cameras.intrinsics, cameras.width,
                cameras.height, background, near, far, degree, eps2d)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:
            # Only gsplat's first use can fail for lack of a build (nvcc, CUDA_HOME, arch): warn once and use our
            # rasterizer. Once it has rendered, an error is a real error and must surface.
            if rasterize_gsplat.has_worked():
                raise
            rasterize_gsplat.mark_failed(exc)
        else:
            rasterize_gsplat.mark_worked()
            if callback is not None:
                callback(len(cameras), len(cameras))
            return RenderOutput(rgb, alpha, depth)

    rgbs, alphas, depths, m2ds, radii = [], [], [], [], []
    cam_centres = cameras.cam_to_world[:, :3, 3]
    for i in range(len(cameras)):
        proj = project_gaussians(gaussians.means, quats, scales, opac, w2c[i], cameras.intrinsics[i],
                                 cameras.width, cameras.height, near, far, eps2d)
        colours = sh_to_rgb(gaussians.sh, gaussians.means - cam_centres[i], degree)
        layout = TileLayout(proj.means2d, proj.radii, proj.depths, proj.visible, cameras.width, cameras.height,
                            tile_size, chunk_elems)
        feats = torch.cat([colours, proj.depths[:, None]], -1)
        img, alpha = rasterize_torch(proj.means2d, proj.conics, proj.opacities, feats, layout)
        rgb = img[..., :3]
        if background is not None:
            rgb = rgb + (1.0 - alpha)[..., None] * background
        depth = torch.where(alpha > 1e-6, img[..., 3] / alpha.clamp_min(1e-6), torch.zeros_like(alpha))
        rgbs.append(rgb), alphas.append(alpha), depths.append(depth)
        m2ds.append(proj.means2d), radii.append(proj.radii)
        if callback is not None:
            callback(i + 1, len(cameras))
    return RenderOutput(torch.stack(rgbs), torch.stack(alphas), torch.stack(depths), m2ds, radii)
