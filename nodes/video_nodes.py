"""Stages 2-3 nodes: encode the point cloud, interpolate views with the video model."""

from __future__ import annotations

import logging


from reconx_core.errors import InputError
from reconx_core.types import Scene

from . import comfy_bridge as bridge
from .convert import image_to_comfy

log = logging.getLogger("reconx")
CATEGORY = "ReconX"
TITLE = "ReconX Interpolate Views (video diffusion)"


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
            "max_points": ("INT", {"default": 65536, "min": 256, "max": 1_048_576, "step": 256,
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
                             "Video Model Loader, or leave the structure input of ReconX Interpolate Views unconnected")
        progress = bridge.Progress(1)
        try:
            # with staged offload the weights live on the offload device until their stage runs
            with model.stage(model.structure_encoder) as encoder:
                tokens = encode_scene(encoder, scene, max_points=max_points, callback=progress.phase(1))
        finally:
            managed.release()
        return (tokens.to(scene.device),)


class ReconXInterpolate:
    DESCRIPTION = ("Generates the frames between each pair of consecutive photos with the loaded video model: "
                   "DynamiCrafter-512-interp (optionally pulled towards point-cloud renders: render guidance, or "
                   "guided by ReconX structure tokens when trained weights exist) or ViewCrafter (conditioned on the "
                   "renders). K photos give K-1 segments that share their end frames. Outputs the frames as IMAGE "
                   "and as RECONX_VIEWS (with the photos' cameras and, when renders guided the model, the intended "
                   "camera path) for confidence mapping.")
    CATEGORY = CATEGORY
    FUNCTION = "interpolate"
    RETURN_TYPES = ("IMAGE", "RECONX_VIEWS")
    RETURN_NAMES = ("frames", "views")

    @classmethod
    def INPUT_TYPES(cls):
        from reconx_core.video.guidance import GUIDANCE_MODES

        return {
            "required": {
                "video_model": ("RECONX_VIDEO_MODEL", {"tooltip": "From ReconX Video Model Loader (its backbone "
                                                                  "decides the conditioning)."}),
                "scene": ("RECONX_SCENE", {"tooltip": "Reference views (in order) and their cameras."}),
                "prompt": ("STRING", {"default": "", "multiline": True,
                                      "tooltip": "Text describing the scene. Empty: the model's default (DynamiCrafter "
                                                 "none; ViewCrafter 'Rotating view of a scene', its fixed prompt)."}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 500, "tooltip": "DDIM steps (official: 50)."}),
                "cfg": ("FLOAT", {"default": 7.5, "min": 1.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "Classifier-free guidance scale (official: 7.5)."}),
                "structure_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05,
                                              "tooltip": "Guidance weight of the structure condition (ReconX)."}),
                "frames": ("INT", {"default": 0, "min": 0, "max": 64, "step": 1,
                                   "tooltip": "Frames per segment including both ends. 0: the model's own "
                                              "(DynamiCrafter 16, ViewCrafter_25 25, ViewCrafter_16 16; ViewCrafter "
                                              "accepts only its own)."}),
                "frame_stride": ("INT", {"default": 0, "min": 0, "max": 30, "step": 1,
                                         "tooltip": "Motion-speed condition fs. 0: the model's own (DynamiCrafter "
                                                    "interpolation 5, ViewCrafter 10)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "control_after_generate": True,
                                 "tooltip": "Seed of all sampling noise."}),
                "guidance": (list(GUIDANCE_MODES), {
                    "default": "none",
                    "tooltip": "Render guidance, training-free, for any backbone (meant for DynamiCrafter; "
                               "ViewCrafter already takes the renders as its condition). x0 fusion: at each early "
                               "step the predicted clean latent is pulled towards the render's latent where the "
                               "render covers the frame (ViewExtrapolator). render init: sampling starts part-way "
                               "from the noised renders (SDEdit). Renders come from the renders input, or are made "
                               "along the default path."}),
                "guidance_strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05,
                                                "tooltip": "x0 fusion weight: 1 replaces the prediction by the "
                                                           "render where fully covered, 0 turns fusion off."}),
                "guide_until": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 1.0, "step": 0.05,
                                          "tooltip": "Fraction of the steps that are fused (the first ones); the "
                                                     "model alone finishes the rest (0.6: 30 of 50 steps)."}),
                "mask_erosion": ("INT", {"default": 1, "min": 0, "max": 8, "step": 1,
                                         "tooltip": "Latent pixels (8 image pixels each) trimmed from the edge of the "
                                                    "rendered region, where renders are least reliable."}),
                "init_strength": ("FLOAT", {"default": 0.8, "min": 0.05, "max": 1.0, "step": 0.05,
                                            "tooltip": "render init: the part of the schedule that is run, starting "
                                                       "from the renders noised to that level (1 = from pure "
                                                       "noise)."}),
            },
            "optional": {
                "structure": ("RECONX_STRUCTURE", {"tooltip": "Point-cloud tokens (ReconX Encode Point Cloud); "
                                                              "needs trained structure-branch weights."}),
                "renders": ("RECONX_RENDERS", {"tooltip": "Point-cloud renders along the camera path (ReconX Render "
                                                          "Point Cloud), for ViewCrafter and render guidance; made "
                                                          "here along the model's default path when not connected."}),
            },
        }

    def interpolate(self, video_model, scene, prompt="", steps=50, cfg=7.5, structure_scale=1.0, frames=0,
                    frame_stride=0, seed=0, guidance="none", guidance_strength=1.0, guide_until=0.6, mask_erosion=1,
                    init_strength=0.8, structure=None, renders=None):
        from reconx_core.video import GuidanceSettings, interpolate_views

        if not isinstance(scene, Scene):
            raise InputError("scene must be a RECONX_SCENE")
        settings = GuidanceSettings(mode=guidance, strength=guidance_strength, until=guide_until,
                                    erosion=mask_erosion, init_strength=init_strength)
        managed = _video_model(video_model)
        model = managed.acquire()
        segments = len(scene) - 1
        progress = bridge.Progress(max(segments, 1) * steps)
        try:
            views = interpolate_views(model, scene, structure=structure, frames=frames or None, seed=seed,
                                      callback=progress.phase(max(segments, 1) * steps), renders=renders,
                                      guidance=settings, prompt=prompt.strip() or None, steps=steps, cfg=cfg,
                                      structure_scale=structure_scale, frame_stride=frame_stride or None)
        except InputError as error:
            raise InputError(f"{TITLE}: {error}") from None
        finally:
            managed.release()
        return (image_to_comfy(views.frames), views)


NODE_CLASS_MAPPINGS = {"ReconXEncodePointCloud": ReconXEncodePointCloud,
                       "ReconXInterpolate": ReconXInterpolate}
NODE_DISPLAY_NAME_MAPPINGS = {"ReconXEncodePointCloud": "ReconX Encode Point Cloud",
                              "ReconXInterpolate": TITLE}
