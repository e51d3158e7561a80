#!/usr/bin/env python3
"""`make demo`: the ReconX pipeline, headless, on the real Middlebury 2014 "Motorcycle" stereo pair that
scikit-image ships.

  photos -> DUSt3R global alignment -> (structure tokens) -> DynamiCrafter interpolation -> confidence mapping
         -> confidence-aware 3DGS -> fly-through

Writes to out/ (or --out):
  motorcycle_points.ply      the aligned, confidence-filtered point cloud of stage 1
  motorcycle_cameras.json    poses (camera-to-world, OpenCV), intrinsics, alignment loss, ground-truth comparison
  motorcycle_depth.png       the two depth maps side by side
  motorcycle_frames.webp     the interpolated frames (and motorcycle_frames.png, a contact sheet)
  motorcycle_confidence.png  the per-frame confidence maps
  motorcycle_gaussians.ply   the Gaussians (INRIA 3DGS layout)
  motorcycle_flythrough.webp a fly-through rendered from the Gaussians
and prints how far stage 1 is from the pair's ground truth (calibrated disparity -> metric depth).

Weights: models/dust3r/DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth (--weights PATH) and either
models/reconx/dynamicrafter_512_interp.ckpt or ComfyUI's dynamicrafter_512_interp_fp16_pruned.safetensors with a
CLIP ViT-H file (--video-weights PATH, --clip-vision PATH). Missing files are downloaded only when asked (a yes on
the terminal, or --download), by the same verified download code as the loader nodes; otherwise the script stops
and says which file to put where, where to download it and its licence. --stage1-only stops after the alignment
(needs only DUSt3R).

`make demo ARGS=--tiny` runs every stage with tiny random-weight models: a SMOKE RUN that exercises the whole path
where no weights exist. Its outputs are noise, not a reconstruction, and are written with a "tiny_" prefix.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from reconx_core.downloads import ensure_file, human_size, known_file, manual_steps  # noqa: E402
from reconx_core.errors import ReconXError  # noqa: E402

DUST3R_FILE = "DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth"
VIDEO_FILE = "dynamicrafter_512_interp.ckpt"
PRUNED_FILE = "dynamicrafter_512_interp_fp16_pruned.safetensors"
CLIP_VISION_FILE = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
OPENCLIP_FILE = "open_clip_ViT-H-14-laion2B-s32B-b79K.safetensors"
# Middlebury 2014 Motorcycle, downsampled x4 as scikit-image ships it (see ../shared/ENV.md).
FOCAL_PX, BASELINE_MM, DISPARITY_OFFSET = 994.978, 193.001, 31.086

log = logging.getLogger("reconx.demo")


def _may_download(args_download: bool, what: str) -> bool:
    """Downloads ask first: --download says yes; on a terminal the user is asked; otherwise no."""
    if args_download:
        return True
    if not sys.stdin.isatty() or os.environ.get("RECONX_NO_DOWNLOAD") == "1":
        return False
    answer = input(f"{what}\nDownload now? [y/N] ").strip().lower()
    return answer in ("y", "yes")


def _bytes_progress(name: str):
    state = {"last": -1}

    def progress(done: int, total: int) -> None:
        percent = int(100 * done / max(total, 1))
        if percent // 5 != state["last"] // 5:
            state["last"] = percent
            log.info("  %s: %d%% of %s", name, percent, human_size(total))

    return progress


def find_weights(path: str | None, models_dir: Path, allow_download: bool = False) -> Path:
    """The DUSt3R checkpoint: the given path, the models folder, or (asked first) a verified download into it.

    The download is reconx_core.downloads' (the loader nodes' too): never half-written, RECONX_NO_DOWNLOAD=1 off.
    """
    if path:
        weights = Path(path)
        if not weights.is_file():
            raise SystemExit(f"error: --weights {weights} does not exist")
        return weights
    known = known_file(DUST3R_FILE)
    folder = models_dir / "dust3r"
    for candidate in (folder / DUST3R_FILE, *folder.glob(f"*/{DUST3R_FILE}")):
        if candidate.is_file():
            return candidate
    header = "error: the DUSt3R weights are missing"
    if not _may_download(allow_download, f"{DUST3R_FILE} ({human_size(known.approx_bytes)}, {known.licence}) is "
                                         f"missing from {folder}."):
        raise SystemExit(f"{header}. Put it in place by hand, or run make demo ARGS=--download:\n"
                         f"{manual_steps(known, folder)}\n"
                         "  (or pass another checkpoint with make demo ARGS=\"--weights PATH\")")
    try:
        return ensure_file(known, [folder], _bytes_progress(DUST3R_FILE))
    except ReconXError as error:
        raise SystemExit(f"{header} and could not be downloaded: {error}") from None


def find_video_weights(path: str | None, models_dir: Path, allow_download: bool = False,
                       clip_vision: str | None = None) -> tuple[Path, Path | None]:
    """(DynamiCrafter-512-interp checkpoint, CLIP image-encoder file or None).

    The given path; else models/reconx/dynamicrafter_512_interp.ckpt (the original, with its CLIP towers); else
    ComfyUI's fp16 pruned file (models/reconx or models/checkpoints/dynamicrafter) with a CLIP ViT-H file from
    models/clip_vision or models/text_encoders; else, asked first, downloads of the pruned file and laion's OpenCLIP
    ViT-H-14 (both towers, so text prompts work too): 7 GB instead of the original's 10.4 GB.
    """
    if path:
        weights = Path(path)
        if not weights.is_file():
            raise SystemExit(f"error: --video-weights {weights} does not exist")
        return weights, Path(clip_vision) if clip_vision else None
    full = models_dir / "reconx" / VIDEO_FILE
    if full.is_file():
        return full, Path(clip_vision) if clip_vision else None
    pruned_known, vision_known = known_file(PRUNED_FILE), known_file(OPENCLIP_FILE)
    pruned = _first_file([models_dir / "reconx", models_dir / "checkpoints" / "dynamicrafter"], PRUNED_FILE)
    vision = Path(clip_vision) if clip_vision else _first_file(
        [models_dir / "clip_vision", models_dir / "text_encoders"], CLIP_VISION_FILE, OPENCLIP_FILE)
    if pruned is not None and vision is not None:
        return pruned, vision
    wanted = [k for k, have in ((pruned_known, pruned), (vision_known, vision)) if have is None]
    total = sum(k.size or k.approx_bytes for k in wanted)
    ask = (f"The video model is missing: {', '.join(k.name for k in wanted)} ({human_size(total)}; "
           f"{', '.join(sorted({k.licence for k in wanted}))}).")
    if _may_download(allow_download, ask):
        folders = {PRUNED_FILE: models_dir / "reconx", OPENCLIP_FILE: models_dir / "text_encoders"}
        try:
            got = {k.name: ensure_file(k, [folders[k.name]], _bytes_progress(k.name)) for k in wanted}
        except ReconXError as error:
            raise SystemExit(f"error: the video model could not be downloaded: {error}") from None
        return pruned or got[PRUNED_FILE], vision or got[OPENCLIP_FILE]
    full_known = known_file(VIDEO_FILE)
    raise SystemExit(
        "error: the DynamiCrafter 512 interpolation weights are missing. Either the original checkpoint "
        "(the repository's model.ckpt, renamed):\n"
        f"{manual_steps(full_known, models_dir / 'reconx')}\n"
        "or ComfyUI's fp16 pruned file with a CLIP ViT-H encoder (make demo ARGS=--download fetches these):\n"
        f"{manual_steps(pruned_known, models_dir / 'reconx')}\n"
        f"{manual_steps(vision_known, models_dir / 'text_encoders')}\n"
        f"  (or {CLIP_VISION_FILE} in {models_dir / 'clip_vision'}, which has no text tower: empty prompts only)\n"
        "  (or run make demo ARGS=--stage1-only for the DUSt3R stage alone, or ARGS=--tiny for a smoke run)")


def _first_file(folders: list[Path], *names: str) -> Path | None:
    for name in names:
        for folder in folders:
            for candidate in (folder / name, *folder.glob(f"*/{name}")):
                if candidate.is_file():
                    return candidate
    return None


def ground_truth_depth(disparity: np.ndarray) -> np.ndarray:
    """Metric depth (mm) of the left view from the calibrated disparity; NaN where it is unknown."""
    depth = FOCAL_PX * BASELINE_MM / (disparity + DISPARITY_OFFSET)
    depth[~np.isfinite(disparity) | (disparity <= 0)] = np.nan
    return depth


def crop_like_dust3r(array: torch.Tensor, width: int, height: int) -> tuple[torch.Tensor, float]:
    """Resize (nearest) and centre-crop a (H, W) map to the network's (height, width) view of the image, the way
    DUSt3R's preprocessing treats the photo (long side 512, or short side 224, then a centre crop).

    Returns the map and the resize factor (new pixels per original pixel).
    """
    H, W = array.shape
    scale = width / max(H, W) if max(width, height) > 224 else 224 / min(H, W)
    h, w = round(H * scale), round(W * scale)
    resized = torch.nn.functional.interpolate(array[None, None], size=(h, w), mode="nearest")[0, 0]
    y0, x0 = (h - height) // 2, (w - width) // 2
    return resized[y0:y0 + height, x0:x0 + width], scale


def evaluate(scene, gt_depth_mm: torch.Tensor, resize: float) -> dict:
    """Compare view 0 with the ground truth after the one unknown global scale (median ratio)."""
    pred = scene.depths[0].float().cpu()
    valid = torch.isfinite(gt_depth_mm) & scene.confident_mask()[0].cpu()
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


def save_webp(frames: torch.Tensor, path: Path, fps: float) -> None:
    """(S, 3, H, W) in [0, 1] -> an animated WEBP."""
    from PIL import Image

    images = [Image.fromarray((f.permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0, lossless=False)


def save_sheet(images: torch.Tensor, path: Path, columns: int = 8) -> None:
    """(S, 3, H, W) or (S, H, W) in [0, 1] -> one PNG grid."""
    from PIL import Image

    if images.ndim == 3:
        images = images[:, None].expand(-1, 3, -1, -1)
    S, _, H, W = images.shape
    rows = (S + columns - 1) // columns
    sheet = torch.zeros(3, rows * H, min(S, columns) * W)
    for i, image in enumerate(images.cpu()):
        r, c = divmod(i, columns)
        sheet[:, r * H:(r + 1) * H, c * W:(c + 1) * W] = image
    Image.fromarray((sheet.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)).save(path)


def run_stage1(dust3r, photos: torch.Tensor, disparity, out: Path, prefix: str, args):
    """DUSt3R pair inference + global alignment; writes the point cloud, cameras and depth maps."""
    from PIL import Image

    from reconx_core.align import align_views, clean_scene
    from reconx_core.dust3r import infer_pairs, prepare_images
    from reconx_core.export import point_cloud_ply_bytes
    from reconx_core.preview import depth_preview

    views = prepare_images(photos, size=dust3r.image_size).to(args.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        pairs = infer_pairs(dust3r, views, graph="complete", batch_size=2)
    t1 = time.perf_counter()
    min_conf = args.min_confidence if not args.tiny else 1.0  # random weights: confidences barely above 1
    scene = clean_scene(align_views(pairs, niter=args.iterations, min_conf_thr=min_conf))
    t2 = time.perf_counter()
    log.info("stage 1: pair inference %.1f s, global alignment %.1f s (%s)", t1 - t0, t2 - t1,
             "pair viewer, no loss" if scene.info.get("mode") == "pairviewer" else f"loss {scene.info['loss']:.5f}")
    valid = scene.confident_mask()
    (out / f"{prefix}points.ply").write_bytes(point_cloud_ply_bytes(*scene.confident_points()))
    gt_depth, resize = crop_like_dust3r(torch.from_numpy(ground_truth_depth(disparity.copy())), views.shape[-1],
                                        views.shape[-2])
    metrics = evaluate(scene, gt_depth, resize)
    cameras = {"width": scene.cameras.width, "height": scene.cameras.height,
               "cam_to_world": scene.cameras.cam_to_world.tolist(), "intrinsics": scene.cameras.intrinsics.tolist(),
               "alignment_loss": float(scene.info.get("loss", float("nan"))), "ground_truth_comparison": metrics,
               "smoke_run_with_random_weights": bool(args.tiny)}
    (out / f"{prefix}cameras.json").write_text(json.dumps(cameras, indent=1))
    strip = torch.cat(list(depth_preview(scene.depths, valid).cpu()), dim=1)
    Image.fromarray((strip.numpy() * 255).astype(np.uint8)).save(out / f"{prefix}depth.png")
    log.info("vs ground truth: depth abs-rel %.3f, focal %.1f px (truth %.1f), relative rotation %.2f deg, "
             "baseline %.0f mm (truth %.0f) at %.1f deg from the x axis",
             metrics["depth_abs_rel"], metrics["focal_px"], metrics["focal_gt_px"], metrics["relative_rotation_deg"],
             metrics["baseline_mm"], BASELINE_MM, metrics["baseline_angle_to_x_deg"])
    return scene


def run_stages2to5(dust3r, video, scene, out: Path, prefix: str, args) -> None:
    """Structure tokens -> interpolation -> confidence mapping -> 3DGS -> fly-through."""
    from reconx_core.camera_path import interpolate_cameras
    from reconx_core.confidence import map_confidence
    from reconx_core.gaussians import FitConfig, fit_to_views, render, save_ply
    from reconx_core.structure import encode_scene
    from reconx_core.video import interpolate_views

    structure = None
    if video.structure_encoder is not None:
        structure = encode_scene(video.structure_encoder, scene, max_points=args.structure_points)
    t0 = time.perf_counter()
    views = interpolate_views(video, scene, structure=structure, steps=args.video_steps, frames=args.frames, seed=0)
    frames = views.frames
    t1 = time.perf_counter()
    save_webp(frames, out / f"{prefix}frames.webp", fps=8)
    save_sheet(frames, out / f"{prefix}frames.png")
    views = map_confidence(dust3r, views, niter=args.iterations)
    t2 = time.perf_counter()
    save_sheet(views.conf, out / f"{prefix}confidence.png")
    config = FitConfig(steps=args.fit_steps, weights=(0.8, 0.2, args.lpips_weight), max_points=args.max_points,
                       lpips_dirs=[str(Path(args.models_dir) / "reconx")])
    gaussians = fit_to_views(views, config).gaussians
    t3 = time.perf_counter()
    save_ply(gaussians, out / f"{prefix}gaussians.ply")
    path = interpolate_cameras(views.cameras, args.flythrough_frames)
    with torch.no_grad():
        rendered = torch.cat([render(gaussians, path[i]).rgb for i in range(len(path))]).permute(0, 3, 1, 2)
    save_webp(rendered, out / f"{prefix}flythrough.webp", fps=12)
    log.info("stages 2-5: interpolation %.1f s (%d frames), confidence mapping %.1f s (mean %.2f), "
             "3DGS fit %.1f s (%d Gaussians, %d steps)", t1 - t0, len(frames), t2 - t1, float(views.conf.mean()),
             t3 - t2, len(gaussians), args.fit_steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="a DUSt3R checkpoint (.pth or .safetensors)")
    parser.add_argument("--video-weights", help="DynamiCrafter 512 interp (model.ckpt or .safetensors)")
    parser.add_argument("--clip-vision", help="CLIP ViT-H image encoder for a pruned --video-weights file")
    parser.add_argument("--download", action="store_true",
                        help="download missing weights without asking (they are checked and renamed into place)")
    parser.add_argument("--structure-weights", help="optional ReconX structure-branch .safetensors")
    parser.add_argument("--tiny", action="store_true", help="smoke run with tiny random-weight models")
    parser.add_argument("--stage1-only", action="store_true", help="stop after the DUSt3R global alignment")
    parser.add_argument("--out", default=str(REPO / "out"), help="output folder (default: out/)")
    parser.add_argument("--models-dir", default=str(REPO / "models"),
                        help="folder holding dust3r/ and reconx/ (default: models/)")
    parser.add_argument("--iterations", type=int, default=300, help="global-alignment steps (default 300)")
    parser.add_argument("--min-confidence", type=float, default=3.0)
    parser.add_argument("--frames", type=int, default=16, help="frames per interpolated segment")
    parser.add_argument("--video-steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--fit-steps", type=int, default=1000, help="3DGS steps")
    parser.add_argument("--lpips-weight", type=float, default=0.5)
    parser.add_argument("--max-points", type=int, default=300_000)
    parser.add_argument("--structure-points", type=int, default=65536)
    parser.add_argument("--flythrough-frames", type=int, default=48)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from skimage.data import stereo_motorcycle

    from reconx_core.dust3r import load_dust3r
    from reconx_core.video import load_video_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    left, right, disparity = stereo_motorcycle()
    photos = torch.from_numpy(np.stack([left, right])).permute(0, 3, 1, 2).float() / 255.0
    device = torch.device(args.device)
    if args.tiny:
        import tempfile

        from reconx_core.testing import write_tiny_models

        log.info("SMOKE RUN with tiny random-weight models: the outputs are noise, not a reconstruction")
        args.iterations, args.frames, args.video_steps = min(args.iterations, 50), 4, min(args.video_steps, 3)
        args.fit_steps, args.lpips_weight, args.flythrough_frames = min(args.fit_steps, 30), 0.0, 8
        args.max_points = min(args.max_points, 5000)
        paths = write_tiny_models(tempfile.mkdtemp(prefix="reconx-tiny-"))
        dust3r_path, video_path, branch = paths["dust3r"], paths["video"], paths["structure_branch"]
        clip_vision, prefix = None, "tiny_motorcycle_"
    else:
        dust3r_path = find_weights(args.weights, Path(args.models_dir), args.download)
        video_path, clip_vision = (None, None) if args.stage1_only else find_video_weights(
            args.video_weights, Path(args.models_dir), args.download, args.clip_vision)
        branch = args.structure_weights
        prefix = "motorcycle_"

    t0 = time.perf_counter()
    dust3r = load_dust3r(str(dust3r_path), device=device).eval()
    log.info("loaded %s in %.1f s", Path(dust3r_path).name, time.perf_counter() - t0)
    scene = run_stage1(dust3r, photos, disparity, out, prefix, args)
    if not args.stage1_only:
        dtype = torch.bfloat16 if device.type == "cuda" else None
        from reconx_core.video.comfy_layouts import EMPTY_PROMPT_FILE

        cache = None if args.tiny else Path(args.models_dir) / "reconx" / EMPTY_PROMPT_FILE
        video = load_video_model(video_path, device=device, dtype=dtype, structure_path=branch,
                                 offload=device.type == "cuda", clip_vision=clip_vision, empty_prompt_cache=cache)
        run_stages2to5(dust3r, video, scene, out, prefix, args)
    log.info("outputs in %s: %s", out, ", ".join(sorted(p.name for p in out.glob(prefix + "*"))))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ReconXError as error:
        sys.exit(f"error: {error}")
