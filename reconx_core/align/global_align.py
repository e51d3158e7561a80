"""`align_views`: DUSt3R pair predictions -> one aligned Scene (the public entry point of the stage)."""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

import torch

from ..errors import InputError
from ..geometry import backproject_depth, intrinsics_from_focal
from ..types import Cameras, PairPredictions, Scene
from .geometry import quat_trans_to_pose, signed_expm1
from .init import init_mst
from .optimize import focals_of, learning_rate, objective, prepare_edges, pw_scales, run_adam
from .pairviewer import pair_viewer

log = logging.getLogger(__name__)


def _check_pairs(pairs: PairPredictions) -> int:
    """Validate the graph and the numbers; returns the number of views."""
    edges = pairs.edges
    if edges.dtype not in (torch.int64, torch.int32) or edges.numel() == 0:
        raise InputError("pairs.edges must be a non-empty (E, 2) integer tensor of view indices")
    if int(edges.min()) < 0:
        raise InputError("pairs.edges holds a negative view index")
    H, W = pairs.pts_i.shape[1:3]
    if H < 2 or W < 2:
        raise InputError(f"point maps of {H}x{W} pixels are too small to align")
    listed = [tuple(e) for e in edges.tolist()]
    if any(i == j for i, j in listed):
        raise InputError("pairs.edges holds a self-pair (i, i); every edge must join two different views")
    if len(set(listed)) != len(listed):
        raise InputError("pairs.edges lists the same (i, j) pair twice; remove the duplicates")
    n_views = pairs.n_views
    seen = sorted({v for e in listed for v in e})
    if seen != list(range(n_views)):
        missing = sorted(set(range(n_views)) - set(seen))
        raise InputError(f"views {missing or seen} are not covered by the pair graph of {n_views} views; every view "
                         "must appear in at least one pair (and indices must be 0..N-1)")
    for name in ("pts_i", "pts_j_in_i", "conf_i", "conf_j"):
        t = getattr(pairs, name)
        if not torch.isfinite(t).all():
            raise InputError(f"pairs.{name} contains NaN or infinite values; check the input images (NaN pixels?) "
                             "and the network's precision")
    if float(pairs.conf_i.min()) <= 0 or float(pairs.conf_j.min()) <= 0:
        raise InputError("confidences must be positive (DUSt3R's are >= 1); they are used as log-weights")
    return n_views


def image_confidence(edges: torch.Tensor, conf_i: torch.Tensor, conf_j: torch.Tensor, n_views: int) -> torch.Tensor:
    """(N, H, W) per-view confidence: the max over every edge's prediction of that view (official `im_conf`)."""
    E, H, W = conf_i.shape
    im_conf = conf_i.new_zeros(n_views, H * W)
    for side, conf in ((0, conf_i), (1, conf_j)):
        index = edges[:, side].view(E, 1).expand(E, H * W)
        im_conf.scatter_reduce_(0, index, conf.reshape(E, H * W), "amax")
    return im_conf.view(n_views, H, W)


def _build_scene(cam_to_world, focals, depths, im_conf, images, info, min_conf: float) -> Scene:
    N, H, W = depths.shape
    intrinsics = intrinsics_from_focal(focals.float(), W, H)
    pts3d = backproject_depth(depths, intrinsics, cam_to_world)
    return Scene(cameras=Cameras(cam_to_world, intrinsics, W, H), depths=depths, pts3d=pts3d, conf=im_conf,
                 images=images, info=info, min_conf=min_conf)


def align_views(pairs: PairPredictions, *, niter: int = 300, lr: float = 0.01, schedule: str = "cosine",
                init: str = "mst", min_conf_thr: float = 3.0, lr_min: float = 1e-6, base_scale: float = 0.5,
                focal_break: float = 20.0, two_view_fast_path: bool = True,
                callback: Optional[Callable[[int, int], None]] = None) -> Scene:
    """Confidence-weighted global alignment of DUSt3R pair predictions (DUSt3R's PointCloudOptimizer).

    Solves min sum_e sum_{v in e} sum_k log(C^{v,e}_k) | P^v_k - s_e T_e X^{v,e}_k | over per-view log-depths,
    camera-to-world poses and focals and one similarity per edge, from a maximum-spanning-tree init, with
    `niter` Adam steps (betas (0.9, 0.9)) whose learning rate decays from `lr` to `lr_min` ("cosine"/"linear").
    With two views joined by both directed edges and `two_view_fast_path`, it returns DUSt3R's PairViewer result
    instead (no optimisation; info["loss"] is NaN there, as officially).

    pairs: PairPredictions, edges (E, 2), point maps (E, H, W, 3), confidences (E, H, W), optional images.
    min_conf_thr: the confidence a pixel must exceed to take part in the PnP initialisation; it becomes the
    returned scene's `min_conf`, which every later stage filters with (`Scene.confident_mask`).
    base_scale, focal_break: the official parameterisation constants.
    callback(step, total): called once per Adam step; raise from it to stop.
    Returns a Scene on the input's device: cameras (cam-to-world, pixel intrinsics, principal point (W/2, H/2)),
    depths (N, H, W), pts3d (N, H, W, 3) world frame, conf (N, H, W) the per-view max of the raw confidences,
    images (pairs.images or 0.5 grey), min_conf = min_conf_thr. info: "loss" (the official objective, normalised by the total pixel count,
    at the returned parameters), "loss_curve" (niter,) (before each step), "init_loss", "iterations", "mode",
    "pw_poses" (E, 4, 4) scaled edge-to-world transforms, "pw_scale" (E,), "timings" (seconds).
    """
    if init != "mst":
        raise InputError(f"unknown init {init!r}; only 'mst' (maximum spanning tree) is supported")
    if niter < 0:
        raise InputError(f"niter must be >= 0, got {niter}")
    learning_rate(0, 1, lr, schedule)  # validates the schedule name
    n_views = _check_pairs(pairs)
    t_start = time.perf_counter()
    device = pairs.pts_i.device
    # Fresh float32 copies: callers often run DUSt3R under inference_mode, and the caller's tensors stay untouched.
    with torch.inference_mode(False), torch.no_grad():
        edges = pairs.edges.detach().clone().long().to(device)
        pts_i, pts_j = (t.detach().clone().float() for t in (pairs.pts_i, pairs.pts_j_in_i))
        conf_i, conf_j = (t.detach().clone().float() for t in (pairs.conf_i, pairs.conf_j))
        H, W = pts_i.shape[1:3]
        images = (pairs.images.detach().clone().float() if pairs.images is not None
                  else torch.full((n_views, 3, H, W), 0.5, device=device))
        im_conf = image_confidence(edges, conf_i, conf_j, n_views)
        listed = {tuple(e) for e in edges.tolist()}

        if n_views == 2 and two_view_fast_path and listed == {(0, 1), (1, 0)}:
            cam_to_world, focals, depths = pair_viewer(edges, pts_i, pts_j, conf_i, conf_j, im_conf, min_conf_thr)
            info = {"mode": "pairviewer", "loss": float("nan"), "loss_curve": torch.empty(0, device=device), "iterations": 0,
                    "timings": {"total_s": time.perf_counter() - t_start}}
            if callback is not None:
                callback(1, 1)
            return _build_scene(cam_to_world, focals, depths, im_conf, images, info, min_conf_thr)

        params = init_mst(edges.tolist(), pts_i, pts_j, conf_i, conf_j, im_conf, min_conf_thr,
                          base_scale=base_scale, focal_break=focal_break)
        data = prepare_edges(edges, pts_i, pts_j, conf_i, conf_j, n_views)
        t_init = time.perf_counter()
        init_loss = float(objective(params, data, base_scale, focal_break))
        params, opt_info = run_adam(params, data, niter=niter, lr=lr, schedule=schedule, lr_min=lr_min,
                                    base_scale=base_scale, focal_break=focal_break, callback=callback)
        final_loss = float(objective(params, data, base_scale, focal_break))
        cam_to_world = quat_trans_to_pose(params.im_quat, signed_expm1(params.im_log_trans))
        pw_scale = pw_scales(params.pw_log_scale, base_scale)
        pw_poses = quat_trans_to_pose(params.pw_quat, signed_expm1(params.pw_log_trans))
        pw_poses[:, :3] *= pw_scale.view(-1, 1, 1)
        info = {"mode": "optimizer", "loss": final_loss, "init_loss": init_loss, "loss_curve": opt_info["loss_curve"],
                "iterations": niter, "pw_poses": pw_poses, "pw_scale": pw_scale,
                "timings": {"init_s": t_init - t_start, "optimize_s": opt_info["seconds"],
                            "total_s": time.perf_counter() - t_start}}
        log.info("aligned %d views over %d edges: loss %.6f -> %.6f in %d steps (%.2f s)", n_views, len(edges),
                 init_loss, final_loss, niter, info["timings"]["total_s"])
        depths = params.im_log_depth.exp().reshape(n_views, H, W).clone()
        return _build_scene(cam_to_world, focals_of(params, focal_break).clone(), depths, im_conf, images, info,
                            min_conf_thr)
