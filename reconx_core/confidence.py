"""ReconX stage 4, confidence mapping: cameras, point maps and [0, 1] confidences for generated video frames.

The generated frames come with the reference views' cameras only. DUSt3R runs over a video-shaped pair graph
(`video_pair_graph`), the global alignment (`reconx_core.align.align_views`) puts all frames in one frame, and a
similarity fitted on the reference views (`reference_similarity`) carries everything into the first stage's world
frame and scale. Each pixel's confidence combines DUSt3R's own confidence with a multi-view depth-consistency test
(`geometric_consistency`), so regions where the generated video contradicts itself get low weight even when DUSt3R
is sure of itself.

Entry points:
- `video_pair_graph(n_frames, reference_index, window=3, reference_links="nearest") -> (E, 2) long`
- `map_confidence_from_pairs(pairs, reference_index, reference_cameras, ...) -> Scene` (network resolution)
- `map_confidence(model, views, ...) -> Views` (frame resolution; runs DUSt3R)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Optional, Sequence, Tuple, Union

import roma
import torch
import torch.nn.functional as F

from .align import align_views
from .errors import InputError
from .geometry import backproject_depth, camera_similarity, scale_intrinsics, transform_cameras
from .types import Cameras, PairPredictions, Scene, Views

log = logging.getLogger(__name__)

Callback = Optional[Callable[[int, int], None]]


def _reference_list(reference_index, n_frames: int, min_count: int = 2) -> list:
    """Validated reference frame indices as a list of ints."""
    refs = [int(r) for r in torch.as_tensor(reference_index).reshape(-1).tolist()]
    if len(refs) < min_count:
        raise InputError(f"confidence mapping needs at least 2 reference views to fix the scale, got {len(refs)}; "
                         "interpolate between two or more photos")
    if min(refs) < 0 or max(refs) >= n_frames:
        raise InputError(f"reference_index {refs} points outside the {n_frames} frames; indices must be in "
                         f"[0, {n_frames})")
    if len(set(refs)) != len(refs):
        raise InputError(f"reference_index {refs} lists a frame twice; each reference view is one frame")
    return refs


def video_pair_graph(n_frames: int, reference_index, window: int = 3,
                     reference_links: str = "nearest") -> torch.Tensor:
    """DUSt3R pairs for an ordered video: a sliding window plus links to the reference frames.

    n_frames: S >= 2 frames in temporal order; reference_index: (K,) frame indices of the reference views.
    window: every frame f is paired with f+1 .. f+window (not cyclic).
    reference_links: "nearest" links every frame to the closest reference strictly before and strictly after it
    (its segment's two ends; consecutive references are thereby linked to each other), "all" to every reference.
    Returns (E, 2) long: every unordered pair once as (i, j) with i < j (sorted), then the same pairs reversed
    (the official symmetrised order). No self pairs, no duplicates; O(S (window + 2)) edges instead of S (S - 1).
    """
    n = int(n_frames)
    if n < 2:
        raise InputError(f"a video needs at least 2 frames to pair, got {n}")
    if int(window) < 1:
        raise InputError(f"window must be at least 1, got {window}")
    if reference_links not in ("nearest", "all"):
        raise InputError(f"reference_links must be 'nearest' or 'all', got {reference_links!r}")
    refs = sorted(_reference_list(reference_index, n, min_count=0))
    pairs = {(f, g) for f in range(n) for g in range(f + 1, min(n, f + int(window) + 1))}
    for f in range(n):
        if reference_links == "all":
            linked = [r for r in refs if r != f]
        else:
            before, after = [r for r in refs if r < f], [r for r in refs if r > f]
            linked = ([before[-1]] if before else []) + ([after[0]] if after else [])
        pairs.update((min(f, r), max(f, r)) for r in linked)
    ordered = sorted(pairs)
    ordered += [(j, i) for i, j in ordered]
    return torch.tensor(ordered, dtype=torch.long).reshape(-1, 2)


def reference_similarity(aligned_c2w: torch.Tensor, known_c2w: torch.Tensor, depth_scale: Optional[float] = None):
    """Similarity X_known = s R X_aligned + t that carries the aligned reference cameras onto the known ones.

    aligned_c2w, known_c2w: (K, 4, 4) camera-to-world poses of the same K >= 2 views. See
    `reconx_core.geometry.camera_similarity` for the closed form; when the reference centres coincide the scale is
    `depth_scale` (the references' known over aligned depths). Returns (scale, rot (3, 3), trans (3,)) float64.
    """
    scale, rot, trans = camera_similarity(aligned_c2w, known_c2w, depth_scale)
    if depth_scale is not None and scale == float(depth_scale):
        log.warning("the reference cameras share one centre: scale taken from their depths (%.4g)", depth_scale)
    return scale, rot, trans


def geometric_consistency(depths: torch.Tensor, cam_to_world: torch.Tensor, intrinsics: torch.Tensor,
                          edges: torch.Tensor, depth_tol: float = 0.05, min_views: int = 1, unseen: float = 0.5,
                          callback: Callback = None) -> torch.Tensor:
    """Soft multi-view depth agreement of every pixel with its graph neighbours, in [0, 1].

    depths: (S, H, W) z-depths; cam_to_world: (S, 4, 4); intrinsics: (S, 3, 3) pixels, at (W, H);
    edges: (E, 2) pair graph (direction ignored). For pixel p of frame i with world point X and every neighbour j
    where X projects in front of camera j and inside its image (z_j = depth of X in camera j, at sub-pixel q):
      r_ij = dist(z_j, [min D_j(q'), max D_j(q')]) / z_j,  q' the 4 pixels around q  (0 when z_j lies between
             the 4 depths: exact on slanted surfaces, lenient at depth edges)
      g_ij = exp(-r_ij^2 / (2 depth_tol^2))
    g_i(p) = the `min_views`-th largest g_ij over the neighbours that see X (max for min_views = 1: a point
    occluded in some neighbours but confirmed by one is fine; a wrong point is confirmed by none). Pixels seen
    by fewer than `min_views` neighbours take `unseen` for the missing ones. Invariant to the world scale.
    callback(step, total): once per frame. Returns (S, H, W) float32.
    """
    if not depth_tol > 0:
        raise InputError(f"depth_tol must be positive, got {depth_tol}")
    if not 0 <= unseen <= 1:
        raise InputError(f"unseen must be in [0, 1], got {unseen}")
    if int(min_views) < 1:
        raise InputError(f"min_views must be at least 1, got {min_views}")
    S, H, W = depths.shape
    depths, c2w, Ks = depths.float(), cam_to_world.float(), intrinsics.float()
    w2c = torch.linalg.inv(c2w)
    neighbours = [set() for _ in range(S)]
    for i, j in edges.tolist():
        if i != j:
            neighbours[i].add(j)
            neighbours[j].add(i)
    out = torch.empty(S, H * W, device=depths.device)
    for i in range(S):
        world = backproject_depth(depths[i:i + 1], Ks[i:i + 1], c2w[i:i + 1]).reshape(-1, 3)
        scores = [torch.full((H * W,), -1.0, device=depths.device)]  # -1 = "not seen"; fills stay below 0
        for j in sorted(neighbours[i]):
            cam = world @ w2c[j, :3, :3].T + w2c[j, :3, 3]
            z = cam[:, 2]
            uv = torch.nan_to_num((cam @ Ks[j].T)[:, :2] / z.clamp(min=1e-12).unsqueeze(-1), nan=-1.0,
                                  posinf=-1.0, neginf=-1.0)
            seen = (z > 1e-9) & (uv[:, 0] >= 0) & (uv[:, 0] <= W - 1) & (uv[:, 1] >= 0) & (uv[:, 1] <= H - 1)
            u0 = uv[:, 0].floor().clamp(0, W - 1).long()
            v0 = uv[:, 1].floor().clamp(0, H - 1).long()
            u1, v1 = (u0 + 1).clamp(max=W - 1), (v0 + 1).clamp(max=H - 1)
            d = torch.stack([depths[j][vv, uu] for vv, uu in ((v0, u0), (v0, u1), (v1, u0), (v1, u1))], dim=-1)
            gap = torch.maximum(d.min(-1).values - z, z - d.max(-1).values).clamp(min=0)
            r = gap / z.clamp(min=1e-12)
            g = torch.exp(-0.5 * (r / depth_tol) ** 2)
            scores.append(torch.where(seen, g, torch.full_like(g, -1.0)))
        stacked = torch.stack(scores, dim=-1)
        m = min(int(min_views), stacked.shape[-1])
        kth = stacked.topk(m, dim=-1).values[:, -1]
        out[i] = torch.where(kth < 0, torch.full_like(kth, unseen), kth)
        if callback is not None:
            callback(i + 1, S)
    return out.reshape(S, H, W)


def dust3r_term(conf: torch.Tensor, reference_index: Sequence[int]) -> torch.Tensor:
    """DUSt3R's confidence rescaled to [0, 1] by the reference frames' typical level.

    conf: (S, H, W) raw confidences (>= 1). a = clamp(log C / median_{reference pixels}(log C), 0, 1): a pixel as
    confident as the median pixel of the (real) reference photos, or more, gets 1. Returns (S, H, W) float32.
    """
    log_c = conf.float().clamp(min=1.0).log()
    level = float(log_c[list(reference_index)].median())
    if level <= 1e-6:
        log.warning("reference frames have DUSt3R confidence ~1 everywhere; the DUSt3R term is left at 1")
        return torch.ones_like(log_c)
    return (log_c / level).clamp(0, 1)


def _as_poses(reference_cameras: Union[Cameras, torch.Tensor]) -> torch.Tensor:
    if isinstance(reference_cameras, Cameras):
        return reference_cameras.cam_to_world
    if isinstance(reference_cameras, torch.Tensor) and reference_cameras.dim() == 3 and \
            reference_cameras.shape[1:] == (4, 4):
        return reference_cameras
    raise InputError("reference_cameras must be Cameras or a (K, 4, 4) camera-to-world tensor")


def map_confidence_from_pairs(pairs: PairPredictions, reference_index, reference_cameras: Union[Cameras, torch.Tensor],
                              *, niter: int = 300, lr: float = 0.01, schedule: str = "cosine",
                              min_conf_thr: float = 3.0, depth_tol: float = 0.05, min_views: int = 1,
                              unseen: float = 0.5, reference_depths: Optional[torch.Tensor] = None,
                              callback: Callback = None) -> Scene:
    """Align DUSt3R pair predictions of S frames and express them in the reference cameras' world frame.

    pairs: PairPredictions over frames 0..S-1 (e.g. on `video_pair_graph`), (E, H, W) at the network resolution.
    reference_index: (K,) frames whose camera-to-world poses are known; reference_cameras: their Cameras (any
    size, only the poses are used) or (K, 4, 4) poses, in the first stage's world frame.
    niter, lr, schedule, min_conf_thr: passed to `align_views`. depth_tol, min_views, unseen: see
    `geometric_consistency`. reference_depths: optional (K,) median depth of each reference view in the first
    stage, the scale's fallback when the reference centres coincide (see `reference_similarity`).
    Steps: align_views -> similarity (s, R, t) = `reference_similarity`(aligned reference poses, known poses) ->
    every pose becomes [R R_i | s R c_i + t], every point s R X + t, every depth s d.
    Confidence per pixel:  conf = a * g  in [0, 1], with a = `dust3r_term` (clamp(log C / median_ref log C, 0, 1),
    C = the per-view max of DUSt3R's raw confidences) and g = `geometric_consistency` (max over graph neighbours
    of exp(-r^2 / (2 depth_tol^2)), r the relative depth disagreement; `unseen` where no neighbour sees the point).
    callback(step, total): niter alignment steps, then one per frame for the consistency test.
    Returns a Scene at the network resolution in the reference world frame: cameras (S), depths, pts3d, images,
    conf (S, H, W) in [0, 1] (not DUSt3R's raw scale: info["conf_normalised"] is True). info adds "dust3r_term",
    "geometric_term" (S, H, W), "similarity" {"scale", "rot", "trans"}, "reference_rot_err_deg" (K,),
    "reference_centre_err" (K,) relative to the references' spread, "align_loss", "edges".
    """
    if not isinstance(pairs, PairPredictions):
        raise InputError(f"pairs must be PairPredictions, got {type(pairs).__name__}")
    S = pairs.n_views
    if S < 2:
        raise InputError(f"confidence mapping needs at least 2 frames, got {S}")
    refs = _reference_list(reference_index, S)
    known = _as_poses(reference_cameras)
    if known.shape[0] != len(refs):
        raise InputError(f"{len(refs)} reference indices but {known.shape[0]} reference cameras; give one camera per "
                         "reference frame")
    if not bool(torch.isfinite(known).all()):
        raise InputError("reference camera poses contain NaN or infinite values")
    total = niter + S

    def align_progress(step, _total):
        if callback is not None:
            callback(step, total)

    scene = align_views(pairs, niter=niter, lr=lr, schedule=schedule, min_conf_thr=min_conf_thr,
                        callback=align_progress)
    device = scene.pts3d.device
    c2w_al = scene.cameras.cam_to_world
    if not all(bool(torch.isfinite(t).all()) for t in (scene.depths, c2w_al, scene.cameras.intrinsics)):
        raise InputError("the global alignment of the frames produced non-finite depths or cameras: DUSt3R's point "
                         "maps are not usable geometry (random/tiny test weights, blank or broken frames?). Use a "
                         "real DUSt3R checkpoint and check the frames")
    depth_scale = None
    if reference_depths is not None:
        aligned_depth = scene.depths[refs].flatten(1).median(dim=1).values
        depth_scale = float((reference_depths.to(device).float() / aligned_depth).median())
    scale, rot, trans = reference_similarity(c2w_al[refs], known.to(device), depth_scale)
    rot32, trans32 = rot.float(), trans.float()
    c2w = transform_cameras(scene.cameras, scale, rot32, trans32).cam_to_world
    pts3d = scale * scene.pts3d @ rot32.T + trans32
    depths = scene.depths * scale

    known_d = known.to(device).double()
    rel = known_d[:, :3, :3].transpose(1, 2) @ c2w[refs, :3, :3].double()
    rot_err = torch.rad2deg(roma.rotmat_to_rotvec(rel).norm(dim=-1))
    centres = known_d[:, :3, 3]
    spread = float((centres - centres.mean(0)).norm(dim=-1).square().mean().sqrt())
    centre_err = (c2w[refs, :3, 3].double() - centres).norm(dim=-1) / spread
    if float(rot_err.max()) > 5 or float(centre_err.max()) > 0.1:
        log.warning("the frames' alignment fits the reference cameras poorly (rotation up to %.1f deg, centre up to "
                    "%.0f %% of their spread): the generated video may not be consistent with the photos",
                    float(rot_err.max()), 100 * float(centre_err.max()))

    a = dust3r_term(scene.conf, refs)
    g = geometric_consistency(depths, c2w, scene.cameras.intrinsics, pairs.edges, depth_tol=depth_tol,
                              min_views=min_views, unseen=unseen,
                              callback=None if callback is None else lambda i, n: callback(niter + i, total))
    conf = (a * g).clamp(0, 1)
    info = dict(scene.info, conf_normalised=True, dust3r_term=a, geometric_term=g, align_loss=scene.info.get("loss"),
                similarity={"scale": scale, "rot": rot32, "trans": trans32}, reference_rot_err_deg=rot_err.float(),
                reference_centre_err=centre_err.float(), edges=pairs.edges)
    log.info("confidence mapping: %d frames, similarity scale %.4g, reference residuals <= %.2f deg / %.2f %%, mean "
             "confidence %.3f", S, scale, float(rot_err.max()), 100 * float(centre_err.max()), float(conf.mean()))
    cameras = Cameras(c2w, scene.cameras.intrinsics.clone(), scene.cameras.width, scene.cameras.height)
    return Scene(cameras=cameras, depths=depths, pts3d=pts3d, conf=conf, images=scene.images, info=info)


def network_size(height: int, width: int, image_size: int, patch_size: int = 16) -> Tuple[int, int]:
    """(h, w) at which DUSt3R sees frames of height x width: the aspect kept (up to rounding to `patch_size`),
    the short side 224 for 224-px checkpoints, else the long side `image_size` (512); at least 64 px a side."""
    s = 224 / min(height, width) if int(image_size) == 224 else int(image_size) / max(height, width)
    h, w = (max(64, int(round(x * s / patch_size)) * patch_size) for x in (height, width))
    return h, w


def _resize(t: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, *size), bilinear, align_corners=False (pixel u -> s (u + 0.5) - 0.5)."""
    if tuple(t.shape[-2:]) == tuple(size):
        return t
    down = size[0] < t.shape[-2] or size[1] < t.shape[-1]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=down)


def map_confidence(model, views: Views, *, window: int = 3, reference_links: str = "nearest", niter: int = 300,
                   lr: float = 0.01, batch_size: int = 8, min_conf_thr: float = 3.0, depth_tol: float = 0.05,
                   min_views: int = 1, unseen: float = 0.5, network_hw: Optional[Tuple[int, int]] = None,
                   callback: Callback = None) -> Views:
    """Cameras, world point maps and [0, 1] confidences for every frame of `views` (ReconX confidence mapping).

    model: a `Dust3R` (runs on its own device); views: Views with frames (S, 3, H, W) in [0, 1], reference_index
    (K,) and reference_cameras (K) in the first stage's world frame, K >= 2.
    The frames are resized (bilinear, not cropped) to `network_hw` or `network_size(H, W, model.image_size)`,
    DUSt3R runs on `video_pair_graph(S, reference_index, window, reference_links)`, and
    `map_confidence_from_pairs` aligns them (see there for the confidence formula). Back at the frame size, with
    s_x = w/W, s_y = h/H: fx = f / s_x, fy = f / s_y, cx = (w/2 + 0.5) / s_x - 0.5, cy likewise (pixel centres at
    integers); depths and confidences are resampled bilinearly (frame pixel u at network position s (u + 0.5) - 0.5)
    and pts3d is the resampled depth back-projected through these intrinsics and poses, so points, cameras and
    depths agree exactly at the frame size.
    views.reference_depths (optional, (K,)): the references' median depths in the first stage, used for the scale
    when the reference cameras share one centre.
    callback(step, total): DUSt3R batches, then alignment steps, then one per frame.
    Returns a new Views on views.device: cameras (S) of size (W, H), conf (S, H, W) in [0, 1], pts3d (S, H, W, 3)
    world frame; info adds "confidence" (network size, edges count, similarity, reference residuals, align loss,
    and, when views.intended_cameras is set, `intended_deviation`'s per-frame rotation (degrees) and centre distance
    (relative to the reference baseline) between the recovered and the intended cameras). The intended cameras are
    reported against, not used to initialise: the alignment starts from DUSt3R's own spanning tree.
    """
    from .dust3r import infer_pairs

    if not isinstance(views, Views):
        raise InputError(f"views must be RECONX_VIEWS (Views), got {type(views).__name__}")
    S, _, H, W = views.frames.shape
    if S < 2:
        raise InputError(f"confidence mapping needs at least 2 frames, got {S}")
    refs = _reference_list(views.reference_index, S)
    patch = int(getattr(model, "patch_size", 16))
    if network_hw is None:
        h, w = network_size(H, W, int(getattr(model, "image_size", 512)), patch)
    else:
        h, w = (int(x) for x in network_hw)
        if h % patch or w % patch or min(h, w) < 64:
            raise InputError(f"network_hw {network_hw} must be multiples of {patch} and at least 64")
    edges = video_pair_graph(S, refs, window, reference_links)
    device = next(model.parameters()).device
    n_inf = math.ceil(S / max(1, batch_size)) + math.ceil(edges.shape[0] / max(1, batch_size))
    total = n_inf + niter + S

    def progress(offset):
        return None if callback is None else (lambda step, _t: callback(offset + step, total))

    frames = _resize(views.frames.to(device=device, dtype=torch.float32), (h, w)).clamp(0, 1)
    pairs = infer_pairs(model, frames, graph=edges, batch_size=batch_size, callback=progress(0))
    known = views.reference_cameras.cam_to_world.to(device)
    scene = map_confidence_from_pairs(pairs, refs, known, niter=niter, lr=lr, min_conf_thr=min_conf_thr,
                                      depth_tol=depth_tol, min_views=min_views, unseen=unseen,
                                      reference_depths=views.reference_depths, callback=progress(n_inf))
    sx, sy = w / W, h / H
    K = scale_intrinsics(scene.cameras.intrinsics, 1 / sx, 1 / sy)  # network size -> frame size
    depth = _resize(scene.depths.unsqueeze(1), (H, W)).squeeze(1)
    conf = _resize(scene.conf.unsqueeze(1), (H, W)).squeeze(1).clamp(0, 1)
    c2w = scene.cameras.cam_to_world
    pts3d = backproject_depth(depth, K, c2w)
    info_conf = {"network_hw": (h, w), "edges": int(edges.shape[0]), "window": int(window),
                 "similarity": scene.info["similarity"], "align_loss": scene.info["align_loss"],
                 "reference_rot_err_deg": scene.info["reference_rot_err_deg"],
                 "reference_centre_err": scene.info["reference_centre_err"]}
    if views.intended_cameras is not None:
        info_conf.update(intended_deviation(c2w, views.intended_cameras.cam_to_world.to(c2w.device),
                                            views.reference_cameras.cam_to_world.to(c2w.device)))
        log.info("recovered cameras vs the intended path: rotation up to %.1f deg (median %.1f), centres up to "
                 "%.0f %% of the reference baseline (median %.0f %%)", float(info_conf["intended_rot_deg"].max()),
                 float(info_conf["intended_rot_deg"].median()), 100 * float(info_conf["intended_centre_err"].max()),
                 100 * float(info_conf["intended_centre_err"].median()))
    out_dev = views.device
    return dataclasses.replace(
        views, cameras=Cameras(c2w, K, W, H).to(out_dev), conf=conf.to(out_dev), pts3d=pts3d.to(out_dev),
        info=dict(views.info, confidence=_move_info(info_conf, out_dev)))


def intended_deviation(recovered_c2w: torch.Tensor, intended_c2w: torch.Tensor,
                       reference_c2w: torch.Tensor) -> dict:
    """How far the recovered cameras moved from the path the frames were generated for.

    recovered_c2w, intended_c2w: (S, 4, 4) camera-to-world poses of the frames, both in the first stage's frame;
    reference_c2w: (K, 4, 4) the reference views' poses. Returns {"intended_rot_deg": (S,) geodesic angle between
    each recovered and intended rotation, "intended_centre_err": (S,) distance between their centres divided by the
    reference baseline (the mean distance between consecutive reference centres; 1 when they coincide)}.
    """
    rel = intended_c2w[:, :3, :3].double().transpose(1, 2) @ recovered_c2w[:, :3, :3].double()
    rot = torch.rad2deg(roma.rotmat_to_rotvec(rel).norm(dim=-1)).float()
    centres = reference_c2w[:, :3, 3].double()
    baseline = float((centres[1:] - centres[:-1]).norm(dim=-1).mean()) if centres.shape[0] > 1 else 0.0
    dist = (recovered_c2w[:, :3, 3].double() - intended_c2w[:, :3, 3].double()).norm(dim=-1)
    return {"intended_rot_deg": rot, "intended_centre_err": (dist / (baseline if baseline > 1e-12 else 1.0)).float()}


def _move_info(info: dict, device) -> dict:
    return {k: (_move_info(v, device) if isinstance(v, dict) else v.to(device) if isinstance(v, torch.Tensor) else v)
            for k, v in info.items()}
