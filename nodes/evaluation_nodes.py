"""How good is a reconstruction on photos held back from it: PSNR, SSIM and LPIPS as the papers compute them."""

from __future__ import annotations

import logging

import torch

from reconx_core.errors import InputError, ReconXError

from . import comfy_bridge as bridge
from .convert import image_to_comfy, image_to_core
from .gaussian_nodes import splat_to_gaussians

log = logging.getLogger("reconx")
CATEGORY = "ReconX"
TITLE = "ReconX Evaluate Held-out Photos"
LPIPS_CHOICES = ["vgg", "alex", "off"]


class ReconXEvaluateHeldOut:
    DESCRIPTION = ("Scores a reconstruction on photos it never saw: PSNR, SSIM (Gaussian 11 px window, as MVSplat) and "
                   "LPIPS (VGG, as MVSplat; or AlexNet). DUSt3R aligns the reconstruction's photos together with the "
                   "held-out ones; the similarity between that alignment and the reconstruction's own cameras (fitted "
                   "on the shared photos: rotation from their orientations and centres, scale from their baseline) "
                   "carries the held-out cameras into the reconstruction, where the Gaussians are rendered. Optional "
                   "test-time pose refinement (Gaussians frozen) is reported separately, as pose-free methods do.")
    CATEGORY = CATEGORY
    FUNCTION = "evaluate"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("metrics", "comparison")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "splat": ("SPLAT", {"tooltip": "The reconstruction (ReconX Fit Gaussians)."}),
            "scene": ("RECONX_SCENE", {"tooltip": "The aligned photos the reconstruction was made from (ReconX "
                                                  "DUSt3R Global Alignment): their cameras tie the held-out photos "
                                                  "to the reconstruction's frame."}),
            "dust3r": ("RECONX_DUST3R", {"tooltip": "The DUSt3R network (ReconX DUSt3R Loader), to place the "
                                                    "held-out photos."}),
            "held_out": ("IMAGE", {"tooltip": "Photos of the same scene that the reconstruction did not use, the "
                                              "same size as the reconstruction's photos."}),
            "iterations": ("INT", {"default": 300, "min": 0, "max": 5000, "step": 10,
                                   "tooltip": "Global-alignment steps of the joint alignment that places the "
                                              "held-out photos."}),
            "refine_steps": ("INT", {"default": 0, "min": 0, "max": 2000, "step": 1,
                                     "tooltip": "Test-time refinement of the held-out cameras with the Gaussians "
                                                "frozen; 0 = off. Reported beside the unrefined scores."}),
            "lpips": (LPIPS_CHOICES, {"default": "vgg",
                                      "tooltip": "LPIPS backbone: vgg (MVSplat, pixelSplat), alex, or off. Needs "
                                                 "vgg16-397923af.pth / alexnet-owt-7be5be79.pth in models/reconx or "
                                                 "the torch hub cache."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, lpips):
        # Checked when the prompt is queued, before anything runs: a missing backbone must not stop the run at the
        # end. (Naming `lpips` here skips ComfyUI's own combo check for it, so check the choice as well.)
        if lpips not in LPIPS_CHOICES:
            return f"{TITLE}: lpips must be one of {LPIPS_CHOICES}, got {lpips!r}"
        if lpips == "off":
            return True
        from reconx_core.gaussians.losses import find_lpips_backbone

        try:
            find_lpips_backbone(lpips, [str(p) for p in bridge.model_folders("reconx")])
        except ReconXError as error:
            return f"{TITLE}: {error} (or choose lpips = off)"
        return True

    def evaluate(self, splat, scene, dust3r, held_out, iterations=300, refine_steps=0, lpips="vgg"):
        from reconx_core.align import align_views
        from reconx_core.dust3r import infer_pairs, prepare_images
        from reconx_core.evaluation import comparison_sheet, score_heldout_views
        from reconx_core.metrics import load_lpips_metric
        from reconx_core.types import Scene

        if not isinstance(scene, Scene):
            raise InputError(f"{TITLE}: scene must come from ReconX DUSt3R Global Alignment (RECONX_SCENE)")
        if not isinstance(dust3r, bridge.ManagedModel):
            raise InputError(f"{TITLE}: dust3r must come from the ReconX DUSt3R Loader node")
        gaussians = splat_to_gaussians(splat).to(scene.device)
        model = dust3r.acquire()
        photos = prepare_images(image_to_core(held_out, "held_out"), size=int(getattr(model, "image_size", 512)))
        photos = photos.to(scene.device)
        if tuple(photos.shape[-2:]) != (scene.cameras.height, scene.cameras.width):
            raise InputError(f"{TITLE}: the held-out photos come out at {photos.shape[-1]}x{photos.shape[-2]} for "
                             f"DUSt3R, the reconstruction's photos at {scene.cameras.width}x{scene.cameras.height}; "
                             "hold out photos of the same size and orientation as the others")
        K, M = len(scene), photos.shape[0]
        progress = bridge.Progress(K + M + max(iterations, 1) + max(refine_steps, 0) + 1)
        with torch.inference_mode():
            pairs = infer_pairs(model, torch.cat([scene.images, photos]).to(dust3r.device), graph="complete",
                                callback=progress.phase(K + M))
        joint = align_views(pairs.to(dust3r.device, torch.float32), niter=iterations, min_conf_thr=scene.min_conf,
                            callback=progress.phase(max(iterations, 1)))
        metric = None if lpips == "off" else load_lpips_metric(
            lpips, [str(p) for p in bridge.model_folders("reconx")], scene.device)
        result = score_heldout_views(gaussians, scene.cameras, joint.cameras.to(scene.device), list(range(K)),
                                     list(range(K, K + M)), photos, lpips_model=metric, refine_steps=refine_steps)
        progress.phase(1)(1, 1)
        text = format_heldout_metrics(result)
        log.info("held-out evaluation:\n%s", text)
        sheet = comparison_sheet(photos, result)[None].to(scene.device)
        return {"ui": {"text": [text]}, "result": (text, image_to_comfy(sheet))}


def format_heldout_metrics(result) -> str:
    """A small table: one line per held-out photo (and after pose refinement, when run), then the means."""
    names = [k for k in ("psnr", "ssim", "lpips") if k in result.metrics]
    lines = ["photo  " + "  ".join(f"{n.upper():>7}" for n in names)]
    for label, metrics in (("", result.metrics), (" refined", result.refined)):
        if metrics is None:
            continue
        for i in range(len(result.target_index)):
            lines.append(f"{i + 1:>5}{label}  " + "  ".join(f"{metrics[n][i]:7.4f}" for n in names))
        lines.append(f" mean{label}  " + "  ".join(f"{sum(metrics[n]) / len(metrics[n]):7.4f}" for n in names))
    lines.append("PSNR/SSIM higher is better, LPIPS lower. Cameras placed by a joint DUSt3R alignment.")
    return "\n".join(lines)


NODE_CLASS_MAPPINGS = {"ReconXEvaluateHeldOut": ReconXEvaluateHeldOut}
NODE_DISPLAY_NAME_MAPPINGS = {"ReconXEvaluateHeldOut": TITLE}
