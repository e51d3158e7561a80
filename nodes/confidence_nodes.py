"""Stage 4 node: DUSt3R over the generated frames -> a camera and a confidence map per frame."""

from __future__ import annotations

import logging

from reconx_core.errors import InputError
from reconx_core.types import Views

from . import comfy_bridge as bridge
from .convert import image_to_comfy

log = logging.getLogger("reconx")
CATEGORY = "ReconX"


class ReconXConfidence:
    DESCRIPTION = ("Confidence mapping: runs DUSt3R over the generated frames (a sliding window plus links to the "
                   "reference frames), aligns them, and expresses every frame's camera and point map in the first "
                   "stage's frame and scale (the reference views anchor it). Each pixel gets a confidence in [0, 1] "
                   "from DUSt3R and from multi-view consistency, which the Gaussian fit uses as its loss weight.")
    CATEGORY = CATEGORY
    FUNCTION = "map_confidence"
    RETURN_TYPES = ("RECONX_VIEWS", "MASK", "IMAGE")
    RETURN_NAMES = ("views", "confidence", "frames")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "views": ("RECONX_VIEWS", {"tooltip": "Frames from ReconX Interpolate Views."}),
            "dust3r": ("RECONX_DUST3R", {"tooltip": "The DUSt3R network (ReconX DUSt3R Loader)."}),
            "window": ("INT", {"default": 3, "min": 1, "max": 16,
                               "tooltip": "Each frame is paired with this many neighbours on each side, plus the "
                                          "reference frames."}),
            "iterations": ("INT", {"default": 300, "min": 0, "max": 5000, "step": 10,
                                   "tooltip": "Global-alignment optimiser steps over the frames."}),
            "batch_size": ("INT", {"default": 8, "min": 1, "max": 64, "tooltip": "Pairs per DUSt3R forward."}),
        }}

    def map_confidence(self, views, dust3r, window=3, iterations=300, batch_size=8):
        from reconx_core.confidence import map_confidence

        if not isinstance(views, Views):
            raise InputError("views must be RECONX_VIEWS: connect the views output of ReconX Interpolate Views")
        if not isinstance(dust3r, bridge.ManagedModel):
            raise InputError("dust3r must come from the ReconX DUSt3R Loader node")
        model = dust3r.acquire()
        progress = bridge.Progress(100)
        out = map_confidence(model, views, window=window, niter=iterations, batch_size=batch_size,
                             callback=progress.phase(100))
        log.info("confidence mapping of %d frames: mean confidence %.3f", len(out), float(out.conf.mean()))
        return (out, out.conf.float().clamp(0, 1), image_to_comfy(out.frames))


NODE_CLASS_MAPPINGS = {"ReconXConfidence": ReconXConfidence}
NODE_DISPLAY_NAME_MAPPINGS = {"ReconXConfidence": "ReconX Confidence Mapping"}
