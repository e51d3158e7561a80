"""Initial Gaussians from a Scene's point maps or from any coloured points.

As in InstantSplat / ReconX: one Gaussian per point, colour as the SH DC term, isotropic scale from the mean
distance to the 3 nearest neighbours, identity rotation, opacity 0.1.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from ..errors import InputError
from ..types import Gaussians, Scene, Views
from .sh import num_sh_bases, rgb_to_sh_dc

log = logging.getLogger(__name__)


def _knn_mean_distance(points: torch.Tensor, k: int = 3, block: int = 2048) -> torch.Tensor:
    """(M,) mean distance from each point to its k nearest other points; blocked so memory stays O(block * M)."""
    M = points.shape[0]
    if M <= 1:
        return torch.ones(M, dtype=points.dtype, device=points.device) * 0.01
    k = min(k, M - 1)
    out = torch.empty(M, dtype=points.dtype, device=points.device)
    for s in range(0, M, block):
        d2 = torch.cdist(points[s:s + block], points).pow(2)
        d2[torch.arange(d2.shape[0]), torch.arange(s, s + d2.shape[0])] = float("inf")  # not itself
        out[s:s + block] = d2.topk(k, dim=1, largest=False).values.clamp_min(1e-14).sqrt().mean(1)
    return out


def init_from_points(points: torch.Tensor, colours: torch.Tensor, sh_degree: int = 3,
                     opacity: float = 0.1, max_points: Optional[int] = None, seed: int = 0) -> Gaussians:
    """Gaussians at coloured points.

    points: (M, 3) float, world frame.  colours: (M, 3) float in [0, 1].
    sh_degree: SH degree of the result (higher bands start at 0).  opacity: initial opacity in (0, 1).
    max_points: random subsample to at most this many (seeded).
    Returns Gaussians with M' = min(M, max_points) entries on the points' device.
    """
    if points.ndim != 2 or points.shape[-1] != 3 or colours.shape != points.shape:
        raise InputError(f"points {tuple(points.shape)} and colours {tuple(colours.shape)} must both be (M, 3)")
    finite = torch.isfinite(points).all(1) & torch.isfinite(colours).all(1)
    points, colours = points[finite].float(), colours[finite].float().clamp(0, 1)
    if points.shape[0] == 0:
        raise InputError("no finite points to initialise the Gaussians from; check the point maps")
    if max_points is not None and points.shape[0] > max_points:
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(points.shape[0], generator=g)[:max_points].to(points.device)
        points, colours = points[keep], colours[keep]
    if not 0.0 < opacity < 1.0:
        raise InputError(f"initial opacity must be in (0, 1), got {opacity}")
    M = points.shape[0]
    scale = _knn_mean_distance(points).clamp_min(1e-7)
    sh = torch.zeros(M, num_sh_bases(sh_degree), 3, device=points.device)
    sh[:, 0] = rgb_to_sh_dc(colours)
    quats = torch.zeros(M, 4, device=points.device)
    quats[:, 0] = 1.0
    return Gaussians(points.clone(), quats, scale.log()[:, None].repeat(1, 3),
                     torch.full((M,), float(torch.logit(torch.tensor(opacity))), device=points.device), sh)


def init_from_scene(scene: Scene, views: Optional[Sequence[int]] = None, max_points: Optional[int] = 100_000,
                    sh_degree: int = 3, opacity: float = 0.1, seed: int = 0) -> Gaussians:
    """Gaussians from a Scene's confident points (`scene.confident_mask()`: conf > scene.min_conf).

    scene: pts3d (N, H, W, 3) world frame, images (N, 3, H, W) [0, 1] for the colours, conf (N, H, W).
    views: indices of the views whose points are used (default: all).  max_points: random subsample budget.
    """
    idx = list(range(len(scene))) if views is None else [int(v) for v in views]
    if not idx or any(not 0 <= v < len(scene) for v in idx):
        raise InputError(f"views {views} must be a non-empty list of indices below {len(scene)}")
    pts, cols = scene.confident_points(idx)
    if pts.shape[0] == 0:
        raise InputError(f"no point of views {idx} has confidence above {scene.min_conf:g}; lower the minimum "
                         "confidence of ReconX DUSt3R Global Alignment")
    log.info("initialising Gaussians from %d points of %d views", pts.shape[0], len(idx))
    return init_from_points(pts, cols, sh_degree=sh_degree, opacity=opacity, max_points=max_points, seed=seed)


def init_from_views(views: Views, max_points: Optional[int] = 100_000, sh_degree: int = 3, opacity: float = 0.1,
                    seed: int = 0) -> Gaussians:
    """ReconX's initialisation: Gaussians at the first and last frames' point maps (the two reference views).

    views: Views after confidence mapping (pts3d (S, H, W, 3) world frame and conf (S, H, W) in [0, 1]).
    Keeps the end frames' pixels with conf >= min(0.5, their median confidence): the confident ones, and at
    least their better half when the whole video is judged unsure.
    """
    if views.pts3d is None or views.conf is None:
        raise InputError("these views have no point maps or confidences yet: pass them through ReconX Confidence "
                         "Mapping first")
    ends = [0, len(views) - 1]
    conf = views.conf[ends]
    keep = (conf >= min(0.5, float(conf.median()))) & torch.isfinite(views.pts3d[ends]).all(-1)
    if not keep.any():
        raise InputError("the first and last frames have no confident points to start the Gaussians from")
    return init_from_points(views.pts3d[ends][keep], views.frames[ends].permute(0, 2, 3, 1)[keep],
                            sh_degree=sh_degree, opacity=opacity, max_points=max_points, seed=seed)


def to_activated(gaussians: Gaussians) -> dict:
    """The activated parameters, for ComfyUI's SPLAT and viewers.

    Returns dict: means (N, 3) world; scales (N, 3) linear; quats (N, 4) unit wxyz; opacities (N,) in [0, 1];
    sh (N, K, 3) unchanged coefficients.
    """
    return {"means": gaussians.means, "scales": gaussians.log_scales.exp(),
            "quats": torch.nn.functional.normalize(gaussians.quats, dim=-1),
            "opacities": torch.sigmoid(gaussians.opacity_logits), "sh": gaussians.sh}
