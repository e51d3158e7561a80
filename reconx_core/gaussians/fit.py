"""`fit_gaussians`: confidence-aware 3DGS optimisation (ReconX, Sec. 3.4).

L = sum_i mean_pixels( C_i * (w_l1 * |I^_i - I_i| + w_ssim * (1 - SSIM_i)) ) + w_lpips * mean_pixels(C_i * LPIPS_i),
with per-pixel L1 and SSIM maps and a spatial LPIPS map, each weighted by the same per-pixel confidence C_i
(expected in [0, 1]; 1 everywhere when no confidence is given). One random training view per step, Adam with the
3DGS per-parameter learning rates, the position rate scaled by the scene extent and decayed exponentially.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence, Union

import torch

from ..errors import InputError
from ..types import Cameras, Gaussians, Scene
from .densify import Densifier
from .init import init_from_points, init_from_scene
from .losses import load_lpips, ssim_map
from .render import render, resolve_backend

log = logging.getLogger(__name__)

# 3DGS defaults (Kerbl et al. 2023): position lr is multiplied by the scene extent.
LR = {"means": 1.6e-4, "means_final": 1.6e-6, "log_scales": 5e-3, "quats": 1e-3, "opacity_logits": 5e-2,
      "sh_dc": 2.5e-3, "sh_rest": 2.5e-3 / 20}


def scene_extent(cameras: Cameras, points: Optional[torch.Tensor] = None) -> float:
    """3DGS's extent: 1.1 x the largest camera distance from the cameras' mean centre.

    Falls back to the points' spread (when all cameras coincide), then 1.0.
    """
    centres = cameras.cam_to_world[:, :3, 3]
    ext = float((centres - centres.mean(0)).norm(dim=-1).max()) * 1.1
    if ext < 1e-6 and points is not None and len(points) > 1:
        ext = float((points - points.mean(0)).norm(dim=-1).quantile(0.9))
    return ext if ext > 1e-6 else 1.0


def _axis_angle_to_matrix(v: torch.Tensor) -> torch.Tensor:
    """(N, 3) axis-angle -> (N, 3, 3), Rodrigues' formula (safe at 0)."""
    theta2 = (v * v).sum(-1, keepdim=True)[..., None]
    theta = theta2.clamp_min(1e-12).sqrt()
    zero = torch.zeros_like(v[:, 0])
    Kx = torch.stack([zero, -v[:, 2], v[:, 1], v[:, 2], zero, -v[:, 0], -v[:, 1], v[:, 0], zero], -1).reshape(-1, 3, 3)
    small = theta2 < 1e-8
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / theta2.clamp_min(1e-12))
    return torch.eye(3, device=v.device, dtype=v.dtype) + a * Kx + b * (Kx @ Kx)


def refine_cameras(cameras: Cameras, deltas: torch.Tensor) -> Cameras:
    """Apply small se(3) corrections in each camera's own frame.

    deltas: (N, 6) float, (rotation axis-angle in radians, translation in world units) per camera.
    Returns Cameras with cam_to_world @ [R(d) | t(d)].
    """
    T = torch.eye(4, device=deltas.device, dtype=deltas.dtype).repeat(len(cameras), 1, 1)
    T[:, :3, :3] = _axis_angle_to_matrix(deltas[:, :3])
    T[:, :3, 3] = deltas[:, 3:]
    return Cameras(cameras.cam_to_world @ T, cameras.intrinsics, cameras.width, cameras.height)


def _check_inputs(images, cameras, conf):
    if not isinstance(cameras, Cameras):
        raise InputError("cameras must be a reconx_core.types.Cameras")
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"images must be (N, 3, H, W) in [0, 1], got {tuple(images.shape)}")
    N, _, H, W = images.shape
    if len(cameras) != N or (cameras.height, cameras.width) != (H, W):
        raise InputError(f"{N} images of {W}x{H} but {len(cameras)} cameras of {cameras.width}x{cameras.height}; "
                         "resize the images or the cameras so they match")
    if not torch.isfinite(images).all():
        raise InputError("images contain NaN or infinite values")
    if conf is not None:
        if conf.shape != (N, H, W):
            raise InputError(f"conf must be (N, H, W) = {(N, H, W)}, got {tuple(conf.shape)}")
        if not torch.isfinite(conf).all() or (conf < 0).any():
            raise InputError("conf must be finite and non-negative (confidences in [0, 1])")


def fit_gaussians(images: torch.Tensor, cameras: Cameras, conf: Optional[torch.Tensor] = None,
                  init: Union[Scene, tuple, Gaussians] = None, steps: int = 1000,
                  weights: Sequence[float] = (0.8, 0.2, 0.5), sh_degree: int = 3, densify: bool = False,
                  refine_poses: bool = False, seed: int = 0, callback: Optional[Callable[[int, int], None]] = None,
                  max_points: Optional[int] = 100_000, init_views: Optional[Sequence[int]] = None,
                  background: Optional[Sequence[float]] = None, backend: str = "auto", lpips_net: str = "alex",
                  lpips_dirs: Sequence = (), lpips_random: bool = False, pose_lr: float = 1e-4,
                  return_cameras: bool = False):
    """Fit 3D Gaussians to posed images with a per-pixel confidence.

    images: (N, 3, H, W) float in [0, 1], the frames to fit.  cameras: the N cameras (OpenCV, c2w, pixels).
    conf: (N, H, W) float per-pixel confidence (ReconX's C_i, in [0, 1]); None = all ones.
    init: a Scene (its point maps, views `init_views`, subsampled to `max_points`), a tuple
          (points (M, 3) world, colours (M, 3) in [0, 1]), or Gaussians to continue from.
    steps: optimisation steps (one random view each).  weights: (L1, SSIM, LPIPS); LPIPS 0 needs no backbone.
    sh_degree: SH degree (bands are switched on progressively, one every steps / (sh_degree + 1) steps).
    densify: our clone/split/prune (see densify.py).  refine_poses: optimise small se(3) camera corrections.
    seed: seeds the view order and any sampling.  callback(step, total): after every step (progress, interrupt).
    background: (3,) colour behind the Gaussians (black by default).  backend: see `render`.
    lpips_net / lpips_dirs / lpips_random: see losses.load_lpips (lpips_random: random backbone, tests only).
    return_cameras: also return the (refined) Cameras.
    Returns Gaussians (detached, on the images' device), or (Gaussians, Cameras) when return_cameras.
    """
    _check_inputs(images, cameras, conf)
    device = images.device
    cameras = cameras.to(device)
    if len(weights) != 3 or any(w < 0 for w in weights):
        raise InputError(f"weights must be three non-negative numbers (L1, SSIM, LPIPS), got {weights}")
    w_l1, w_ssim, w_lpips = (float(w) for w in weights)
    if steps < 0:
        raise InputError(f"steps must be >= 0, got {steps}")
    if isinstance(init, Scene):
        g0 = init_from_scene(init.to(device), views=init_views, max_points=max_points, sh_degree=sh_degree, seed=seed)
    elif isinstance(init, Gaussians):
        g0 = init.detach().to(device)
    elif isinstance(init, (tuple, list)) and len(init) == 2:
        g0 = init_from_points(init[0].to(device), init[1].to(device), sh_degree=sh_degree, max_points=max_points,
                              seed=seed)
    else:
        raise InputError("init must be a Scene, a (points, colours) tuple or Gaussians")
    lpips_fn = load_lpips(lpips_net, lpips_dirs, device, pnet_rand=lpips_random) if w_lpips > 0 else None
    bg = None if background is None else torch.as_tensor(background, dtype=torch.float32, device=device)

    extent = scene_extent(cameras, g0.means)
    params = {"means": g0.means.clone(), "quats": g0.quats.clone(), "log_scales": g0.log_scales.clone(),
              "opacity_logits": g0.opacity_logits.clone(), "sh_dc": g0.sh[:, :1].clone(),
              "sh_rest": g0.sh[:, 1:].clone()}
    lrs = {"means": LR["means"] * extent, **{k: LR[k] for k in ("quats", "log_scales", "opacity_logits",
                                                                  "sh_dc", "sh_rest")}}
    groups = [{"params": [params[k].requires_grad_(True)], "lr": lrs[k], "name": k} for k in params]
    optimizer = torch.optim.Adam(groups, eps=1e-15)
    pose_opt, deltas = None, None
    if refine_poses:
        deltas = torch.zeros(len(cameras), 6, device=device, requires_grad=True)
        pose_opt = torch.optim.Adam([deltas], lr=pose_lr)
    densifier = Densifier(extent=extent, start=max(1, steps // 10), stop=int(steps * 0.7),
                          every=max(1, steps // 10)) if densify else None
    if densifier is not None and resolve_backend(backend, device) == "gsplat":
        # our densification reads the torch rasterizer's screen-space gradients; gsplat does not return them here
        log.info("densification on: rendering with the torch rasterizer (gsplat's strategies are not wired in)")
        backend = "torch"
    decay = (LR["means_final"] / LR["means"]) ** (1.0 / max(1, steps))
    gen = torch.Generator().manual_seed(seed)
    order: list = []
    band_every = max(1, steps // (g0.sh_degree + 1))
    N = len(cameras)

    for step in range(steps):
        if not order:
            order = torch.randperm(N, generator=gen).tolist()
        i = order.pop()
        g = Gaussians(params["means"], params["quats"], params["log_scales"], params["opacity_logits"],
                      torch.cat([params["sh_dc"], params["sh_rest"]], 1))
        cam = cameras[i] if deltas is None else refine_cameras(cameras[i], deltas[i:i + 1])
        out = render(g, cam, backend=backend, background=bg, sh_degree=min(step // band_every, g.sh_degree))
        if densifier is not None and out.means2d:
            out.means2d[0].retain_grad()
        pred = out.rgb.permute(0, 3, 1, 2)                     # (1, 3, H, W)
        target = images[i:i + 1]
        c = torch.ones_like(target[:, 0]) if conf is None else conf[i:i + 1]
        pix = w_l1 * (pred - target).abs().mean(1)
        if w_ssim > 0:
            pix = pix + w_ssim * (1.0 - ssim_map(pred, target))
        loss = (c * pix).mean()
        if lpips_fn is not None:
            loss = loss + w_lpips * (c * lpips_fn(pred.clamp(0, 1), target)).mean()
        optimizer.zero_grad(set_to_none=True)
        if pose_opt is not None:
            pose_opt.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if pose_opt is not None:
            pose_opt.step()
        optimizer.param_groups[0]["lr"] *= decay                # group 0 is "means"
        if densifier is not None and out.means2d:
            densifier.accumulate(out.means2d[0], out.radii[0], cameras.width, cameras.height)
            densifier.step(step, params, optimizer, gen)
        if callback is not None:
            callback(step + 1, steps)
    result = Gaussians(params["means"], params["quats"], params["log_scales"], params["opacity_logits"],
                       torch.cat([params["sh_dc"], params["sh_rest"]], 1)).detach()
    log.info("fit_gaussians: %d Gaussians after %d steps", len(result), steps)
    if return_cameras:
        cams = cameras if deltas is None else refine_cameras(cameras, deltas.detach())
        return result, cams
    return result
