"""Stages 2-3 nodes: encode the point cloud, interpolate views with the video model."""

from __future__ import annotations

import logging


from reconx_core.errors import InputError
from reconx_core.types import Scene

from . import comfy_bridge as bridge
from .convert import image_to_comfy

log = logging.getLogger("reconx")
CATEGORY = "ReconX"


def _video_model(video_model) -> bridge.ManagedModel:
    if not isinstance(video_model, bridge.ManagedModel) or not hasattr(video_model.module, "unet"):
        raise InputError("video_model must come from the ReconX Video Model Loader node")
    return video_model


class ReconXEncodePointCloud:
    DESCRIPTION = ("Encodes the scene's confident points into ReconX structure tokens, "
                   "F(P) = FFN(CrossAttn(PosEmb(P~), PosEmb(P))) with P~ a 1/8 farthest-point sample, using the "
                   "structure branch loaded with the video model.")
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("RECONX_STRUCTURE",)
    RETURN_NAMES = ("structure",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "scene": ("RECONX_SCENE", {"tooltip": "The aligned scene (ReconX DUSt3R Global Alignment)."}),
            "video_model": ("RECONX_VIDEO_MODEL", {"tooltip": "Video model with its structure branch loaded."}),
            "max_points": ("INT", {"default": 65536, "min": 256, "max": 1_000_000, "step": 256,
                                   "tooltip": "Point budget P; the tokens are its 1/8 farthest-point sample."}),
        }}

    def encode(self, scene, video_model, max_points=65536):
        from reconx_core.structure import encode_scene

        if not isinstance(scene, Scene):
            raise InputError("scene must be a RECONX_SCENE")
        managed = _video_model(video_model)
        model = managed.acquire()
        if model.structure_encoder is None:
            raise InputError("this video model has no structure branch: pick a structure-branch file in ReconX "
                             "Video Model Loader, or leave the structure input of ReconX Interpolate unconnected")
        progress = bridge.Progress(1)
        try:
            # with staged offload the weights live on the offload device until their stage runs
            with model.stage(model.structure_encoder) as encoder:
                tokens = encode_scene(encoder, scene, max_points=max_points, callback=progress.phase(1))
        finally:
            managed.release()
        return (tokens.to(scene.device),)


class ReconXInterpolate:
    DESCRIPTION = ("Generates the frames between each pair of consecutive reference views with DynamiCrafter-512-"
                   "interp, guided by the structure tokens when given (ReconX). K views give K-1 segments that share "
                   "their end frames. Outputs the frames as IMAGE and as RECONX_VIEWS (with the reference cameras) "
                   "for confidence mapping.")
    CATEGORY = CATEGORY
    FUNCTION = "interpolate"
    RETURN_TYPES = ("IMAGE", "RECONX_VIEWS")
    RETURN_NAMES = ("frames", "views")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "video_model": ("RECONX_VIDEO_MODEL", {"tooltip": "From ReconX Video Model Loader."}),
                "scene": ("RECONX_SCENE", {"tooltip": "Reference views (in order) and their cameras."}),
                "prompt": ("STRING", {"default": "", "multiline": True,
                                      "tooltip": "Optional text describing the scene (empty works well)."}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 500, "tooltip": "DDIM steps (official: 50)."}),
                "cfg": ("FLOAT", {"default": 7.5, "min": 1.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "Classifier-free guidance scale (official: 7.5)."}),
                "structure_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                              "tooltip": "Guidance weight of the structure condition (ReconX)."}),
                "frames": ("INT", {"default": 16, "min": 2, "max": 64,
                                   "tooltip": "Frames per segment including both ends (the model was trained on 16)."}),
                "frame_stride": ("INT", {"default": 5, "min": 1, "max": 30,
                                         "tooltip": "Motion-speed condition (official interpolation: 5)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "control_after_generate": True,
                                 "tooltip": "Seed of all sampling noise."}),
            },
            "optional": {
                "structure": ("RECONX_STRUCTURE", {"tooltip": "Point-cloud tokens (ReconX Encode Point Cloud); "
                                                              "needs trained structure-branch weights."}),
            },
        }

    def interpolate(self, video_model, scene, prompt="", steps=50, cfg=7.5, structure_scale=1.0, frames=16,
                    frame_stride=5, seed=0, structure=None):
        from reconx_core.video import interpolate_views

        if not isinstance(scene, Scene):
            raise InputError("scene must be a RECONX_SCENE")
        managed = _video_model(video_model)
        model = managed.acquire()
        segments = len(scene) - 1
        progress = bridge.Progress(max(segments, 1) * steps)
        try:
            views = interpolate_views(model, scene, structure=structure, frames=frames, seed=seed,
                                      callback=progress.phase(max(segments, 1) * steps), prompt=prompt, steps=steps,
                                      cfg=cfg, structure_scale=structure_scale, frame_stride=frame_stride)
        finally:
            managed.release()
        return (image_to_comfy(views.frames), views)


NODE_CLASS_MAPPINGS = {"ReconXEncodePointCloud": ReconXEncodePointCloud,
                       "ReconXInterpolate": ReconXInterpolate}
NODE_DISPLAY_NAME_MAPPINGS = {"ReconXEncodePointCloud": "ReconX Encode Point Cloud",
                              "ReconXInterpolate": "ReconX Interpolate Views (video diffusion)"}
