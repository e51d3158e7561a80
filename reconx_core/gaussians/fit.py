"""Confidence-aware 3DGS optimisation (ReconX, Sec. 3.4).

Entry points: `fit_gaussians(...) -> Gaussians` (DESIGN.md), `optimize_gaussians(images, cameras, init, conf,
config) -> FitResult` (the Gaussians plus the refined cameras and the loss history), and the ReconX recipes
`fit_to_views` (generated frames after confidence mapping) and `fit_to_scene` (the aligned photos themselves).

L = sum_i mean_pixels( C_i * (w_l1 * |I^_i - I_i| + w_ssim * (1 - SSIM_i)) ) + w_lpips * mean_pixels(C_i * LPIPS_i),
with per-pixel L1 and SSIM maps and a spatial LPIPS map, each weighted by the same per-pixel confidence C_i
(expected in [0, 1]; 1 everywhere when no confidence is given). One random training view per step, Adam with the
3DGS per-parameter learning rates, the position rate scaled by the scene extent and decayed exponentially.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from ..errors import InputError
from ..geometry import refine_cameras
from ..types import Cameras, Gaussians, Scene, Views
from .densify import DensifyStrategy
from .init import init_from_points, init_from_scene, init_from_views
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


@dataclass
class FitConfig:
    """Settings of one fit. The defaults are ReconX's: 1,000 steps, (0.8 L1, 0.2 SSIM, 0.5 LPIPS), SH degree 3,
    no densification.

    steps: optimisation steps, one random training view each.  weights: (L1, SSIM, LPIPS); LPIPS 0 needs no backbone.
    sh_degree: SH degree (bands are switched on progressively, one every steps / (sh_degree + 1) steps).
    densify: False, True (`DensifyStrategy.for_steps(steps)`) or a DensifyStrategy.
    refine_poses / pose_lr: optimise small se(3) camera corrections with this Adam rate.
    seed: the view order and any sampling.  max_points / init_views: how a Scene or point init is subsampled.
    background: (3,) colour behind the Gaussians (black by default).  backend: see `render`.
    lpips_net / lpips_dirs / lpips_random: see losses.load_lpips (lpips_random: random backbone, tests only).
    """

    steps: int = 1000
    weights: Tuple[float, float, float] = (0.8, 0.2, 0.5)
    sh_degree: int = 3
    densify: Union[bool, DensifyStrategy] = False
    refine_poses: bool = False
    pose_lr: float = 1e-4
    seed: int = 0
    max_points: Optional[int] = 100_000
    init_views: Optional[Sequence[int]] = None
    background: Optional[Sequence[float]] = None
    backend: str = "auto"
    lpips_net: str = "alex"
    lpips_dirs: Sequence = ()
    lpips_random: bool = False

    def __post_init__(self):
        if len(self.weights) != 3 or any(float(w) < 0 for w in self.weights):
            raise InputError(f"weights must be three non-negative numbers (L1, SSIM, LPIPS), got {self.weights}")
        self.weights = tuple(float(w) for w in self.weights)
        if int(self.steps) < 0:
            raise InputError(f"steps must be >= 0, got {self.steps}")
        self.steps = int(self.steps)

    @property
    def strategy(self) -> Optional[DensifyStrategy]:
        if isinstance(self.densify, DensifyStrategy):
            return self.densify
        return DensifyStrategy.for_steps(self.steps) if self.densify else None


@dataclass
class FitResult:
    """gaussians: the fitted Gaussians (detached).  cameras: the training cameras, refined when asked.
    losses: (steps,) the training loss at every step.  densify_events: how often densification changed the set."""

    gaussians: Gaussians
    cameras: Cameras
    losses: torch.Tensor
    densify_events: int = 0


def _make_init(init, device, config: FitConfig) -> Gaussians:
    if isinstance(init, Scene):
        return init_from_scene(init.to(device), views=config.init_views, max_points=config.max_points,
                               sh_degree=config.sh_degree, seed=config.seed)
    if isinstance(init, Gaussians):
        return init.detach().to(device)
    if isinstance(init, (tuple, list)) and len(init) == 2:
        return init_from_points(init[0].to(device), init[1].to(device), sh_degree=config.sh_degree,
                                max_points=config.max_points, seed=config.seed)
    raise InputError("init must be a Scene, a (points, colours) tuple or Gaussians")


def optimize_gaussians(images: torch.Tensor, cameras: Cameras, init: Union[Scene, tuple, Gaussians],
                       conf: Optional[torch.Tensor] = None, config: Optional[FitConfig] = None,
                       callback: Optional[Callable[[int, int], None]] = None) -> FitResult:
    """Fit 3D Gaussians to posed images with a per-pixel confidence.

    images: (N, 3, H, W) float in [0, 1], the frames to fit.  cameras: the N cameras (OpenCV, c2w, pixels).
    init: a Scene (its confident points, views `config.init_views`, subsampled to `config.max_points`), a tuple
          (points (M, 3) world, colours (M, 3) in [0, 1]), or Gaussians to continue from.
    conf: (N, H, W) float per-pixel confidence (ReconX's C_i, in [0, 1]); None = all ones.
    config: FitConfig (ReconX's defaults when None).  callback(done, total): after every step, done = 1 .. steps
    (progress, interrupt: raise from it to stop).
    Works under torch.inference_mode (as ComfyUI runs nodes): the inputs are copied into ordinary tensors first.
    Returns FitResult (Gaussians on the images' device, cameras, per-step losses).
    """
    config = config or FitConfig()
    _check_inputs(images, cameras, conf)
    with torch.inference_mode(False), torch.enable_grad():
        # Tensors made under inference mode cannot be saved for backward: work on ordinary copies.
        images = images.detach().clone()
        device = images.device
        cameras = Cameras(cameras.cam_to_world.detach().clone().to(device),
                          cameras.intrinsics.detach().clone().to(device), cameras.width, cameras.height)
        conf = None if conf is None else conf.detach().clone().to(device)
        g0 = _make_init(init, device, config)
        g0 = Gaussians(*(t.detach().clone() for t in (g0.means, g0.quats, g0.log_scales, g0.opacity_logits, g0.sh)))
        return _run(images, cameras, g0, conf, config, callback)


def _run(images, cameras: Cameras, g0: Gaussians, conf, config: FitConfig, callback) -> FitResult:
    device = images.device
    steps = config.steps
    w_l1, w_ssim, w_lpips = config.weights
    lpips_fn = load_lpips(config.lpips_net, config.lpips_dirs, device, pnet_rand=config.lpips_random) \
        if w_lpips > 0 else None
    bg = None if config.background is None else torch.as_tensor(config.background, dtype=torch.float32,
                                                                device=device)
    extent = scene_extent(cameras, g0.means)
    params = {"means": g0.means, "quats": g0.quats, "log_scales": g0.log_scales,
              "opacity_logits": g0.opacity_logits, "sh_dc": g0.sh[:, :1].clone(), "sh_rest": g0.sh[:, 1:].clone()}
    lrs = {"means": LR["means"] * extent, **{k: LR[k] for k in ("quats", "log_scales", "opacity_logits",
                                                                  "sh_dc", "sh_rest")}}
    groups = [{"params": [params[k].requires_grad_(True)], "lr": lrs[k], "name": k} for k in params]
    optimizer = torch.optim.Adam(groups, eps=1e-15)
    pose_opt, deltas = None, None
    if config.refine_poses:
        # One tensor per camera: a step renders one view, so only its correction gets a gradient, and Adam skips
        # the others (one (N, 6) tensor would keep moving every camera on stale momentum).
        deltas = [torch.zeros(1, 6, device=device, requires_grad=True) for _ in range(len(cameras))]
        pose_opt = torch.optim.Adam(deltas, lr=config.pose_lr)
    strategy = config.strategy
    backend = config.backend
    state = strategy.initialize_state(extent) if strategy is not None else None
    if strategy is not None and resolve_backend(backend, device) == "gsplat":
        # the strategy reads the torch rasterizer's screen-space gradients; gsplat's are not wired in
        log.info("densification on: rendering with the torch rasterizer")
        backend = "torch"
    decay = (LR["means_final"] / LR["means"]) ** (1.0 / max(1, steps))
    gen = torch.Generator().manual_seed(config.seed)
    order: list = []
    band_every = max(1, steps // (g0.sh_degree + 1))
    losses = torch.zeros(steps)

    for step in range(steps):
        if not order:
            order = torch.randperm(len(cameras), generator=gen).tolist()
        i = order.pop()
        g = Gaussians(params["means"], params["quats"], params["log_scales"], params["opacity_logits"],
                      torch.cat([params["sh_dc"], params["sh_rest"]], 1))
        cam = cameras[i] if deltas is None else refine_cameras(cameras[i], deltas[i])
        out = render(g, cam, backend=backend, background=bg, sh_degree=min(step // band_every, g.sh_degree))
        if strategy is not None:
            strategy.step_pre_backward(state, out)
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
        if strategy is not None:
            strategy.step_post_backward(state, params, optimizer, step, out, cameras.width, cameras.height, gen)
        losses[step] = loss.detach()
        if callback is not None:
            callback(step + 1, steps)
    result = Gaussians(params["means"], params["quats"], params["log_scales"], params["opacity_logits"],
                       torch.cat([params["sh_dc"], params["sh_rest"]], 1)).detach()
    cams = cameras if deltas is None else refine_cameras(cameras, torch.cat(deltas).detach())
    log.info("fit: %d Gaussians after %d steps (loss %.4f)", len(result), steps,
             float(losses[-1]) if steps else float("nan"))
    return FitResult(result, cams, losses, state.events if state is not None else 0)


def fit_gaussians(images: torch.Tensor, cameras: Cameras, conf: Optional[torch.Tensor] = None,
                  init: Union[Scene, tuple, Gaussians] = None, steps: int = 1000,
                  weights: Sequence[float] = (0.8, 0.2, 0.5), callback: Optional[Callable[[int, int], None]] = None,
                  **options) -> Gaussians:
    """Fit 3D Gaussians to posed images with a per-pixel confidence; returns the Gaussians (detached).

    images (N, 3, H, W) in [0, 1]; cameras: N Cameras; conf: (N, H, W) in [0, 1] or None; init: a Scene, a
    (points (M, 3), colours (M, 3)) tuple or Gaussians; weights: (L1, SSIM, LPIPS). `options` are FitConfig's
    other fields (sh_degree, densify, refine_poses, seed, max_points, backend, lpips_dirs, ...). For the refined
    cameras and the loss history use `optimize_gaussians`.
    """
    unknown = set(options) - {f.name for f in dataclasses.fields(FitConfig)}
    if unknown:
        raise InputError(f"unknown fit option(s) {sorted(unknown)}; see reconx_core.gaussians.FitConfig")
    config = FitConfig(steps=steps, weights=tuple(weights), **options)
    return optimize_gaussians(images, cameras, init, conf=conf, config=config, callback=callback).gaussians


def fit_to_views(views: Views, config: Optional[FitConfig] = None,
                 callback: Optional[Callable[[int, int], None]] = None) -> FitResult:
    """ReconX's fit: every frame of `views` with its confidence as the loss weight, initialised from the first
    and last frames' point maps (`init_from_views`).

    views: Views after confidence mapping (cameras, conf (S, H, W) in [0, 1], pts3d).
    """
    config = config or FitConfig()
    if not isinstance(views, Views):
        raise InputError(f"views must be RECONX_VIEWS (Views), got {type(views).__name__}")
    if views.cameras is None or views.conf is None or views.pts3d is None:
        raise InputError("these views have no cameras or confidences yet: pass them through ReconX Confidence "
                         "Mapping before fitting")
    with torch.inference_mode(False):
        init = init_from_views(views, max_points=config.max_points, sh_degree=config.sh_degree, seed=config.seed)
    return optimize_gaussians(views.frames, views.cameras, init, conf=views.conf, config=config, callback=callback)


def fit_to_scene(scene: Scene, config: Optional[FitConfig] = None, images: Optional[torch.Tensor] = None,
                 conf: Optional[torch.Tensor] = None,
                 callback: Optional[Callable[[int, int], None]] = None) -> FitResult:
    """Gaussians fitted to the scene's own views (or to `images` (N, 3, H, W) taken by its cameras), initialised
    from its confident points. conf: optional (N, H, W) loss weights in [0, 1]."""
    if not isinstance(scene, Scene):
        raise InputError(f"scene must be a RECONX_SCENE (Scene), got {type(scene).__name__}")
    return optimize_gaussians(scene.images if images is None else images, scene.cameras, scene, conf=conf,
                              config=config, callback=callback)
