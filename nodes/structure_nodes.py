"""Structure nodes: point-cloud renders along the camera path, and frames from any video node as RECONX_VIEWS."""

from __future__ import annotations

import logging

from reconx_core.camera_path import SEGMENT_PATH_KINDS
from reconx_core.errors import InputError
from reconx_core.types import Scene

from . import comfy_bridge as bridge
from .convert import image_to_comfy, image_to_core

log = logging.getLogger("reconx")
CATEGORY = "ReconX"
AUTO = "auto"
RENDER_TITLE = "ReconX Render Point Cloud"
FRAMES_TITLE = "ReconX Frames To Views"


def _scene(scene, title: str) -> Scene:
    if not isinstance(scene, Scene):
        raise InputError(f"{title}: scene must be a RECONX_SCENE (the scene output of ReconX DUSt3R Global "
                         "Alignment)")
    if len(scene) < 2:
        raise InputError(f"{title}: the scene has {len(scene)} view; a path between photos needs at least 2")
    return scene


class ReconXRenderPointCloud:
    DESCRIPTION = ("Renders the scene's confident points along a camera path between its photos, as small "
                   "z-buffered splats (ViewCrafter's renderer: radius 0.01 of the half short side, 10 points per "
                   "pixel, holes black). These renders are what ViewCrafter takes as its condition and what "
                   "render-guided DynamiCrafter is pulled towards; connect the renders output to ReconX Interpolate "
                   "Views, or the IMAGE and MASK to any other video node. With a video model connected, size, "
                   "frames and path follow it.")
    CATEGORY = CATEGORY
    FUNCTION = "render"
    RETURN_TYPES = ("IMAGE", "MASK", "RECONX_RENDERS")
    RETURN_NAMES = ("renders", "coverage", "render_path")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "scene": ("RECONX_SCENE", {"tooltip": "The aligned photos, in the order the camera travels (ReconX "
                                                      "DUSt3R Global Alignment)."}),
                "path": ([AUTO, *SEGMENT_PATH_KINDS], {
                    "default": AUTO,
                    "tooltip": "Camera path between consecutive photos. linear: slerped rotation, straight line; "
                               "spline: a smooth curve through all photos; viewcrafter: ViewCrafter's own path (the "
                               "motion its checkpoints were trained on). auto: the video model's (viewcrafter for "
                               "ViewCrafter, linear otherwise)."}),
                "frames": ("INT", {"default": 0, "min": 0, "max": 256, "step": 1,
                                   "tooltip": "Frames per segment, both photos included. 0: the video model's "
                                              "(ViewCrafter 25 or 16, DynamiCrafter 16; 16 without a model)."}),
                "width": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8,
                                  "tooltip": "Render width. 0: the video model's (e.g. 512), or the scene's without "
                                             "one. The photos are centre-cropped to the render's aspect ratio."}),
                "height": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8,
                                   "tooltip": "Render height. 0: the video model's (e.g. 320), or the scene's."}),
                "point_radius": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 16.0, "step": 0.05,
                                           "tooltip": "Splat radius in pixels. 0: ViewCrafter's 0.01 of the half "
                                                      "short side (1.6 px at 512x320), at least 1 px."}),
                "max_points": ("INT", {"default": 0, "min": 0, "max": 20_000_000, "step": 1000,
                                       "tooltip": "Use at most this many of the scene's confident points (an even "
                                                  "subset); 0: all."}),
            },
            "optional": {
                "video_model": ("RECONX_VIDEO_MODEL", {
                    "tooltip": "The video model the renders are for (ReconX Video Model Loader): size, frames and "
                               "path then follow its backbone, and ViewCrafter's 576x1024 models get renders made at "
                               "half size and upsampled, as they were trained."}),
            },
        }

    def render(self, scene, path=AUTO, frames=0, width=0, height=0, point_radius=0.0, max_points=0,
               video_model=None):
        from reconx_core.structure import render_scene_path
        from reconx_core.video.backbones import get_backbone

        scene = _scene(scene, RENDER_TITLE)
        backbone, config = None, {}
        if video_model is not None:
            module = getattr(video_model, "module", None)
            if module is None or not hasattr(module, "config"):
                raise InputError(f"{RENDER_TITLE}: video_model must come from ReconX Video Model Loader")
            backbone, config = get_backbone(module), module.config
        if backbone is not None:
            h, w = config["resolution"]
            frames = frames or int(config.get("frames", backbone.frames))
            downsample = backbone.render_downsample if (width, height) in ((0, 0), (w, h)) else 1
            path = backbone.path if path == AUTO else path
            width, height = width or w, height or h
        else:
            frames, downsample = frames or 16, 1
            path = "linear" if path == AUTO else path
        progress = bridge.Progress(1)
        renders = render_scene_path(scene, frames, width, height, path=path, radius=point_radius or None,
                                    max_points=max_points, downsample=downsample, callback=progress.phase(1))
        log.info("%s: %d renders of %dx%d along a %s path from %d points (radius %.2f px), mean coverage %.2f",
                 RENDER_TITLE, len(renders), renders.size[1], renders.size[0], path, renders.info["points"],
                 renders.radius, float(renders.mask.mean()))
        return image_to_comfy(renders.frames), renders.mask.float().clamp(0, 1).contiguous(), renders


def parse_reference_frames(text: str, n_frames: int, n_views: int) -> list:
    """The frame index of each photo: "auto" (evenly spaced: 0, (S-1)/(K-1), ..., S-1) or a list like "0, 24, 48"
    (negative indices count from the end)."""
    text = (text or AUTO).strip()
    if text.lower() == AUTO:
        if n_views < 2 or (n_frames - 1) % (n_views - 1):
            raise InputError(f"{FRAMES_TITLE}: {n_frames} frames cannot hold {n_views} photos evenly spaced "
                             f"((frames - 1) must be a multiple of {n_views - 1}); write the photos' frame indices "
                             "in reference_frames, e.g. '0, 40, 80'")
        step = (n_frames - 1) // (n_views - 1)
        return [k * step for k in range(n_views)]
    try:
        index = [int(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise InputError(f"{FRAMES_TITLE}: reference_frames must be 'auto' or frame numbers separated by commas, "
                         f"got {text!r}") from None
    index = [i + n_frames if i < 0 else i for i in index]
    if len(index) != n_views:
        raise InputError(f"{FRAMES_TITLE}: {len(index)} reference frames given for the scene's {n_views} photos")
    if any(not 0 <= i < n_frames for i in index) or any(b <= a for a, b in zip(index, index[1:])):
        raise InputError(f"{FRAMES_TITLE}: reference frames {index} must increase and lie in [0, {n_frames})")
    return index


class ReconXFramesToViews:
    DESCRIPTION = ("Turns frames made by any video node (e.g. a first-last-frame model given the photos) into "
                   "RECONX_VIEWS for ReconX Confidence Mapping and ReconX Fit Gaussians: say which frames are the "
                   "photos, in the scene's order. When the photos are evenly spaced, the frames get their intended "
                   "cameras along the chosen path, and confidence mapping reports how far the recovered cameras are "
                   "from them.")
    CATEGORY = CATEGORY
    FUNCTION = "convert"
    RETURN_TYPES = ("RECONX_VIEWS",)
    RETURN_NAMES = ("views",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "frames": ("IMAGE", {"tooltip": "The video: all frames in order, the photos among them (any size; the "
                                            "photos' cameras are cropped to its aspect ratio)."}),
            "scene": ("RECONX_SCENE", {"tooltip": "The aligned photos the video was made from (ReconX DUSt3R Global "
                                                  "Alignment), in the same order."}),
            "reference_frames": ("STRING", {"default": AUTO, "multiline": False,
                                            "tooltip": "Frame index of each photo, e.g. '0, 24, 48' (negative counts "
                                                       "from the end). auto: evenly spaced, first and last frame "
                                                       "included."}),
            "path": (list(SEGMENT_PATH_KINDS), {
                "default": "linear",
                "tooltip": "The camera path the video is meant to follow, recorded as the frames' intended cameras "
                           "when the photos are evenly spaced (none otherwise)."}),
        }}

    def convert(self, frames, scene, reference_frames=AUTO, path="linear"):
        from reconx_core.structure import frames_to_views

        scene = _scene(scene, FRAMES_TITLE)
        images = image_to_core(frames, "frames", scene.device)
        index = parse_reference_frames(reference_frames, images.shape[0], len(scene))
        views = frames_to_views(images, scene, index, path=path)
        log.info("%s: %d frames, photos at %s, intended cameras %s", FRAMES_TITLE, len(views), index,
                 "along a " + path + " path" if views.intended_cameras is not None else "unknown")
        return (views,)


NODE_CLASS_MAPPINGS = {"ReconXRenderPointCloud": ReconXRenderPointCloud, "ReconXFramesToViews": ReconXFramesToViews}
NODE_DISPLAY_NAME_MAPPINGS = {"ReconXRenderPointCloud": RENDER_TITLE, "ReconXFramesToViews": FRAMES_TITLE}
