#!/usr/bin/env python3
"""Writes example_workflows/*.json (UI format) from the compact graphs below, using the nodes' own specs, so the
widget lists always match the node definitions. Run it after changing a node's inputs; tests/test_workflows.py
checks that the committed files are what this script writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_workflows import REPO, build_ui, node_specs  # noqa: E402

DUST3R = "DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth"
DYNAMICRAFTER = "dynamicrafter_512_interp.ckpt"
MODELS_LINE = (f"models/dust3r/{DUST3R} must exist (see the pack's README for the download links; any DUSt3R or "
               "MASt3R checkpoint works).")
PHOTOS_LINE = ("Put your photos in the Load Image nodes, in the order the camera should travel. They may have any "
               "sizes: each goes to its own input of 'ReconX DUSt3R Global Alignment' (images, image_2, ... "
               "image_8); avoid Batch Images, which crops every photo to the first one's size.")
LPIPS_LINE = ("LPIPS needs alexnet-owt-7be5be79.pth in models/reconx (checked when you queue the prompt); set "
              "lpips_weight to 0 in 'ReconX Fit Gaussians' to fit without it.")
GEOMETRY_NOTE = (
    "ReconX, geometry only: photos -> DUSt3R -> 3D Gaussians (no video model)\n\n"
    f"1. {PHOTOS_LINE}\n"
    f"2. {MODELS_LINE}\n"
    f"3. {LPIPS_LINE}\n"
    "4. Preview Point Cloud shows DUSt3R's aligned points, Preview Splat the fitted Gaussians; the fly-through "
    "video is saved as output/reconx/flythrough_*.webp.")


def pipeline_note(n_photos: int) -> str:
    first = ("Two photos, the paper's setting: the video model generates the views between them."
             if n_photos == 2 else
             f"{n_photos} photos: K photos give K-1 interpolated segments that share their end frames; connect "
             "more Load Image nodes to image_4 ... image_8 for more.")
    return (
        "ReconX pipeline: photos -> DUSt3R -> video interpolation -> confidence -> 3D Gaussians\n\n"
        f"{first}\n\n"
        f"1. {PHOTOS_LINE}\n"
        f"2. {MODELS_LINE} models/reconx/{DYNAMICRAFTER} (DynamiCrafter_512_Interp's model.ckpt, renamed) must "
        "exist too.\n"
        "3. 'ReconX Encode Point Cloud' is bypassed: the structure branch needs trained weights (a .safetensors in "
        "models/reconx, picked in the video model loader). With them, un-bypass it (Ctrl+B) and the interpolation "
        "becomes structure-guided; without, it is plain DynamiCrafter interpolation.\n"
        f"4. {LPIPS_LINE}")


def photo_nodes(n_photos: int, x: int = 0, align_id: int = 5):
    """n Load Image nodes (ids 1..n), each wired to its own photo input of the alignment node (images, image_2,
    ...), so photos of any size reach it uncropped."""
    nodes, links = [], []
    for k in range(n_photos):
        nodes.append({"id": k + 1, "type": "LoadImage", "pos": [x, 360 * k], "size": [300, 320],
                      "title": f"Photo {k + 1}", "widgets": {"image": "example.png"}})
        links.append((k + 1, 0, align_id, "images" if k == 0 else f"image_{k + 1}"))
    return nodes, links


def two_photos(x: int = 0):
    """LoadImage x2 -> Batch Images: the start of every ReconX graph (pick your own photos)."""
    nodes = [
        {"id": 1, "type": "LoadImage", "pos": [x, 0], "size": [300, 320], "title": "Photo 1",
         "widgets": {"image": "example.png"}},
        {"id": 2, "type": "LoadImage", "pos": [x, 360], "size": [300, 320], "title": "Photo 2",
         "widgets": {"image": "example.png"}},
        {"id": 3, "type": "BatchImagesNode", "pos": [x + 340, 200], "size": [220, 80],
         "link_inputs": ["images.image0", "images.image1"]},
    ]
    links = [(1, 0, 3, "images.image0"), (2, 0, 3, "images.image1")]
    return nodes, links


def geometry_only():
    """Photos -> DUSt3R global alignment -> confidence-aware 3DGS -> splat preview and a fly-through video."""
    nodes, links = photo_nodes(2)
    nodes += [
        {"id": 4, "type": "ReconXDust3rLoader", "pos": [340, 480], "size": [320, 110], "widgets": {"ckpt_name": DUST3R}},
        {"id": 5, "type": "ReconXDust3rAlign", "pos": [700, 120], "size": [340, 420]},
        {"id": 6, "type": "PreviewPointCloud", "pos": [1080, -420], "size": [400, 400]},
        # room below for the depth image, which the preview grows to show
        {"id": 7, "type": "PreviewImage", "pos": [1080, 20], "size": [340, 340], "title": "Depth"},
        {"id": 8, "type": "ReconXFitGaussians", "pos": [1080, 420], "size": [340, 320]},
        {"id": 9, "type": "PreviewGaussianSplat", "pos": [1460, 0], "size": [400, 400]},
        {"id": 10, "type": "ReconXRenderGaussians", "pos": [1460, 440], "size": [320, 200]},
        {"id": 11, "type": "SaveAnimatedWEBP", "pos": [1820, 440], "size": [360, 360],
         "widgets": {"filename_prefix": "reconx/flythrough", "fps": 12.0}},
        {"id": 12, "type": "Note", "pos": [0, -420], "size": [660, 380], "text": GEOMETRY_NOTE},
    ]
    links += [(4, 0, 5, "dust3r"), (5, 3, 6, "model_3d"), (5, 1, 7, "images"),
              (5, 0, 8, "scene"), (8, 1, 9, "model_3d"), (8, 0, 10, "splat"), (5, 0, 10, "scene"),
              (10, 0, 11, "images")]
    return nodes, links


def full_pipeline(n_photos: int):
    """Photos -> DUSt3R alignment -> (structure) -> video interpolation -> confidence mapping -> 3DGS -> video."""
    nodes, links = photo_nodes(n_photos)
    nodes += [
        {"id": 4, "type": "ReconXDust3rLoader", "pos": [340, 420], "size": [320, 110], "widgets": {"ckpt_name": DUST3R}},
        {"id": 5, "type": "ReconXDust3rAlign", "pos": [700, 120], "size": [340, 420]},
        {"id": 6, "type": "PreviewPointCloud", "pos": [700, -420], "size": [400, 400]},
        {"id": 7, "type": "ReconXVideoModelLoader", "pos": [700, 580], "size": [340, 230],
         "widgets": {"ckpt_name": DYNAMICRAFTER}},
        {"id": 8, "type": "ReconXEncodePointCloud", "pos": [1080, 580], "size": [300, 100], "mode": 4},
        {"id": 9, "type": "ReconXInterpolate", "pos": [1420, 120], "size": [340, 330]},
        {"id": 10, "type": "SaveAnimatedWEBP", "pos": [1800, -420], "size": [360, 380],
         "widgets": {"filename_prefix": "reconx/interpolated", "fps": 8.0}},
        {"id": 11, "type": "ReconXConfidence", "pos": [1800, 120], "size": [320, 170]},
        {"id": 12, "type": "PreviewImage", "pos": [2160, -420], "size": [320, 380], "title": "Confidence"},
        {"id": 13, "type": "MaskToImage", "pos": [2160, 120], "size": [220, 60]},
        {"id": 14, "type": "ReconXFitGaussians", "pos": [2160, 300], "size": [340, 340]},
        {"id": 15, "type": "PreviewGaussianSplat", "pos": [2540, -420], "size": [400, 400]},
        {"id": 16, "type": "ReconXRenderGaussians", "pos": [2540, 120], "size": [320, 200]},
        {"id": 17, "type": "SaveAnimatedWEBP", "pos": [2900, 120], "size": [360, 380],
         "widgets": {"filename_prefix": "reconx/flythrough", "fps": 12.0}},
        {"id": 18, "type": "Note", "pos": [0, -420], "size": [660, 380], "text": pipeline_note(n_photos)},
    ]
    links += [(4, 0, 5, "dust3r"), (5, 3, 6, "model_3d"),
              (5, 0, 8, "scene"), (7, 0, 8, "video_model"),
              (7, 0, 9, "video_model"), (5, 0, 9, "scene"), (8, 0, 9, "structure"),
              (9, 0, 10, "images"), (9, 1, 11, "views"), (4, 0, 11, "dust3r"),
              (11, 1, 13, "mask"), (13, 0, 12, "images"),
              (5, 0, 14, "scene"), (11, 0, 14, "views"), (14, 1, 15, "model_3d"),
              (14, 0, 16, "splat"), (5, 0, 16, "scene"), (16, 0, 17, "images")]
    return nodes, links


HELD_OUT_NOTE = (
    "ReconX, held-out evaluation: how good is the reconstruction on a photo it never saw?\n\n"
    "1. Photos 1 and 2 make the reconstruction (DUSt3R -> 3D Gaussians); Photo 3 is held out: it goes only to "
    "'ReconX Evaluate Held-out Photos'. Use three photos of the same size and orientation.\n"
    f"2. {MODELS_LINE}\n"
    "3. The evaluation aligns all three photos with DUSt3R, carries Photo 3's camera into the reconstruction "
    "through Photos 1 and 2, renders the Gaussians there and reports PSNR, SSIM and LPIPS (as MVSplat computes "
    "them) in 'Preview as Text', with truth | render | error in the image preview. LPIPS (vgg) needs "
    "vgg16-397923af.pth in models/reconx, checked when you queue; set lpips to off to skip it.")


def held_out_evaluation():
    """Photos 1-2 -> DUSt3R -> 3DGS; Photo 3 held out -> ReconX Evaluate Held-out Photos -> text + comparison."""
    nodes, links = photo_nodes(2)
    nodes += [
        {"id": 3, "type": "LoadImage", "pos": [0, 760], "size": [300, 320], "title": "Photo 3 (held out)",
         "widgets": {"image": "example.png"}},
        {"id": 4, "type": "ReconXDust3rLoader", "pos": [340, 480], "size": [320, 110], "widgets": {"ckpt_name": DUST3R}},
        {"id": 5, "type": "ReconXDust3rAlign", "pos": [700, 120], "size": [340, 420]},
        {"id": 8, "type": "ReconXFitGaussians", "pos": [1080, 120], "size": [340, 320]},
        {"id": 9, "type": "ReconXEvaluateHeldOut", "pos": [1460, 120], "size": [340, 220]},
        {"id": 10, "type": "PreviewAny", "pos": [1840, -200], "size": [420, 280], "title": "Held-out metrics"},
        {"id": 11, "type": "PreviewImage", "pos": [1840, 120], "size": [420, 380], "title": "Truth | render | error"},
        {"id": 12, "type": "Note", "pos": [0, -420], "size": [660, 380], "text": HELD_OUT_NOTE},
    ]
    links += [(4, 0, 5, "dust3r"), (5, 0, 8, "scene"), (8, 0, 9, "splat"), (5, 0, 9, "scene"), (4, 0, 9, "dust3r"),
              (3, 0, 9, "held_out"), (9, 0, 10, "source"), (9, 1, 11, "images")]
    return nodes, links


WORKFLOWS = {"reconx_geometry_only": geometry_only,
             "reconx_two_views": lambda: full_pipeline(2),
             "reconx_multi_view": lambda: full_pipeline(3)}


# The view a template opens with (LiteGraph: screen = (graph position + offset) * scale): the Note and the photos
# at the top left, the whole graph on a 1600 px wide screen.
VIEWS = {"reconx_geometry_only": {"scale": 0.6, "offset": [33, 453]},
         "reconx_two_views": {"scale": 0.45, "offset": [44, 464]},
         "reconx_multi_view": {"scale": 0.45, "offset": [44, 464]}}


WORKFLOWS["reconx_evaluate_held_out"] = held_out_evaluation
VIEWS["reconx_evaluate_held_out"] = {"scale": 0.6, "offset": [33, 453]}


# ----------------------------------------------------------------------------------------------- structure guidance
# Two templates where the video model sees the scene's structure today: ViewCrafter conditioned on point-cloud
# renders, and DynamiCrafter-512-interp pulled towards them (render guidance).
VIEWCRAFTER = "viewcrafter_25_512.ckpt"
RENDERS_LINE = ("'ReconX Render Point Cloud' renders DUSt3R's points along the camera path between the photos "
                "(size, frames and path follow the video model); the renders video is saved as "
                "output/reconx/renders_*.webp, so you see what guides the video model. Its IMAGE and MASK outputs "
                "can feed any other video node too.")
VIEWCRAFTER_NOTE = (
    "ReconX with ViewCrafter: photos -> DUSt3R -> point-cloud renders -> ViewCrafter -> confidence -> 3D Gaussians\n\n"
    f"1. {PHOTOS_LINE}\n"
    f"2. {MODELS_LINE} models/reconx/{VIEWCRAFTER} (ViewCrafter_25_512's model.ckpt from Hugging Face "
    "Drexubery/ViewCrafter_25_512, renamed so that the name says what it is; Apache-2.0) must exist too. For "
    "ViewCrafter_25 / _25_sparse / _16 (576x1024) name the file accordingly or pick the backbone in the loader.\n"
    f"3. {RENDERS_LINE}\n"
    "4. ViewCrafter takes the renders, with the photos at both ends, as its condition: frames, frame stride and "
    "prompt at 0 / empty use its own (25 frames, fs 10, 'Rotating view of a scene').\n"
    f"5. {LPIPS_LINE}")
RENDER_GUIDED_NOTE = (
    "ReconX, render-guided DynamiCrafter: photos -> DUSt3R -> point-cloud renders -> DynamiCrafter-512-interp "
    "pulled towards the renders -> confidence -> 3D Gaussians\n\n"
    f"1. {PHOTOS_LINE}\n"
    f"2. {MODELS_LINE} models/reconx/{DYNAMICRAFTER} (DynamiCrafter_512_Interp's model.ckpt, renamed) must exist "
    "too.\n"
    f"3. {RENDERS_LINE}\n"
    "4. guidance 'x0 fusion': for the first 60 % of the steps (guide_until) the model's predicted frames are "
    "replaced by the renders where the renders cover them; the model fills the holes and finishes the details. "
    "Lower guidance_strength to trust the renders less; 'render init' starts from the noised renders instead.\n"
    f"5. {LPIPS_LINE}")


def structure_guided(checkpoint: str, backbone: str, guidance: str, note: str):
    """Photos -> DUSt3R -> point-cloud renders along the path -> video model (conditioned on or guided by the
    renders) -> confidence mapping -> 3DGS -> fly-through."""
    nodes, links = photo_nodes(2)
    nodes += [
        {"id": 4, "type": "ReconXDust3rLoader", "pos": [340, 480], "size": [320, 110], "widgets": {"ckpt_name": DUST3R}},
        {"id": 5, "type": "ReconXDust3rAlign", "pos": [700, 120], "size": [340, 420]},
        {"id": 6, "type": "PreviewPointCloud", "pos": [700, -420], "size": [400, 400]},
        {"id": 7, "type": "ReconXVideoModelLoader", "pos": [700, 580], "size": [340, 260],
         "widgets": {"ckpt_name": checkpoint, "backbone": backbone}},
        {"id": 8, "type": "ReconXRenderPointCloud", "pos": [1080, 300], "size": [320, 240]},
        {"id": 9, "type": "SaveAnimatedWEBP", "pos": [1080, -420], "size": [340, 380], "title": "Point-cloud renders",
         "widgets": {"filename_prefix": "reconx/renders", "fps": 8.0}},
        {"id": 10, "type": "ReconXInterpolate", "pos": [1440, 120], "size": [340, 480],
         "widgets": {"guidance": guidance}},
        {"id": 11, "type": "SaveAnimatedWEBP", "pos": [1820, -420], "size": [360, 380],
         "widgets": {"filename_prefix": "reconx/interpolated", "fps": 8.0}},
        {"id": 12, "type": "ReconXConfidence", "pos": [1820, 120], "size": [320, 170]},
        {"id": 13, "type": "MaskToImage", "pos": [2180, 120], "size": [220, 60]},
        {"id": 14, "type": "PreviewImage", "pos": [2180, -420], "size": [320, 380], "title": "Confidence"},
        {"id": 15, "type": "ReconXFitGaussians", "pos": [2180, 300], "size": [340, 340]},
        {"id": 16, "type": "PreviewGaussianSplat", "pos": [2560, -420], "size": [400, 400]},
        {"id": 17, "type": "ReconXRenderGaussians", "pos": [2560, 120], "size": [320, 200]},
        {"id": 18, "type": "SaveAnimatedWEBP", "pos": [2920, 120], "size": [360, 380],
         "widgets": {"filename_prefix": "reconx/flythrough", "fps": 12.0}},
        {"id": 19, "type": "Note", "pos": [0, -420], "size": [660, 380], "text": note},
    ]
    links += [(4, 0, 5, "dust3r"), (5, 3, 6, "model_3d"),
              (5, 0, 8, "scene"), (7, 0, 8, "video_model"), (8, 0, 9, "images"),
              (7, 0, 10, "video_model"), (5, 0, 10, "scene"), (8, 2, 10, "renders"),
              (10, 0, 11, "images"), (10, 1, 12, "views"), (4, 0, 12, "dust3r"),
              (12, 1, 13, "mask"), (13, 0, 14, "images"),
              (5, 0, 15, "scene"), (12, 0, 15, "views"), (15, 1, 16, "model_3d"),
              (15, 0, 17, "splat"), (5, 0, 17, "scene"), (17, 0, 18, "images")]
    return nodes, links


WORKFLOWS["reconx_viewcrafter"] = lambda: structure_guided(VIEWCRAFTER, "viewcrafter_25_512", "none",
                                                           VIEWCRAFTER_NOTE)
WORKFLOWS["reconx_render_guided"] = lambda: structure_guided(DYNAMICRAFTER, "auto", "x0 fusion", RENDER_GUIDED_NOTE)
VIEWS["reconx_viewcrafter"] = {"scale": 0.45, "offset": [44, 464]}
VIEWS["reconx_render_guided"] = {"scale": 0.45, "offset": [44, 464]}


def build_all() -> dict:
    specs = node_specs()
    workflows = {name: build_ui(*make(), specs) for name, make in WORKFLOWS.items()}
    for name, view in VIEWS.items():
        workflows[name]["extra"]["ds"] = dict(view)
    return workflows


def main() -> int:
    out = REPO / "example_workflows"
    out.mkdir(exist_ok=True)
    for name, workflow in build_all().items():
        (out / f"{name}.json").write_text(json.dumps(workflow, indent=1) + "\n")
        print("wrote", out / f"{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
