#!/usr/bin/env python3
"""`make demo`: reconstruct the real Middlebury 2014 "Motorcycle" stereo pair that scikit-image ships.

Runs reconx_core headless: DUSt3R pair inference -> global alignment, then writes to out/:
  motorcycle_points.ply   the aligned, confidence-filtered point cloud (opens in any PLY viewer / ComfyUI)
  motorcycle_cameras.json poses (camera-to-world, OpenCV), intrinsics, image size, alignment loss
  motorcycle_depth.png    the two depth maps side by side
and prints how far the result is from the pair's ground truth (calibrated disparity -> metric depth).

Weights: --weights PATH, else models/dust3r/DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth (downloaded there when
missing and the network allows; otherwise the script stops and says what to download where).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from reconx_core.errors import ReconXError  # noqa: E402

DUST3R_FILE = "DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth"
DUST3R_URL = f"https://download.europe.naverlabs.com/ComputerVision/DUSt3R/{DUST3R_FILE}"
# Middlebury 2014 Motorcycle, downsampled x4 as scikit-image ships it (see ../shared/ENV.md).
FOCAL_PX, BASELINE_MM, DISPARITY_OFFSET = 994.978, 193.001, 31.086

log = logging.getLogger("reconx.demo")


def find_weights(path: str | None) -> Path:
    """The DUSt3R checkpoint: the given path, the models folder, or a download into it (never half-written)."""
    if path:
        weights = Path(path)
        if not weights.is_file():
            raise SystemExit(f"error: --weights {weights} does not exist")
        return weights
    folder = REPO / "models" / "dust3r"
    weights = folder / DUST3R_FILE
    if weights.is_file():
        return weights
    folder.mkdir(parents=True, exist_ok=True)
    partial = weights.with_suffix(".part")
    try:
        log.info("downloading %s (2.1 GB) ...", DUST3R_URL)
        with urllib.request.urlopen(DUST3R_URL, timeout=15) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 22)
        partial.rename(weights)
        return weights
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise SystemExit(
            f"error: the DUSt3R weights are missing and could not be downloaded ({error}).\n"
            f"  file:     {DUST3R_FILE}\n"
            f"  folder:   {folder}\n"
            f"  download: {DUST3R_URL}\n"
            f"  (licence CC BY-NC-SA 4.0; or pass another checkpoint with make demo ARGS=\"--weights PATH\")")


def ground_truth_depth(disparity: np.ndarray) -> np.ndarray:
    """Metric depth (mm) of the left view from the calibrated disparity; NaN where it is unknown."""
    depth = FOCAL_PX * BASELINE_MM / (disparity + DISPARITY_OFFSET)
    depth[~np.isfinite(disparity) | (disparity <= 0)] = np.nan
    return depth


def crop_like_dust3r(array: torch.Tensor, size: int) -> tuple[torch.Tensor, float]:
    """Resize (nearest) and centre-crop a (H, W) map the way DUSt3R's preprocessing treats the image.

    Returns the map and the resize factor (new pixels per original pixel).
    """
    H, W = array.shape
    scale = size / max(H, W)
    h, w = round(H * scale), round(W * scale)
    resized = torch.nn.functional.interpolate(array[None, None], size=(h, w), mode="nearest")[0, 0]
    cx, cy = w // 2, h // 2
    half_w, half_h = ((2 * cx) // 16) * 8, ((2 * cy) // 16) * 8
    return resized[cy - half_h:cy + half_h, cx - half_w:cx + half_w], scale


def evaluate(scene, gt_depth_mm: torch.Tensor, resize: float) -> dict:
    """Compare view 0 with the ground truth after the one unknown global scale (median ratio)."""
    pred = scene.depths[0].float().cpu()
    valid = torch.isfinite(gt_depth_mm) & (scene.conf[0].cpu() > 3)
    scale = torch.median(gt_depth_mm[valid] / pred[valid])
    abs_rel = ((pred[valid] * scale - gt_depth_mm[valid]).abs() / gt_depth_mm[valid]).mean()
    focal_gt = FOCAL_PX * resize
    focal = float(scene.cameras.focals[0])
    # The pair is rectified: the right camera sits along +x of the left one, with the same orientation.
    rel = torch.linalg.inv(scene.cameras.cam_to_world[0]) @ scene.cameras.cam_to_world[1]
    rel = rel.double().cpu()
    angle = torch.rad2deg(torch.arccos(((torch.trace(rel[:3, :3]) - 1) / 2).clamp(-1, 1)))
    direction = rel[:3, 3] / rel[:3, 3].norm()
    baseline_mm = float(rel[:3, 3].norm() * scale)
    return {"depth_abs_rel": float(abs_rel), "valid_pixels": int(valid.sum()),
            "focal_px": focal, "focal_gt_px": focal_gt, "focal_rel_err": abs(focal - focal_gt) / focal_gt,
            "relative_rotation_deg": float(angle), "baseline_direction": direction.tolist(),
            "baseline_angle_to_x_deg": float(torch.rad2deg(torch.arccos(direction[0].abs().clamp(max=1)))),
            "baseline_mm": baseline_mm, "baseline_gt_mm": BASELINE_MM}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="a DUSt3R checkpoint (.pth or .safetensors)")
    parser.add_argument("--out", default=str(REPO / "out"), help="output folder (default: out/)")
    parser.add_argument("--iterations", type=int, default=300, help="global-alignment steps (default 300)")
    parser.add_argument("--min-confidence", type=float, default=3.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from skimage.data import stereo_motorcycle

    from reconx_core.align import align_views
    from reconx_core.dust3r import infer_pairs, load_dust3r, prepare_images
    from reconx_core.export import point_cloud_ply_bytes
    from reconx_core.preview import depth_preview

    weights = find_weights(args.weights)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    left, right, disparity = stereo_motorcycle()
    photos = torch.from_numpy(np.stack([left, right])).permute(0, 3, 1, 2).float() / 255.0

    t0 = time.perf_counter()
    model = load_dust3r(str(weights), device=device).eval()
    views = prepare_images(photos, size=getattr(model, "image_size", 512)).to(device)
    log.info("loaded %s in %.1f s; views %s", weights.name, time.perf_counter() - t0, tuple(views.shape))
    t1 = time.perf_counter()
    with torch.inference_mode():
        pairs = infer_pairs(model, views, graph="complete", batch_size=2)
    t2 = time.perf_counter()
    scene = align_views(pairs, niter=args.iterations, min_conf_thr=args.min_confidence)
    t3 = time.perf_counter()
    log.info("pair inference %.1f s, global alignment %.1f s (loss %.5f)", t2 - t1, t3 - t2, scene.info["loss"])

    valid = scene.conf > args.min_confidence
    colours = scene.images.permute(0, 2, 3, 1)
    (out / "motorcycle_points.ply").write_bytes(point_cloud_ply_bytes(scene.pts3d[valid], colours[valid]))
    gt_depth, resize = crop_like_dust3r(torch.from_numpy(ground_truth_depth(disparity.copy())), views.shape[-1])
    metrics = evaluate(scene, gt_depth, resize)
    cameras = {"width": scene.cameras.width, "height": scene.cameras.height,
               "cam_to_world": scene.cameras.cam_to_world.tolist(), "intrinsics": scene.cameras.intrinsics.tolist(),
               "alignment_loss": float(scene.info["loss"]), "ground_truth_comparison": metrics}
    (out / "motorcycle_cameras.json").write_text(json.dumps(cameras, indent=1))
    from PIL import Image

    strip = torch.cat(list(depth_preview(scene.depths, valid).cpu()), dim=1)
    Image.fromarray((strip.numpy() * 255).astype(np.uint8)).save(out / "motorcycle_depth.png")
    log.info("wrote %s: %d points", out / "motorcycle_points.ply", int(valid.sum()))
    log.info("vs ground truth: depth abs-rel %.3f, focal %.1f px (truth %.1f), relative rotation %.2f deg, "
             "baseline %.0f mm (truth %.0f) at %.1f deg from the x axis",
             metrics["depth_abs_rel"], metrics["focal_px"], metrics["focal_gt_px"], metrics["relative_rotation_deg"],
             metrics["baseline_mm"], BASELINE_MM, metrics["baseline_angle_to_x_deg"])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ReconXError as error:
        sys.exit(f"error: {error}")
