"""The novel-view benchmark protocol (MVSplat / pixelSplat / ReconX tables), for reconstructions that live in
their own frame.

A scene gives two context views and three targets (MVSplat's evaluation index), all at 256 x 256 after
`reconx_core.data.rescale_and_crop`. A method reconstructs Gaussians from the context images alone and
reports where it believes the context cameras are (`Reconstruction`). Pose-free pipelines such as ours
(DUSt3R) work in their own frame and scale, so the targets' true cameras are carried into that frame by the
similarity that maps the true context cameras onto the estimated ones (`context_similarity`):

    X_ours = s R X_true + t,   with two views:
    R = the rotation closest to the mean of R_est,k R_true,k^T (k = both context views; chordal mean),
    s = |c_est,0 - c_est,1| / |c_true,0 - c_true,1|  (the scale is fixed by the context baseline),
    t = mean_k(c_est,k) - s R mean_k(c_true,k)        (c = camera centres).

A target camera c2w_true = [R_t | c_t] becomes [R R_t | s R c_t + t]. The targets' intrinsics are their true
ones with the focal lengths multiplied by the ratio of the estimated to the true context focals
(`target_intrinsics="estimated"`, the default: a method that misjudges the focal renders targets with the
same error it reconstructed with) or kept as they are ("true").

Pose-free methods also report a test-time refinement of each target pose with the Gaussians frozen
(`refine_target_poses`: a small se(3) correction per target, photometric loss, Adam); scripts/evaluate.py
reports it in separate columns, never mixed into the plain numbers.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .errors import InputError
from .geometry import camera_similarity, transform_poses
from .metrics import LpipsMetric, image_metrics
from .types import Cameras, Gaussians

METRICS = ("psnr", "ssim", "lpips")


# ----------------------------------------------------------------------------------------------- camera mapping

@dataclass
class Similarity:
    """X' = scale * rotation @ X + translation (float64)."""

    scale: float
    rotation: torch.Tensor
    translation: torch.Tensor

    def apply_c2w(self, cam_to_world: torch.Tensor) -> torch.Tensor:
        """(N, 4, 4) camera-to-world poses moved by the similarity (rotation and centre; cameras stay rigid)."""
        return transform_poses(cam_to_world.double(), self.scale, self.rotation, self.translation).to(
            cam_to_world.dtype)

    def apply_points(self, points: torch.Tensor) -> torch.Tensor:
        """(..., 3) points moved by the similarity."""
        R, t = self.rotation.to(points.device).double(), self.translation.to(points.device).double()
        return (self.scale * points.double() @ R.T + t).to(points.dtype)

    def inverse(self) -> "Similarity":
        R_inv = self.rotation.T.clone()
        return Similarity(1.0 / self.scale, R_inv, -(R_inv @ self.translation) / self.scale)


def has_baseline(cam_to_world: torch.Tensor, min_baseline: float = 1e-8) -> bool:
    """Whether (K, 4, 4) cameras have distinct centres: their spread about the mean exceeds min_baseline times
    max(1, the largest centre norm), and is finite. Without it the two-view scale is undefined."""
    c = cam_to_world[:, :3, 3].double().cpu()
    spread = float((c - c.mean(0)).norm(dim=-1).pow(2).sum().sqrt())
    return math.isfinite(spread) and spread > min_baseline * max(1.0, float(c.norm(dim=-1).max()))


def context_similarity(true_c2w: torch.Tensor, est_c2w: torch.Tensor, min_baseline: float = 1e-8) -> Similarity:
    """The similarity carrying the true context cameras onto the estimated ones (module docstring).

    true_c2w, est_c2w: (K, 4, 4), K >= 2 context cameras, OpenCV camera-to-world, in the dataset's frame and in
    the reconstruction's frame. The closed form of `reconx_core.geometry.camera_similarity`: rotation from the
    orientations (chordal mean of R_est R_true^T) and the centred camera centres together; scale the ratio of
    the centres' spreads about their means (with two views: the ratio of the baselines); translation from the
    mean centres. Raises InputError when either set of centres coincides (the scale is then undefined).
    """
    if true_c2w.shape != est_c2w.shape or true_c2w.ndim != 3 or true_c2w.shape[1:] != (4, 4) or \
            true_c2w.shape[0] < 2:
        raise InputError(f"context poses must both be (K >= 2, 4, 4), got {tuple(true_c2w.shape)} and "
                         f"{tuple(est_c2w.shape)}")
    tr, es = true_c2w.double().cpu(), est_c2w.double().cpu()
    if not has_baseline(tr, min_baseline):
        raise InputError("the true context cameras share one centre (no baseline): the scale of the "
                         "reconstruction cannot be tied to the dataset's; this scene cannot be evaluated")
    if not has_baseline(es, min_baseline):
        raise InputError("the estimated context cameras share one centre (the reconstruction found no baseline): "
                         "the target cameras cannot be placed in its frame")
    scale, rot, trans = camera_similarity(tr, es)
    return Similarity(scale, rot, trans)


def map_target_cameras(true_context: Cameras, est_context: Cameras, true_targets: Cameras,
                       target_intrinsics: str = "estimated") -> Cameras:
    """The true target cameras carried into the reconstruction's frame (module docstring).

    true_context, est_context: the K context cameras in the dataset's and the reconstruction's frame, at the
    targets' image size. target_intrinsics: "estimated" (true intrinsics with fx, fy scaled by the ratio of the
    estimated to the true context focals) or "true". Returns Cameras of the targets' size.
    """
    if target_intrinsics not in ("estimated", "true"):
        raise InputError(f"target_intrinsics must be 'estimated' or 'true', got {target_intrinsics!r}")
    sizes = {(c.width, c.height) for c in (true_context, est_context, true_targets)}
    if len(sizes) != 1:
        raise InputError(f"context and target cameras must describe one image size, got {sorted(sizes)}")
    sim = context_similarity(true_context.cam_to_world, est_context.cam_to_world)
    c2w = sim.apply_c2w(true_targets.cam_to_world.double().cpu()).float().to(true_targets.device)
    K = true_targets.intrinsics.clone()
    if target_intrinsics == "estimated":
        ratio = float(est_context.focals.double().mean() / true_context.focals.double().mean())
        K[:, 0, 0] *= ratio
        K[:, 1, 1] *= ratio
    return Cameras(c2w, K, true_targets.width, true_targets.height)


# ------------------------------------------------------------------------------------- rendering and refinement

def render_views(gaussians: Gaussians, cameras: Cameras, backend: str = "auto") -> torch.Tensor:
    """(N, 3, H, W) renders clamped to [0, 1] (what a saved PNG holds), one camera at a time, no gradients."""
    from .gaussians import render

    out = []
    with torch.no_grad():
        for i in range(len(cameras)):
            out.append(render(gaussians, cameras[i], backend=backend).rgb.permute(0, 3, 1, 2).clamp(0, 1))
    return torch.cat(out)


def refine_target_poses(gaussians: Gaussians, cameras: Cameras, targets: torch.Tensor, steps: int = 100,
                        lr: float = 2e-3, weights: Sequence[float] = (0.8, 0.2), translation_scale: float = 1.0,
                        backend: str = "auto") -> Cameras:
    """Test-time refinement of target poses with the Gaussians frozen.

    cameras: the N target cameras in the Gaussians' frame (starting point); targets: (N, 3, H, W) in [0, 1].
    Each camera gets a correction c2w @ [exp(w) | translation_scale * v] (w, v in the camera's own frame),
    optimised by Adam (lr) for `steps` steps on weights[0] * L1 + weights[1] * (1 - SSIM) over all targets.
    translation_scale: world length of one unit of v (the context baseline keeps lr scale-free).
    Returns Cameras with the refined poses (intrinsics unchanged).
    """
    if steps <= 0:
        return cameras
    N = len(cameras)
    if targets.shape != (N, 3, cameras.height, cameras.width):
        raise InputError(f"targets must be ({N}, 3, {cameras.height}, {cameras.width}), got {tuple(targets.shape)}")
    with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode: work on ordinary copies
        frozen = Gaussians(*(t.detach().clone() for t in (gaussians.means, gaussians.quats, gaussians.log_scales,
                                                          gaussians.opacity_logits, gaussians.sh)))
        device = frozen.device
        cameras = Cameras(cameras.cam_to_world.detach().clone().to(device),
                          cameras.intrinsics.detach().clone().to(device), cameras.width, cameras.height)
        targets = targets.detach().clone().to(device)
        return _refine(frozen, cameras, targets, steps, lr, weights, translation_scale, backend)


def _refine(frozen, cameras, targets, steps, lr, weights, translation_scale, backend) -> Cameras:
    from .gaussians import refine_cameras, render, ssim_map

    N, device = len(cameras), frozen.device
    deltas = torch.zeros(N, 6, device=device, requires_grad=True)
    opt = torch.optim.Adam([deltas], lr=lr)
    scale = torch.tensor([1.0, 1.0, 1.0, translation_scale, translation_scale, translation_scale], device=device)
    w_l1, w_ssim = (float(w) for w in weights)
    with torch.enable_grad():
        for _ in range(int(steps)):
            loss = 0.0
            for i in range(N):
                cam = refine_cameras(cameras[i], deltas[i:i + 1] * scale)
                pred = render(frozen, cam, backend=backend).rgb.permute(0, 3, 1, 2)
                target = targets[i:i + 1]
                pix = w_l1 * (pred - target).abs().mean(1)
                if w_ssim > 0:
                    pix = pix + w_ssim * (1.0 - ssim_map(pred, target))
                loss = loss + pix.mean() / N
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return refine_cameras(cameras, deltas.detach() * scale)


# ------------------------------------------------------------------------------------------------ one scene

@dataclass
class EvalScene:
    """One benchmark scene at the protocol's size: true context and target views.

    context_images (K, 3, H, W) and target_images (M, 3, H, W) float in [0, 1]; context_cameras / target_cameras:
    their true Cameras (dataset frame, OpenCV c2w, pixel intrinsics at (W, H)); *_index: frame indices in the clip.
    """

    key: str
    context_images: torch.Tensor
    context_cameras: Cameras
    context_index: list
    target_images: torch.Tensor
    target_cameras: Cameras
    target_index: list


@dataclass
class ContextViews:
    """What a method is given: the context images (K, 3, H, W) in [0, 1], their frame indices and the scene key.
    No cameras: pose-free methods estimate them."""

    key: str
    images: torch.Tensor
    index: list


@dataclass
class Reconstruction:
    """A method's answer: Gaussians and the context cameras it estimated (K, at the context images' size), both
    in the method's own frame. info: anything worth keeping (timings, losses); JSON-serialisable values."""

    gaussians: Gaussians
    context_cameras: Cameras
    info: dict = field(default_factory=dict)


@dataclass
class SceneResult:
    """Per-target metrics ({"psnr": [...], ...}; "refined" the same after pose refinement, or None), the renders
    (M, 3, H, W) (and refined renders), the mapped target cameras, seconds spent and the method's info."""

    key: str
    target_index: list
    metrics: dict
    renders: torch.Tensor
    cameras: Cameras
    refined: Optional[dict] = None
    refined_renders: Optional[torch.Tensor] = None
    seconds: float = 0.0
    info: dict = field(default_factory=dict)


def load_eval_scene(dataset, key: str, entry, height: int = 256, width: int = 256) -> EvalScene:
    """Decode a scene's context and target frames (only those) and prepare them as MVSplat does
    (`rescale_and_crop` to height x width). dataset: a reconx_core.data reader; entry: its EvaluationEntry."""
    from .data import rescale_and_crop

    context, target = list(entry.context), list(entry.target)
    images, cams = dataset.views(key, context + target)
    frames, cams = rescale_and_crop(images, cams, height, width)
    K = len(context)
    return EvalScene(key, frames[:K], cams[slice(0, K)], context, frames[K:], cams[slice(K, None)], target)


def score_views(gaussians: Gaussians, cameras: Cameras, targets: torch.Tensor,
                lpips_model: Optional[LpipsMetric] = None, backend: str = "auto") -> tuple:
    """Render `cameras` and compare with `targets` (N, 3, H, W): (metrics {"psnr": [N floats], ...}, renders)."""
    renders = render_views(gaussians, cameras, backend)
    values = image_metrics(renders, targets.to(renders.device), lpips_model)
    return {k: [float(x) for x in v.cpu()] for k, v in values.items()}, renders


def evaluate_scene(scene: EvalScene, reconstruct: Callable[[ContextViews], Reconstruction],
                   lpips_model: Optional[LpipsMetric] = None, target_intrinsics: str = "estimated",
                   refine_steps: int = 0, refine_lr: float = 2e-3, backend: str = "auto",
                   device: Optional[torch.device] = None) -> SceneResult:
    """Reconstruct from the context views, carry the true target cameras into the reconstruction's frame,
    render and score them; optionally refine the target poses (Gaussians frozen) and score again.

    reconstruct(ContextViews) -> Reconstruction (see there). Renders and metrics at the scene's size.
    """
    t0 = time.perf_counter()
    device = device or scene.context_images.device
    rec = reconstruct(ContextViews(scene.key, scene.context_images.to(device), list(scene.context_index)))
    if not isinstance(rec, Reconstruction):
        raise InputError(f"the reconstruction function returned {type(rec).__name__}, not a Reconstruction")
    est = rec.context_cameras
    if len(est) != len(scene.context_cameras) or (est.width, est.height) != (scene.context_cameras.width,
                                                                           scene.context_cameras.height):
        raise InputError(f"the reconstruction gave {len(est)} context cameras of {est.width}x{est.height}; "
                         f"expected {len(scene.context_cameras)} of {scene.context_cameras.width}x"
                         f"{scene.context_cameras.height}")
    cams = map_target_cameras(scene.context_cameras, est.to("cpu"), scene.target_cameras, target_intrinsics)
    cams = cams.to(rec.gaussians.device)
    metrics, renders = score_views(rec.gaussians, cams, scene.target_images, lpips_model, backend)
    result = SceneResult(scene.key, list(scene.target_index), metrics, renders.cpu(), cams.to("cpu"),
                         info=dict(rec.info))
    if refine_steps > 0:
        centres = est.cam_to_world[:, :3, 3]
        baseline = float((centres[0] - centres[1]).norm()) if len(est) > 1 else 1.0
        refined = refine_target_poses(rec.gaussians, cams, scene.target_images.to(rec.gaussians.device),
                                      steps=refine_steps, lr=refine_lr, translation_scale=baseline, backend=backend)
        result.refined, refined_renders = score_views(rec.gaussians, refined, scene.target_images, lpips_model,
                                                      backend)
        result.refined_renders = refined_renders.cpu()
    result.seconds = time.perf_counter() - t0
    return result


def score_heldout_views(gaussians: Gaussians, context_cameras: Cameras, aligned_cameras: Cameras,
                        context_index: Sequence[int], heldout_index: Sequence[int], heldout_images: torch.Tensor,
                        lpips_model: Optional[LpipsMetric] = None, target_intrinsics: str = "estimated",
                        refine_steps: int = 0, refine_lr: float = 2e-3, backend: str = "auto") -> SceneResult:
    """How good a reconstruction is on photos held back from it (the ComfyUI evaluation node's entry point).

    Without ground-truth cameras, the held-back photos get theirs from a second alignment of all the photos
    (context and held back) together: `aligned_cameras`, in that alignment's own frame. The same similarity as
    in the benchmark carries them into the reconstruction's frame, using the context photos seen in both.

    gaussians: the reconstruction (its frame).  context_cameras: the K >= 2 context cameras of the
    reconstruction (its frame).  aligned_cameras: cameras of all photos from the joint alignment, the same image
    size; context_index (K,) and heldout_index (M,) pick the context and held-back photos in it.
    heldout_images: (M, 3, H, W) in [0, 1] at that size.  Other arguments as `evaluate_scene`.
    Returns a SceneResult (key "heldout") with per-photo metrics and renders (and refined ones).
    """
    context_index, heldout_index = [int(i) for i in context_index], [int(i) for i in heldout_index]
    if len(context_index) != len(context_cameras):
        raise InputError(f"{len(context_index)} context indices for {len(context_cameras)} context cameras")
    if len(heldout_index) != heldout_images.shape[0]:
        raise InputError(f"{len(heldout_index)} held-back indices for {heldout_images.shape[0]} held-back photos")
    t0 = time.perf_counter()
    pick = lambda idx: Cameras(aligned_cameras.cam_to_world[idx], aligned_cameras.intrinsics[idx],  # noqa: E731
                               aligned_cameras.width, aligned_cameras.height)
    cams = map_target_cameras(pick(context_index).to("cpu"), context_cameras.to("cpu"),
                              pick(heldout_index).to("cpu"), target_intrinsics).to(gaussians.device)
    metrics, renders = score_views(gaussians, cams, heldout_images, lpips_model, backend)
    result = SceneResult("heldout", heldout_index, metrics, renders.cpu(), cams.to("cpu"))
    if refine_steps > 0:
        centres = context_cameras.cam_to_world[:, :3, 3]
        baseline = float((centres - centres.mean(0)).norm(dim=-1).max()) * 2
        refined = refine_target_poses(gaussians, cams, heldout_images.to(gaussians.device), steps=refine_steps,
                                      lr=refine_lr, translation_scale=baseline, backend=backend)
        result.refined, refined_renders = score_views(gaussians, refined, heldout_images, lpips_model, backend)
        result.refined_renders = refined_renders.cpu()
    result.seconds = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------------------------- pictures

def comparison_sheet(truths: torch.Tensor, result: SceneResult, top_row: Optional[torch.Tensor] = None,
                     gap: int = 4) -> torch.Tensor:
    """A (3, H', W') sheet in [0, 1]: one row per target with the truth (M, 3, H, W), our render (and the render
    after pose refinement) and the absolute error x4; `top_row` (K, 3, H, W) images above them, if given."""
    H, W = truths.shape[-2:]
    cols = 4 if result.refined_renders is not None else 3
    first = 0 if top_row is None else 1
    rows = first + len(result.target_index)
    sheet = torch.ones(3, rows * H + (rows - 1) * gap, cols * W + (cols - 1) * gap)

    def put(r, c, image):
        sheet[:, r * (H + gap):r * (H + gap) + H, c * (W + gap):c * (W + gap) + W] = image.clamp(0, 1)

    if top_row is not None:
        for c, image in enumerate(top_row.cpu()[:cols]):
            put(0, c, image)
    for r in range(len(result.target_index)):
        gt, ours = truths[r].cpu(), result.renders[r].cpu()
        put(first + r, 0, gt)
        put(first + r, 1, ours)
        last = ours
        if result.refined_renders is not None:
            last = result.refined_renders[r].cpu()
            put(first + r, 2, last)
        put(first + r, cols - 1, ((last - gt).abs() * 4).mean(0, keepdim=True).expand(3, -1, -1))
    return sheet


def side_by_side(scene: EvalScene, result: SceneResult, gap: int = 4) -> torch.Tensor:
    """A (3, H', W') sheet in [0, 1]: first row the context views; then one row per target with the ground
    truth, our render (and the render after pose refinement) and the absolute error x4."""
    return comparison_sheet(scene.target_images, result, top_row=scene.context_images, gap=gap)


def save_png(image: torch.Tensor, path: Path) -> None:
    """(3, H, W) in [0, 1] -> an 8-bit PNG, written to a temporary name then renamed (never half a file)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- results on disk

def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON to a temporary file in the same folder, flush it to disk, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def scene_record(result: SceneResult) -> dict:
    """The JSON record of one finished scene (scripts/evaluate.py writes it last, as the scene's done-marker)."""
    return {"scene": result.key, "target": list(result.target_index), "metrics": result.metrics,
            "refined": result.refined, "seconds": result.seconds, "info": result.info}


def failure_record(key: str, error: str, seconds: float) -> dict:
    return {"scene": key, "error": error, "seconds": seconds}


def metric_rows(records: Sequence[dict]) -> list:
    """One row per (scene, target): {"scene", "target", "psnr", "ssim", "lpips"[, "psnr_refined", ...]}."""
    rows = []
    for rec in records:
        if "error" in rec:
            continue
        for n, target in enumerate(rec["target"]):
            row = {"scene": rec["scene"], "target": target}
            row.update({m: rec["metrics"][m][n] for m in METRICS if m in rec["metrics"]})
            if rec.get("refined"):
                row.update({f"{m}_refined": rec["refined"][m][n] for m in METRICS if m in rec["refined"]})
            rows.append(row)
    return rows


def write_metrics_csv(path: Path, rows: Sequence[dict]) -> None:
    columns = ["scene", "target"]
    for row in rows:
        columns += [c for c in row if c not in columns]
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def summarize(records: Sequence[dict]) -> dict:
    """Means over scenes of each scene's mean over its targets (MVSplat averages per scene first; with three
    targets per scene this equals the mean over all images), plus counts and the mean seconds per scene."""
    done = [r for r in records if "error" not in r]
    means: dict = {}
    for group in ("metrics", "refined"):
        for m in METRICS:
            per_scene = [float(np.mean(r[group][m])) for r in done if r.get(group) and m in r[group]]
            if per_scene:
                means[m if group == "metrics" else f"{m}_refined"] = float(np.mean(per_scene))
    return {"means": means, "scenes": len(done), "images": sum(len(r["target"]) for r in done),
            "failed": [{"scene": r["scene"], "error": r["error"]} for r in records if "error" in r],
            "seconds_per_scene": float(np.mean([r["seconds"] for r in done])) if done else None}


def format_summary(summary: dict) -> str:
    """A small table of the means, for the terminal."""
    means = summary["means"]
    lines = [f"{'metric':<16}{'mean':>10}"] + [f"{k:<16}{v:>10.4f}" for k, v in means.items()]
    lines.append(f"{summary['scenes']} scenes, {summary['images']} target images, {len(summary['failed'])} failed"
                 + (f", {summary['seconds_per_scene']:.1f} s per scene" if summary["seconds_per_scene"] else ""))
    return "\n".join(lines)
