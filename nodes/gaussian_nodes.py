"""Stage 5 nodes: fit confidence-aware 3D Gaussians; render them along a camera path."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from reconx_core.errors import InputError
from reconx_core.types import Gaussians, Scene

from . import comfy_bridge as bridge
from .convert import image_to_core

log = logging.getLogger("reconx")
CATEGORY = "ReconX"


def gaussians_to_splat(gaussians: Gaussians):
    """reconx_core Gaussians -> ComfyUI's native SPLAT (batch of one, activated values, same device)."""
    from reconx_core.gaussians import to_activated

    act = to_activated(gaussians)
    return bridge.make_splat(act["means"][None], act["scales"][None], act["quats"][None],
                             act["opacities"].reshape(1, -1, 1), act["sh"][None])


def splat_to_gaussians(splat, index: int = 0) -> Gaussians:
    """ComfyUI SPLAT (item `index` of the batch) -> reconx_core Gaussians (raw parameters)."""
    for name in ("positions", "scales", "rotations", "opacities", "sh"):
        if not isinstance(getattr(splat, name, None), torch.Tensor):
            raise InputError(f"splat has no tensor '{name}'; connect a SPLAT output (e.g. ReconX Fit Gaussians)")
    count = int(splat.counts[index]) if getattr(splat, "counts", None) is not None else splat.positions.shape[1]
    opacity = splat.opacities[index, :count].reshape(-1).clamp(1e-6, 1 - 1e-6)
    return Gaussians(means=splat.positions[index, :count].float(),
                     quats=splat.rotations[index, :count].float(),
                     log_scales=splat.scales[index, :count].float().clamp_min(1e-12).log(),
                     opacity_logits=torch.logit(opacity.float()),
                     sh=splat.sh[index, :count].float())


def _gaussians_ply_bytes(gaussians: Gaussians) -> bytes:
    from reconx_core.gaussians import save_ply

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gaussians.ply"
        save_ply(gaussians, path)
        return path.read_bytes()


TITLE = "ReconX Fit Gaussians"
LPIPS_RANGE = (0.5, 0.0, 10.0)  # lpips_weight default, min, max


def lpips_problem(extra_dirs) -> str:
    """Why a fit with LPIPS could not start here ("" when it can): the lpips package or the backbone file is
    missing. Cheap (no model is built); the message is the one the fit itself would raise."""
    import importlib.util

    from reconx_core.errors import ResourceError
    from reconx_core.gaussians import FitConfig
    from reconx_core.gaussians.losses import find_lpips_backbone

    if importlib.util.find_spec("lpips") is None:
        return "the lpips package is not installed; pip install lpips, or set lpips_weight to 0 to fit without LPIPS"
    try:
        find_lpips_backbone(FitConfig.lpips_net, extra_dirs)
    except ResourceError as err:
        return str(err)
    return ""


class ReconXFitGaussians:
    DESCRIPTION = ("Fits 3D Gaussians to the frames with ReconX's confidence-aware loss "
                   "Σ C·(0.8·L1 + 0.2·(1−SSIM) + 0.5·LPIPS), initialised from the scene's point maps, 1,000 steps, "
                   "no densification by default. Outputs ComfyUI's SPLAT (for Render Splat / Splat To File3D) and a "
                   "PLY for Preview Splat / Save Splat.")
    CATEGORY = CATEGORY
    FUNCTION = "fit"
    RETURN_TYPES = ("SPLAT", "FILE_3D_PLY")
    RETURN_NAMES = ("splat", "ply")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "scene": ("RECONX_SCENE", {"tooltip": "Cameras and initial points (ReconX DUSt3R Global Alignment)."}),
                # ComfyUI's frontend snaps an INT widget to min + k * step: min 10 with step 10 keeps round
                # numbers (30, 1000, 2000) reachable
                "steps": ("INT", {"default": 1000, "min": 10, "max": 30000, "step": 10,
                                  "tooltip": "Optimisation steps (the paper uses 1,000)."}),
                "l1_weight": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 10.0, "step": 0.05,
                                        "tooltip": "Weight of the confidence-weighted L1 term."}),
                "ssim_weight": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 10.0, "step": 0.05,
                                          "tooltip": "Weight of the (1 - SSIM) term."}),
                "lpips_weight": ("FLOAT", {"default": LPIPS_RANGE[0], "min": LPIPS_RANGE[1], "max": LPIPS_RANGE[2],
                                           "step": 0.05,
                                           "tooltip": "Weight of LPIPS. Needs alexnet-owt-7be5be79.pth in models/reconx "
                                                      "or the torch hub cache (checked when the prompt is queued); "
                                                      "0 turns LPIPS off."}),
                "sh_degree": ("INT", {"default": 3, "min": 0, "max": 3,
                                      "tooltip": "Spherical-harmonics degree of the colours (0 = view-independent)."}),
                "densify": ("BOOLEAN", {"default": False,
                                        "tooltip": "Adaptive density control (clone/split/prune). ReconX keeps it off."}),
                "max_points": ("INT", {"default": 300000, "min": 1000, "max": 5000000, "step": 1000,
                                       "tooltip": "At most this many Gaussians are initialised from the point maps."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                                 "tooltip": "Seed of the point subsampling."}),
            },
            "optional": {
                "views": ("RECONX_VIEWS", {"tooltip": "Generated frames with cameras and confidences (ReconX "
                                                      "Confidence Mapping). When connected, all its frames are fitted with "
                                                      "their confidences, initialised from the first and last "
                                                      "frames' point maps (as in the paper)."}),
                "frames": ("IMAGE", {"tooltip": "Frames to fit, one per scene camera; default: the scene's own images."}),
                "confidence": ("MASK", {"tooltip": "Per-pixel weights in [0, 1], one per frame; default: uniform."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, lpips_weight=None):
        """Runs when the prompt is queued, before any node: a missing LPIPS backbone stops the run there, not after
        the alignment and the video model. Naming lpips_weight here makes ComfyUI skip its own range check for it,
        so that is done here too. A linked lpips_weight is unknown until the graph runs (None): the fit checks it."""
        if lpips_weight is None:
            return True
        _, low, high = LPIPS_RANGE
        if not low <= float(lpips_weight) <= high:
            return f"lpips_weight {lpips_weight} is outside [{low}, {high}]"
        if float(lpips_weight) > 0:
            problem = lpips_problem([str(p) for p in bridge.model_folders("reconx")])
            if problem:
                return f"{TITLE}: {problem}"
        return True

    def fit(self, scene, steps=1000, l1_weight=0.8, ssim_weight=0.2, lpips_weight=0.5, sh_degree=3,
            densify=False, max_points=300000, seed=0, views=None, frames=None, confidence=None):
        from reconx_core.gaussians import FitConfig, fit_to_scene, fit_to_views

        if not isinstance(scene, Scene):
            raise InputError("scene must be a RECONX_SCENE: connect the scene output of ReconX DUSt3R Global Alignment")
        config = FitConfig(steps=steps, weights=(l1_weight, ssim_weight, lpips_weight), sh_degree=sh_degree,
                           densify=densify, max_points=max_points, seed=seed,
                           lpips_dirs=[str(p) for p in bridge.model_folders("reconx")])
        progress = bridge.Progress(steps)
        if views is not None:
            result = fit_to_views(views, config, callback=progress.phase(steps))
        else:
            images, conf = _frames_for_scene(scene, frames, confidence)
            result = fit_to_scene(scene, config, images=images, conf=conf, callback=progress.phase(steps))
        gaussians = result.gaussians
        log.info("fitted %d Gaussians to %d frames in %d steps", len(gaussians), len(result.cameras), steps)
        return (gaussians_to_splat(gaussians), bridge.make_file3d(_gaussians_ply_bytes(gaussians), "ply"))


def _frames_for_scene(scene: Scene, frames, confidence):
    """The optional IMAGE frames and MASK weights of the fit node, at the scene cameras' size:
    images (N, 3, H, W) or None (the scene's own images), conf (N, H, W) or None (uniform)."""
    size = (scene.cameras.height, scene.cameras.width)
    images = None
    if frames is not None:
        images = image_to_core(frames, "frames", scene.device)
        if images.shape[0] != len(scene):
            raise InputError(f"{images.shape[0]} frames for {len(scene)} scene cameras; give one frame per camera")
        if tuple(images.shape[-2:]) != size:
            images = torch.nn.functional.interpolate(images, size=size, mode="bilinear", antialias=True,
                                                     align_corners=False)
    conf = None
    if confidence is not None:
        conf = confidence.to(scene.device).float()
        if conf.ndim == 2:
            conf = conf[None].expand(len(scene), -1, -1)
        if conf.shape[0] != len(scene):
            raise InputError(f"{conf.shape[0]} confidence maps for {len(scene)} frames")
        if tuple(conf.shape[-2:]) != size:
            conf = torch.nn.functional.interpolate(conf[:, None], size=size, mode="bilinear",
                                                   align_corners=False)[:, 0]
    return images, conf


class ReconXRenderGaussians:
    DESCRIPTION = ("Renders a SPLAT along a camera path — a smooth path through the scene's cameras, or an orbit "
                   "around the scene — as an IMAGE batch (a video for ComfyUI's video nodes), with depth and alpha.")
    CATEGORY = CATEGORY
    FUNCTION = "render"
    RETURN_TYPES = ("IMAGE", "IMAGE", "MASK")
    RETURN_NAMES = ("frames", "depth", "alpha")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "splat": ("SPLAT", {"tooltip": "Gaussians, e.g. from ReconX Fit Gaussians."}),
            "scene": ("RECONX_SCENE", {"tooltip": "The scene whose cameras define the path and the intrinsics."}),
            "path": (["through cameras", "orbit"], {
                "default": "through cameras",
                "tooltip": "through cameras: a smooth path visiting every scene camera in order; orbit: a circle "
                           "around the scene's centre through the first camera's position."}),
            "frames": ("INT", {"default": 48, "min": 1, "max": 1000, "tooltip": "Number of rendered frames."}),
            "width": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8,
                              "tooltip": "Output width; 0 keeps the scene's."}),
            "height": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8,
                               "tooltip": "Output height; 0 keeps the scene's."}),
        }}

    def render(self, splat, scene, path="through cameras", frames=48, width=0, height=0):
        from reconx_core.camera_path import scene_path
        from reconx_core.gaussians import render
        from reconx_core.preview import depth_preview

        if not isinstance(scene, Scene):
            raise InputError("scene must be a RECONX_SCENE")
        gaussians = splat_to_gaussians(splat).to(scene.device)
        cameras = scene_path(scene, path, frames, width, height)
        step = bridge.Progress(frames).phase(frames)
        outs = []
        for i in range(frames):  # one view per call keeps memory flat for long paths, whatever the backend
            with torch.no_grad():
                outs.append(render(gaussians, cameras[i]))
            step(i + 1, frames)
        rgb, depth, alpha = (torch.cat([getattr(o, k) for o in outs]) for k in ("rgb", "depth", "alpha"))
        return (rgb.clamp(0, 1), depth_preview(depth.clamp_min(1e-6), alpha > 0.5), alpha.clamp(0, 1))


NODE_CLASS_MAPPINGS = {"ReconXFitGaussians": ReconXFitGaussians, "ReconXRenderGaussians": ReconXRenderGaussians}
NODE_DISPLAY_NAME_MAPPINGS = {"ReconXFitGaussians": "ReconX Fit Gaussians (confidence-aware 3DGS)",
                              "ReconXRenderGaussians": "ReconX Render Gaussians"}
