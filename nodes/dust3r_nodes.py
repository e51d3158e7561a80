"""Stage 1 node: infer DUSt3R pair point maps and align all views in one frame."""

from __future__ import annotations

import logging

import torch

from reconx_core.errors import InputError

from . import comfy_bridge as bridge
from .convert import confidence_to_mask, image_to_core

log = logging.getLogger("reconx")

CATEGORY = "ReconX"
SCENE_GRAPHS = ["complete", "swin-2", "swin-3", "swin-4", "swin-2-noncyclic", "swin-3-noncyclic", "oneref-0"]


class ReconXDust3rAlign:
    DESCRIPTION = ("Runs DUSt3R on every pair of the scene graph and solves the confidence-weighted global alignment: "
                   "one camera (pose and focal), depth map and point map per view, in one world frame. Outputs the "
                   "scene for the next ReconX nodes, depth previews, confidences as a mask, and the point cloud as a "
                   "PLY for Preview Point Cloud.")
    CATEGORY = CATEGORY
    FUNCTION = "align"
    RETURN_TYPES = ("RECONX_SCENE", "IMAGE", "MASK", "FILE_3D_PLY")
    RETURN_NAMES = ("scene", "depth", "confidence", "point_cloud")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "Two or more photos of the scene as one batch (Batch Images node)."}),
            "dust3r": ("RECONX_DUST3R", {"tooltip": "The network from ReconX DUSt3R Loader."}),
            "scene_graph": (SCENE_GRAPHS, {
                "default": "complete",
                "tooltip": "Which view pairs DUSt3R sees. complete: all pairs (best up to ~10 views); swin-k: each "
                           "view with its k neighbours (video-like order); oneref-i: every view with view i."}),
            "iterations": ("INT", {"default": 300, "min": 0, "max": 5000, "step": 10,
                                   "tooltip": "Global-alignment optimiser steps (0 keeps the spanning-tree init)."}),
            "learning_rate": ("FLOAT", {"default": 0.01, "min": 1e-5, "max": 1.0, "step": 0.001,
                                        "tooltip": "Adam learning rate of the alignment."}),
            "schedule": (["cosine", "linear"], {"default": "cosine", "tooltip": "Learning-rate decay."}),
            "min_confidence": ("FLOAT", {"default": 3.0, "min": 1.0, "max": 100.0, "step": 0.1,
                                         "tooltip": "Pixels whose DUSt3R confidence is below this are left out of "
                                                    "the point cloud (confidence >= 1)."}),
            "batch_size": ("INT", {"default": 8, "min": 1, "max": 64,
                                   "tooltip": "Pairs per network forward; lower it if the GPU runs out of memory."}),
            "clean_point_cloud": ("BOOLEAN", {
                "default": True,
                "tooltip": "Drop points that another view sees in front of its own, more confident surface "
                           "(DUSt3R's clean-up of floaters between views)."}),
        }}

    def align(self, images, dust3r, scene_graph="complete", iterations=300, learning_rate=0.01,
              schedule="cosine", min_confidence=3.0, batch_size=8, clean_point_cloud=True):
        from reconx_core.align import align_views, clean_scene
        from reconx_core.dust3r import infer_pairs, make_pair_edges, prepare_images
        from reconx_core.export import point_cloud_ply_bytes
        from reconx_core.preview import depth_preview

        if not isinstance(dust3r, bridge.ManagedModel):
            raise InputError("dust3r must come from the ReconX DUSt3R Loader node")
        views = image_to_core(images, "images")
        if views.shape[0] < 2:
            raise InputError(f"ReconX DUSt3R Global Alignment needs at least 2 views, got {views.shape[0]}; batch "
                             "two or more photos with a Batch Images node")
        model = dust3r.acquire()
        size = int(getattr(model, "image_size", 512))
        views = prepare_images(views, size=size).to(dust3r.device)
        n_pairs = make_pair_edges(views.shape[0], scene_graph).shape[0]
        progress = bridge.Progress(n_pairs + max(iterations, 1))
        with torch.inference_mode():
            pairs = infer_pairs(model, views, graph=scene_graph, batch_size=batch_size,
                                callback=progress.phase(n_pairs))
        pairs = pairs.to(dust3r.device, torch.float32)
        scene = align_views(pairs, niter=iterations, lr=learning_rate, schedule=schedule,
                            min_conf_thr=min_confidence, callback=progress.phase(max(iterations, 1)))
        if clean_point_cloud:
            scene = clean_scene(scene)
        valid = scene.confident_mask()
        ply = point_cloud_ply_bytes(*scene.confident_points())
        if scene.info.get("mode") == "pairviewer":
            log.info("aligned 2 views with DUSt3R's pair viewer (two views need no optimisation, so there is no "
                     "alignment loss): %d points", int(valid.sum()))
        else:
            log.info("aligned %d views (%d pairs): loss %.5f, %d points", len(scene), n_pairs,
                     float(scene.info["loss"]), int(valid.sum()))
        return (scene, depth_preview(scene.depths, valid), confidence_to_mask(scene.conf),
                bridge.make_file3d(ply, "ply"))


NODE_CLASS_MAPPINGS = {"ReconXDust3rAlign": ReconXDust3rAlign}
NODE_DISPLAY_NAME_MAPPINGS = {"ReconXDust3rAlign": "ReconX DUSt3R Global Alignment"}
