#!/usr/bin/env python3
"""Novel-view benchmark of the pack's modes, run the way MVSplat / pixelSplat / ReconX run theirs.

    python scripts/evaluate.py --data-root datasets/re10k --index assets/evaluation_index_re10k.json \
        --mode geometry --output results/re10k_geometry
    accelerate launch --multi_gpu --num_processes 8 scripts/evaluate.py ...   # one GPU per process

Per scene of the index (two context frames, three targets): the frames are decoded, resized and centre-cropped
to 256 x 256 as MVSplat does; the mode reconstructs Gaussians from the two context images alone; the targets'
true cameras are carried into the reconstruction's frame by the similarity between the true and the estimated
context cameras (reconx_core.evaluation); the targets are rendered and scored (PSNR, SSIM, LPIPS-VGG as the
papers compute them). --refine-steps N adds test-time target-pose refinement (Gaussians frozen), reported in
separate *_refined columns.

Writes OUTPUT/metrics.csv (scene, target, psnr, ssim, lpips[, *_refined]), OUTPUT/summary.json (means and the
run's settings), OUTPUT/renders/<scene>/<target>.png, OUTPUT/renders/<scene>/side_by_side.png, and one
OUTPUT/scenes/<scene>.json per finished scene (written last, atomically: --resume skips those scenes).

Modes: geometry (DUSt3R on the two views -> global alignment -> 3DGS on the two views), reconx (geometry, then
DynamiCrafter interpolation, confidence mapping, and the confidence-aware 3DGS on all frames), render-guided (as
reconx, DynamiCrafter pulled towards point-cloud renders by x0 fusion; --guidance), viewcrafter (as reconx, with
ViewCrafter_25_512 conditioned on the renders; --viewcrafter-weights).

--tiny: every stage with tiny random-weight models and (without --data-root) synthetic ray-cast scenes, at
64 x 64, LPIPS on a random backbone: a SMOKE RUN of the code path whose numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from reconx_core.errors import InputError, ReconXError  # noqa: E402
from reconx_core.evaluation import Reconstruction  # noqa: E402

log = logging.getLogger("reconx.evaluate")

DUST3R_FILE = "DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth"
DUST3R_URL = f"https://download.europe.naverlabs.com/ComputerVision/DUSt3R/{DUST3R_FILE}"
VIDEO_FILE = "dynamicrafter_512_interp.ckpt"
VIDEO_URL = "https://huggingface.co/Doubiiu/DynamiCrafter_512_Interp/resolve/main/model.ckpt"
VIEWCRAFTER_FILE = "viewcrafter_25_512.ckpt"
VIEWCRAFTER_URL = "https://huggingface.co/Drexubery/ViewCrafter_25_512/resolve/main/model.ckpt"


# ------------------------------------------------------------------------------------------------ settings

@dataclass
class Settings:
    """Everything that changes the numbers (saved in summary.json and checked by --resume)."""

    mode: str
    image_size: tuple = (256, 256)
    tiny: bool = False
    align_iters: int = 300
    min_conf: float = 3.0
    fit_steps: int = 1000
    fit_weights: tuple = (0.8, 0.2, 0.5)
    sh_degree: int = 3
    max_points: int = 100_000
    frames: Optional[int] = None    # None: the video backbone's own (16 for DynamiCrafter, 25 for ViewCrafter)
    guidance: str = "x0 fusion"     # render-guided mode
    structure_points: int = 65536
    video_steps: int = 50
    cfg: float = 7.5
    confidence_iters: int = 300
    seed: int = 0
    target_intrinsics: str = "estimated"
    refine_steps: int = 0
    refine_lr: float = 2e-3
    lpips_net: str = "vgg"
    lpips_random_backbone: bool = False


# --------------------------------------------------------------------------------------------- mode registry

@dataclass
class Mode:
    """A way to reconstruct a scene: fn(context: ContextViews, models: dict, settings: Settings) -> Reconstruction.
    needs: the models it uses ("dust3r", "video"), loaded once per process."""

    fn: Callable
    needs: tuple
    description: str


MODES: dict = {}


def register_mode(name: str, needs: tuple, description: str):
    """Decorator: MODES[name] = Mode(fn, needs, description). Later modes register the same way."""
    def wrap(fn):
        MODES[name] = Mode(fn, tuple(needs), description)
        return fn
    return wrap


def _dust3r_stage(context, models, settings):
    """DUSt3R on the context views (square inputs kept whole: square_ok) -> aligned Scene, and the estimated
    cameras carried back to the context images' size (resize and crop of DUSt3R's preprocessing undone)."""
    from reconx_core.align import align_views
    from reconx_core.dust3r import infer_pairs, prepare_images
    from reconx_core.dust3r.preprocess import official_size_and_crop
    from reconx_core.evaluation import has_baseline
    from reconx_core.framing import scale_intrinsics
    from reconx_core.types import Cameras

    dust3r = models["dust3r"]
    H, W = context.images.shape[-2:]
    views = prepare_images(context.images, size=dust3r.image_size, square_ok=True)
    with torch.inference_mode():
        pairs = infer_pairs(dust3r, views, graph="complete", batch_size=2)
    scene = align_views(pairs, niter=settings.align_iters, min_conf_thr=settings.min_conf)
    (rw, rh), box, _ = official_size_and_crop(W, H, dust3r.image_size, square_ok=True)
    K = scene.cameras.intrinsics.clone()
    K[:, 0, 2] += box[0]
    K[:, 1, 2] += box[1]
    K = scale_intrinsics(K, W / rw, H / rh)
    if not has_baseline(scene.cameras.cam_to_world):
        # fail before the expensive stages: the targets could not be placed in this reconstruction's frame
        raise InputError("DUSt3R placed both context cameras at one centre (no baseline); the scene cannot be "
                         "evaluated")
    return scene, Cameras(scene.cameras.cam_to_world.clone(), K, W, H)


def _confident_points(scene) -> tuple:
    """(points (M, 3), colours (M, 3)) of the scene's confident pixels (all pixels when fewer than 64 are)."""
    points, colours = scene.confident_points()
    if points.shape[0] < 64:
        return scene.pts3d.reshape(-1, 3), scene.images.permute(0, 2, 3, 1).reshape(-1, 3)
    return points, colours


def _fit_kwargs(settings, models) -> dict:
    return {"steps": settings.fit_steps, "weights": settings.fit_weights, "sh_degree": settings.sh_degree,
            "max_points": settings.max_points, "seed": settings.seed, "lpips_dirs": models.get("lpips_dirs", ())}


@register_mode("geometry", needs=("dust3r",), description="DUSt3R alignment of the two views, 3DGS on them")
def reconstruct_geometry(context, models, settings) -> Reconstruction:
    from reconx_core.gaussians import fit_gaussians

    scene, cams = _dust3r_stage(context, models, settings)
    images = context.images.to(scene.device)
    gaussians = fit_gaussians(images, cams, init=_confident_points(scene),
                              **_fit_kwargs(settings, models))
    return Reconstruction(gaussians, cams.to("cpu"), {"align_mode": scene.info.get("mode"),
                                                      "focals_px": [float(f) for f in cams.focals]})


def letterbox(images: torch.Tensor, cameras, height: int, width: int) -> tuple:
    """Fit whole views into a height x width canvas (uniform scale, centred, zero padding).

    Returns (canvas (N, 3, height, width), confidence (N, height, width): 1 on the image, 0 on the padding,
    Cameras of the canvas). Lets the context photos join video frames of another aspect in one fit.
    """
    import torch.nn.functional as F

    from reconx_core.framing import scale_intrinsics
    from reconx_core.types import Cameras

    N, _, H, W = images.shape
    s = min(height / H, width / W)
    h, w = round(H * s), round(W * s)
    y0, x0 = (height - h) // 2, (width - w) // 2
    resized = images if (h, w) == (H, W) else F.interpolate(images, size=(h, w), mode="bilinear",
                                                             align_corners=False, antialias=s < 1)
    canvas = images.new_zeros(N, 3, height, width)
    canvas[:, :, y0:y0 + h, x0:x0 + w] = resized.clamp(0, 1)
    conf = images.new_zeros(N, height, width)
    conf[:, y0:y0 + h, x0:x0 + w] = 1
    K = scale_intrinsics(cameras.intrinsics, w / W, h / H)
    K[:, 0, 2] += x0
    K[:, 1, 2] += y0
    return canvas, conf, Cameras(cameras.cam_to_world, K, width, height)


def _video_reconstruction(context, models, settings, video_key: str, guidance=None) -> Reconstruction:
    """scripts/demo.py's stages 2-5 with the video model `models[video_key]` (structure tokens when it has a
    trained structure branch, interpolation — guided by point-cloud renders when the backbone or `guidance`
    takes them —, confidence mapping, the confidence-weighted fit initialised at the end frames' confident
    points), with two additions for the benchmark: the two context photos join the fit, letterboxed into the
    video frames' size with zero confidence on the padding (the video model sees only a centre crop of them,
    while the targets are rendered at the photos' full size), and stage 1's confident points join the init."""
    from reconx_core.confidence import map_confidence
    from reconx_core.gaussians import fit_gaussians
    from reconx_core.structure import encode_scene
    from reconx_core.types import Cameras
    from reconx_core.video import interpolate_views

    scene, cams = _dust3r_stage(context, models, settings)
    video, dust3r = models[video_key], models["dust3r"]
    structure = None
    if video.has_structure_branch:
        structure = encode_scene(video.structure_encoder, scene, max_points=settings.structure_points)
    views = interpolate_views(video, scene, structure=structure, frames=settings.frames, seed=settings.seed,
                              steps=settings.video_steps, cfg=settings.cfg, guidance=guidance)
    views = map_confidence(dust3r, views, niter=settings.confidence_iters, min_conf_thr=settings.min_conf)
    device = views.frames.device
    height, width = views.frames.shape[-2:]
    boxed, boxed_conf, boxed_cams = letterbox(context.images.to(device), cams.to(device), height, width)
    images = torch.cat([views.frames, boxed])
    conf = torch.cat([views.conf, boxed_conf])
    all_cams = Cameras(torch.cat([views.cameras.cam_to_world, boxed_cams.cam_to_world]),
                       torch.cat([views.cameras.intrinsics, boxed_cams.intrinsics]), width, height)
    # init_from_views' rule (end frames' pixels with conf >= min(0.5, their median)) plus stage 1's points
    ends = [0, len(views) - 1]
    keep = (views.conf[ends] >= min(0.5, float(views.conf[ends].median()))) & torch.isfinite(views.pts3d[ends]).all(-1)
    points, colours = _confident_points(scene)
    init = (torch.cat([views.pts3d[ends][keep], points.to(device)]),
            torch.cat([views.frames[ends].permute(0, 2, 3, 1)[keep], colours.to(device)]))
    gaussians = fit_gaussians(images, all_cams, conf=conf, init=init, **_fit_kwargs(settings, models))
    info = {"frames": len(views), "mean_confidence": float(views.conf.mean()), "backbone": views.info["backbone"],
            "guidance": views.info["guidance"], "focals_px": [float(f) for f in cams.focals]}
    deviation = views.info.get("confidence", {}).get("intended_deviation")
    if deviation:
        info["intended_deviation"] = {k: float(torch.as_tensor(v).float().max()) for k, v in deviation.items()
                                      if isinstance(v, (torch.Tensor, float, int))}
    return Reconstruction(gaussians, cams.to("cpu"), info)


@register_mode("reconx", needs=("dust3r", "video"),
               description="DUSt3R, DynamiCrafter interpolation, confidence mapping, confidence-aware 3DGS")
def reconstruct_reconx(context, models, settings) -> Reconstruction:
    return _video_reconstruction(context, models, settings, "video")


@register_mode("render-guided", needs=("dust3r", "video"),
               description="as reconx, with DynamiCrafter pulled towards point-cloud renders (x0 fusion)")
def reconstruct_render_guided(context, models, settings) -> Reconstruction:
    from reconx_core.video.guidance import GuidanceSettings

    return _video_reconstruction(context, models, settings, "video",
                                 guidance=GuidanceSettings(mode=settings.guidance))


@register_mode("viewcrafter", needs=("dust3r", "viewcrafter"),
               description="as reconx, with ViewCrafter conditioned on point-cloud renders")
def reconstruct_viewcrafter(context, models, settings) -> Reconstruction:
    return _video_reconstruction(context, models, settings, "viewcrafter")


# ---------------------------------------------------------------------------------------------------- models

def _required_file(path: Optional[str], default: Path, url: str, what: str) -> Path:
    weights = Path(path) if path else default
    if weights.is_file():
        return weights
    raise SystemExit(f"error: the {what} weights are missing.\n  file:     {weights.name}\n"
                     f"  folder:   {weights.parent}\n  download: {url}\n"
                     "  (or pass another path; --tiny runs a smoke test with tiny random models)")


def load_models(needs: tuple, args, settings: Settings, device: torch.device, tiny_paths: Optional[dict]) -> dict:
    """The models a mode needs, once per process. tiny_paths: from `tiny_model_paths` under --tiny."""
    from reconx_core.dust3r import load_dust3r

    models_dir = Path(args.models_dir)
    models: dict = {"lpips_dirs": [str(models_dir / "reconx")]}
    if "dust3r" in needs and tiny_paths and "dust3r_model" in tiny_paths:
        models["dust3r"] = tiny_paths["dust3r_model"].to(device).eval()
    elif "dust3r" in needs:
        path = tiny_paths["dust3r"] if tiny_paths else _required_file(
            args.dust3r_weights, models_dir / "dust3r" / DUST3R_FILE, DUST3R_URL, "DUSt3R")
        models["dust3r"] = load_dust3r(str(path), device=device).eval()
    from reconx_core.video import load_video_model
    from reconx_core.video.backbones import load_backbone

    dtype = torch.bfloat16 if device.type == "cuda" else None
    if "video" in needs:
        if tiny_paths:
            path, branch = tiny_paths["video"], tiny_paths["structure_branch"]
        else:
            path = _required_file(args.video_weights, models_dir / "reconx" / VIDEO_FILE, VIDEO_URL,
                                  "DynamiCrafter 512 interp")
            branch = args.structure_weights
        models["video"] = load_video_model(path, device=device, dtype=dtype, structure_path=branch,
                                           offload=device.type == "cuda")
        load_backbone(models["video"], path, "dynamicrafter_512_interp")
    if "viewcrafter" in needs:
        path = tiny_paths["viewcrafter"] if tiny_paths else _required_file(
            args.viewcrafter_weights, models_dir / "reconx" / VIEWCRAFTER_FILE, VIEWCRAFTER_URL, "ViewCrafter_25_512")
        models["viewcrafter"] = load_video_model(path, device=device, dtype=dtype, offload=device.type == "cuda")
        load_backbone(models["viewcrafter"], path, "viewcrafter_25_512")
    return models


def tiny_model_paths(needs: tuple, seed: int = 0) -> dict:
    """--tiny: the tiny random models of reconx_core.testing. Written to files and loaded through the real
    loaders when the mode needs the video model; a DUSt3R-only mode takes the tiny DUSt3R as built (writing the
    video model would import diffusers for nothing)."""
    from reconx_core.testing import tiny_dust3r, write_tiny_models
    if "video" in needs or "viewcrafter" in needs:
        return write_tiny_models(tempfile.mkdtemp(prefix="reconx-eval-tiny-"), seed=seed)
    return {"dust3r_model": tiny_dust3r(seed)}


# ------------------------------------------------------------------------------------------------- the run

def settings_from_args(args) -> Settings:
    s = Settings(mode=args.mode, tiny=args.tiny, target_intrinsics=args.target_intrinsics,
                 refine_steps=args.refine_steps, refine_lr=args.refine_lr, lpips_net=args.lpips_net, seed=args.seed,
                 lpips_random_backbone=args.lpips_random_backbone, guidance=args.guidance)
    if args.tiny:
        s = dataclasses.replace(s, image_size=(64, 64), align_iters=30, min_conf=1.0, fit_steps=30,
                                fit_weights=(0.8, 0.2, 0.0), sh_degree=0, max_points=5000, frames=4, video_steps=2,
                                structure_points=1024,
                                confidence_iters=20, lpips_random_backbone=True)
    overrides = {"image_size": tuple(args.image_size) if args.image_size else None, "fit_steps": args.fit_steps,
                 "video_steps": args.video_steps, "frames": args.frames}
    if args.fit_lpips_weight is not None:
        overrides["fit_weights"] = (s.fit_weights[0], s.fit_weights[1], args.fit_lpips_weight)
    return dataclasses.replace(s, **{k: v for k, v in overrides.items() if v is not None})


def _jsonable(settings: Settings) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(settings)))


def check_output(out: Path, run_info: dict, resume: bool) -> None:
    """A fresh run needs an output folder without finished scenes; --resume needs the same settings."""
    run_file = out / "run.json"
    finished = list((out / "scenes").glob("*.json")) if (out / "scenes").is_dir() else []
    if run_file.is_file() and resume:
        before = json.loads(run_file.read_text())
        changed = {k: (before.get(k), v) for k, v in run_info.items() if before.get(k) != v}
        if changed:
            raise SystemExit(f"error: --resume with other settings than the run in {out}: {changed}. Use another "
                             "--output, or the same settings")
    elif finished and not resume:
        raise SystemExit(f"error: {out} already holds {len(finished)} finished scenes; pass --resume to continue "
                         "that run, or choose another --output")


def make_accelerator(force_cpu: bool):
    """accelerate's Accelerator when installed (one process per GPU under `accelerate launch`), else None."""
    try:
        from accelerate import Accelerator
    except ImportError:
        log.warning("accelerate is not installed: running as one process (pip install accelerate to shard)")
        return None
    return Accelerator(cpu=force_cpu or not torch.cuda.is_available())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", help="RealEstate10K/ACID in pixelSplat's layout ({train,test}/*.torch + "
                        "index.json) or DL3DV scene folders (transforms.json); --tiny without it: synthetic scenes")
    parser.add_argument("--index", help="evaluation index (MVSplat's assets/evaluation_index_re10k.json, ...)")
    parser.add_argument("--mode", required=True, choices=sorted(MODES))
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--limit", type=int, help="evaluate only the first N scenes (in the dataset's order)")
    parser.add_argument("--resume", action="store_true", help="skip scenes finished by an earlier run")
    parser.add_argument("--split", default="test")
    parser.add_argument("--tiny", action="store_true", help="smoke run: tiny random models, synthetic data")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), help="protocol size (256 256)")
    parser.add_argument("--models-dir", default=str(REPO / "models"), help="folder with dust3r/ and reconx/")
    parser.add_argument("--dust3r-weights")
    parser.add_argument("--video-weights")
    parser.add_argument("--structure-weights")
    parser.add_argument("--viewcrafter-weights", help="ViewCrafter_25_512's model.ckpt (viewcrafter mode)")
    parser.add_argument("--guidance", choices=("x0 fusion", "render init", "render init + x0 fusion"),
                        default="x0 fusion", help="render guidance of the render-guided mode")
    parser.add_argument("--fit-steps", type=int)
    parser.add_argument("--fit-lpips-weight", type=float, help="LPIPS weight of the 3DGS fit (0.5; 0 = no alexnet)")
    parser.add_argument("--frames", type=int, help="video frames per segment (reconx mode)")
    parser.add_argument("--video-steps", type=int, help="DDIM steps (reconx mode)")
    parser.add_argument("--target-intrinsics", choices=("estimated", "true"), default="estimated")
    parser.add_argument("--refine-steps", type=int, default=0, help="test-time target-pose refinement steps")
    parser.add_argument("--refine-lr", type=float, default=2e-3)
    parser.add_argument("--lpips-net", choices=("vgg", "alex"), default="vgg")
    parser.add_argument("--lpips-random-backbone", action="store_true",
                        help="LPIPS on a random backbone (tests; implied by --tiny): NOT a perceptual metric")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA is available")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    accelerator = make_accelerator(args.cpu)
    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    is_main = rank == 0
    device = accelerator.device if accelerator else torch.device("cpu" if args.cpu or not torch.cuda.is_available()
                                                                 else "cuda")

    def barrier():
        if accelerator is not None:
            accelerator.wait_for_everyone()

    settings = settings_from_args(args)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        log.info("SMOKE RUN with tiny random-weight models and a random LPIPS backbone: the numbers mean nothing")
    data_root, index_path = args.data_root, args.index
    if data_root is None:
        if not args.tiny:
            raise SystemExit("error: --data-root is required (or --tiny for synthetic scenes)")
        data_root, index_path = str(out / "synthetic_data"), str(out / "synthetic_data" / "evaluation_index.json")
        if is_main and not Path(index_path).is_file():
            from reconx_core.data.synthetic import write_synthetic_re10k

            write_synthetic_re10k(data_root, n_scenes=args.limit or 3, n_frames=12, height=90, width=160)
        barrier()
    if index_path is None:
        raise SystemExit("error: --index is required (MVSplat's assets/evaluation_index_re10k.json or _acid.json)")

    from reconx_core.data import load_evaluation_index, open_dataset, selected_scenes
    from reconx_core.evaluation import (evaluate_scene, failure_record, format_summary, load_eval_scene,
                                        metric_rows, save_png, scene_record, side_by_side, summarize,
                                        write_json_atomic, write_metrics_csv)
    from reconx_core.metrics import load_lpips_metric

    dataset = open_dataset(data_root, args.split)
    index = load_evaluation_index(index_path)
    keys, missing = selected_scenes(index, dataset.keys())
    if missing:
        log.warning("%d scenes of the index are not in %s (first: %s)", len(missing), data_root, missing[0])
    if args.limit is not None:
        keys = keys[:args.limit]
    if not keys:
        raise SystemExit(f"error: no scene of {index_path} is in {data_root}; check --data-root, --split and --index")
    run_info = {"settings": _jsonable(settings), "data_root": str(Path(data_root).resolve()),
                "index": str(Path(index_path).resolve()), "split": args.split}
    check_output(out, run_info, args.resume)  # in every process: one that stopped alone would hang the others
    barrier()
    if is_main:
        write_json_atomic(out / "run.json", run_info)
    barrier()
    scenes_dir = out / "scenes"
    # every process lists the finished scenes before any of them writes one (the barrier below)
    todo = [k for k in keys if not (scenes_dir / f"{k}.json").is_file()]
    barrier()
    # contiguous blocks keep each process on few chunks (chunk order = dataset order)
    mine = todo[rank * len(todo) // world:(rank + 1) * len(todo) // world]
    log.info("process %d/%d: %d of %d scenes to do (%d already finished)", rank, world, len(mine), len(keys),
             len(keys) - len(todo))

    if mine:
        mode = MODES[settings.mode]
        tiny_paths = tiny_model_paths(mode.needs, settings.seed) if args.tiny else None
        models = load_models(mode.needs, args, settings, device, tiny_paths)
        torch.manual_seed(settings.seed)  # the random LPIPS backbone of --tiny is the same in every process
        lpips_model = load_lpips_metric(settings.lpips_net, models["lpips_dirs"], device,
                                        random_backbone=settings.lpips_random_backbone)
        height, width = settings.image_size
        for n, key in enumerate(mine):
            t0 = time.perf_counter()
            try:
                scene = load_eval_scene(dataset, key, index[key], height, width)
                result = evaluate_scene(scene, lambda ctx: mode.fn(ctx, models, settings), lpips_model,
                                        target_intrinsics=settings.target_intrinsics,
                                        refine_steps=settings.refine_steps, refine_lr=settings.refine_lr,
                                        device=device)
            except ReconXError as error:
                log.warning("scene %s failed: %s", key, error)
                write_json_atomic(scenes_dir / f"{key}.json", failure_record(key, str(error),
                                                                             time.perf_counter() - t0))
                continue
            folder = out / "renders" / key
            for target, image in zip(result.target_index, result.renders):
                save_png(image, folder / f"{target:06d}.png")
            if result.refined_renders is not None:
                for target, image in zip(result.target_index, result.refined_renders):
                    save_png(image, folder / f"{target:06d}_refined.png")
            save_png(side_by_side(scene, result), folder / "side_by_side.png")
            write_json_atomic(scenes_dir / f"{key}.json", scene_record(result))  # last: marks the scene finished
            means = {m: sum(v) / len(v) for m, v in result.metrics.items()}
            log.info("[%d/%d] %s  %s  (%.1f s)", n + 1, len(mine), key,
                     "  ".join(f"{m} {v:.3f}" for m, v in means.items()), result.seconds)
    barrier()
    if not is_main:
        return 0
    records = [json.loads((scenes_dir / f"{k}.json").read_text()) for k in keys
               if (scenes_dir / f"{k}.json").is_file()]
    unfinished = [k for k in keys if not (scenes_dir / f"{k}.json").is_file()]
    write_metrics_csv(out / "metrics.csv", metric_rows(records))
    summary = summarize(records)
    summary.update({"mode": settings.mode, "smoke_run_with_random_weights": settings.tiny, **run_info,
                    "lpips": f"{settings.lpips_net}" + (" (random backbone)" if settings.lpips_random_backbone
                                                        else ""),
                    "index_scenes_missing_from_data": len(missing), "unfinished": unfinished,
                    "processes": world})
    write_json_atomic(out / "summary.json", summary)
    print(f"\n{settings.mode} on {len(keys)} scenes of {Path(index_path).name}"
          + ("  [SMOKE RUN: tiny random models]" if settings.tiny else ""))
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ReconXError as error:
        sys.exit(f"error: {error}")
