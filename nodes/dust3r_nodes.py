"""Stage 1 node: infer DUSt3R pair point maps and align all views in one frame."""

from __future__ import annotations

import logging
import re

import torch

from reconx_core.errors import InputError

from . import comfy_bridge as bridge
from .convert import confidence_to_mask, image_to_core

log = logging.getLogger("reconx")

CATEGORY = "ReconX"
TITLE = "ReconX DUSt3R Global Alignment"
SCENE_GRAPHS = ["complete", "swin-2", "swin-3", "swin-4", "swin-2-noncyclic", "swin-3-noncyclic", "oneref-0"]
# Optional photo inputs after `images`; each may have its own size.
EXTRA_PHOTOS = [f"image_{k}" for k in range(2, 9)]
# ComfyUI's batching nodes: both resize every image to the first one's size, centre-cropping other aspect ratios.
BATCH_NODES = {"BatchImagesNode": "Batch Images", "ImageBatch": "Batch Images (legacy)"}


class ReconXDust3rAlign:
    DESCRIPTION = ("Runs DUSt3R on every pair of the scene graph and solves the confidence-weighted global alignment: "
                   "one camera (pose and focal), depth map and point map per view, in one world frame. Photos may "
                   "have any sizes: connect them to images, image_2, image_3, ... (in the order the camera travels). "
                   "Outputs the scene for the next ReconX nodes, depth previews, confidences as a mask, and the point "
                   "cloud as a PLY for Preview Point Cloud.")
    CATEGORY = CATEGORY
    FUNCTION = "align"
    RETURN_TYPES = ("RECONX_SCENE", "IMAGE", "MASK", "FILE_3D_PLY")
    RETURN_NAMES = ("scene", "depth", "confidence", "point_cloud")

    @classmethod
    def INPUT_TYPES(cls):
        photo = ("Another photo of the scene, of any size (views follow the order images, image_2, image_3, ...). "
                 "Photos of another aspect ratio than most are centre-cropped to it, and the log says so.")
        return {
            "required": {
                "images": ("IMAGE", {
                    "tooltip": "The first photo, of any size; or several photos of one size as a batch. Connect "
                               "photos of other sizes to image_2, image_3, ... rather than through Batch Images, "
                               "which resizes and centre-crops every photo to the first one's size."}),
                "dust3r": ("RECONX_DUST3R", {"tooltip": "The network from ReconX DUSt3R Loader."}),
                "scene_graph": (SCENE_GRAPHS, {
                    "default": "complete",
                    "tooltip": "Which view pairs DUSt3R sees. complete: all pairs (best up to ~10 views); swin-k: "
                               "each view with its k neighbours (video-like order); oneref-i: every view with view "
                               "i."}),
                "iterations": ("INT", {"default": 300, "min": 0, "max": 5000, "step": 10,
                                       "tooltip": "Global-alignment optimiser steps (0 keeps the spanning-tree init; "
                                                  "two views need none)."}),
                "learning_rate": ("FLOAT", {"default": 0.01, "min": 0.0001, "max": 1.0, "step": 0.0001,
                                            "tooltip": "Adam learning rate of the alignment."}),
                "schedule": (["cosine", "linear"], {"default": "cosine", "tooltip": "Learning-rate decay."}),
                "min_confidence": ("FLOAT", {"default": 3.0, "min": 1.0, "max": 100.0, "step": 0.1,
                                             "tooltip": "Pixels whose DUSt3R confidence is below this are left out "
                                                        "of the point cloud (confidence >= 1)."}),
                "batch_size": ("INT", {"default": 8, "min": 1, "max": 64,
                                       "tooltip": "Pairs per network forward; lower it if the GPU runs out of "
                                                  "memory."}),
                "clean_point_cloud": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Drop points that another view sees in front of its own, more confident surface "
                               "(DUSt3R's clean-up of floaters between views)."}),
            },
            "optional": {name: ("IMAGE", {"tooltip": photo}) for name in EXTRA_PHOTOS},
            "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"},
        }

    def align(self, images, dust3r, scene_graph="complete", iterations=300, learning_rate=0.01,
              schedule="cosine", min_confidence=3.0, batch_size=8, clean_point_cloud=True, prompt=None,
              unique_id=None, **more_photos):
        from reconx_core.align import align_views, clean_scene
        from reconx_core.dust3r import infer_pairs, make_pair_edges, prepare_views
        from reconx_core.export import point_cloud_ply_bytes
        from reconx_core.preview import depth_preview

        if not isinstance(dust3r, bridge.ManagedModel):
            raise InputError(f"dust3r must come from the ReconX DUSt3R Loader node (connect its output to {TITLE})")
        unknown = sorted(set(more_photos) - set(EXTRA_PHOTOS))
        if unknown:
            raise InputError(f"{TITLE} has no input {unknown[0]}; photos go to images, {', '.join(EXTRA_PHOTOS)}")
        photos = photo_list(images, [(name, more_photos[name]) for name in EXTRA_PHOTOS
                                     if more_photos.get(name) is not None])
        if len(photos) < 2:
            raise InputError(f"{TITLE} needs at least 2 views, got {len(photos)}: connect a second photo to image_2 "
                             "(or give a batch of two or more photos of one size)")
        for warning in batch_resize_warnings(prompt, unique_id):
            log.warning("%s: %s", TITLE, warning)
        model = dust3r.acquire()
        size = int(getattr(model, "image_size", 512))
        views, cut = prepare_views(photos, size=size)
        if cut:
            h, w = views.shape[-2:]
            log.warning("%s: view(s) %s have another aspect ratio than most photos and were centre-cropped to %dx%d "
                        "(the later ReconX stages need one size); crop them yourself to choose what is kept",
                        TITLE, ", ".join(str(k + 1) for k in cut), w, h)
        views = views.to(dust3r.device)
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


def photo_list(images, more: list) -> list:
    """Every photo as its own (3, H, W) float tensor in [0, 1]: the frames of `images`, then of each (name, IMAGE)
    in `more`. Each input may have its own size; each is checked (shape, channels, finite pixels) under its name."""
    photos = []
    for name, batch in [("images", images)] + list(more):
        photos += list(image_to_core(batch, name).unbind(0))
    return photos


def batch_resize_warnings(prompt, unique_id) -> list:
    """What ComfyUI's Batch Images did to the photos feeding `images`, read from the queued graph (hidden PROMPT).

    Batch Images resizes every image to the first one's size, centre-cropping other aspect ratios, before this
    node sees them: the pixels alone cannot show it, but the graph names the Load Image files, whose sizes are
    read from their headers. Returns one message per photo that was cropped or resized ([] outside ComfyUI, or
    when the photos do not come from Load Image nodes through a batching node).
    """
    if not isinstance(prompt, dict) or unique_id is None:
        return []
    try:
        link = prompt[str(unique_id)]["inputs"].get("images")
        batch = prompt[str(link[0])] if isinstance(link, list) else None
        if batch is None or batch.get("class_type") not in BATCH_NODES:
            return []
        # the batch's inputs in order: images.image0, images.image1, ... (Batch Images) or image1, image2 (legacy)
        slots = sorted((k for k, v in batch["inputs"].items() if isinstance(v, list)),
                       key=lambda k: int(re.findall(r"\d+", k)[-1]) if re.findall(r"\d+", k) else 0)
        sizes = []
        for slot in slots:
            source = prompt[str(batch["inputs"][slot][0])]
            size = _input_image_size(source["inputs"].get("image")) if source.get("class_type") == "LoadImage" else None
            sizes.append((source["inputs"].get("image"), size))
    except (KeyError, IndexError, TypeError, ValueError, OSError) as err:
        log.debug("could not read the photos' sizes from the graph: %s", err)
        return []
    if not sizes or sizes[0][1] is None:
        return []
    name0, (w0, h0) = sizes[0]
    node_name = BATCH_NODES[batch["class_type"]]
    warnings = []
    for k, (name, size) in enumerate(sizes[1:], start=2):
        if size is None or size == (w0, h0):
            continue
        w, h = size
        if w * h0 != h * w0:
            kept = min(w / h * h0 / w0, h / w * w0 / h0)
            warnings.append(f"{node_name} cropped photo {k} ({name}, {w}x{h}) to the first photo's aspect ratio "
                            f"({name0}, {w0}x{h0}), dropping {100 * (1 - kept):.0f}% of it, and resized it. Connect "
                            f"each photo to its own input (images, image_2, ...) instead: this node takes any sizes")
        else:
            warnings.append(f"{node_name} resized photo {k} ({name}, {w}x{h}) to the first photo's {w0}x{h0}. "
                            "Connect each photo to its own input (images, image_2, ...) to keep its resolution")
    return warnings


def _input_image_size(name):
    """(width, height) of an image in ComfyUI's input folder as Load Image gives it (EXIF rotation applied), read
    from the file's header; None when unknown."""
    if not isinstance(name, str) or bridge.folder_paths is None:
        return None
    from PIL import Image

    with Image.open(bridge.folder_paths.get_annotated_filepath(name)) as im:
        w, h = im.size
        if im.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that swap the axes
            w, h = h, w
    return w, h


NODE_CLASS_MAPPINGS = {"ReconXDust3rAlign": ReconXDust3rAlign}
NODE_DISPLAY_NAME_MAPPINGS = {"ReconXDust3rAlign": TITLE}
