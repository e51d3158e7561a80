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
    nodes, links = two_photos()
    nodes += [
        {"id": 4, "type": "ReconXDust3rLoader", "pos": [340, 380], "size": [320, 110], "widgets": {"ckpt_name": DUST3R}},
        {"id": 5, "type": "ReconXDust3rAlign", "pos": [700, 120], "size": [340, 280]},
        {"id": 6, "type": "PreviewPointCloud", "pos": [1080, -420], "size": [400, 400]},
        {"id": 7, "type": "PreviewImage", "pos": [1080, 20], "size": [300, 260], "title": "Depth"},
        {"id": 8, "type": "ReconXFitGaussians", "pos": [1080, 320], "size": [340, 320]},
        {"id": 9, "type": "PreviewGaussianSplat", "pos": [1460, 0], "size": [400, 400]},
        {"id": 10, "type": "ReconXRenderGaussians", "pos": [1460, 440], "size": [320, 200]},
        {"id": 11, "type": "SaveAnimatedWEBP", "pos": [1820, 440], "size": [360, 360],
         "widgets": {"filename_prefix": "reconx/flythrough", "fps": 12.0}},
    ]
    links += [(3, 0, 5, "images"), (4, 0, 5, "dust3r"), (5, 3, 6, "model_3d"), (5, 1, 7, "images"),
              (5, 0, 8, "scene"), (8, 1, 9, "model_3d"), (8, 0, 10, "splat"), (5, 0, 10, "scene"),
              (10, 0, 11, "images")]
    return nodes, links


WORKFLOWS = {"reconx_geometry_only": geometry_only}


def build_all() -> dict:
    specs = node_specs()
    return {name: build_ui(*make(), specs) for name, make in WORKFLOWS.items()}


def main() -> int:
    out = REPO / "example_workflows"
    out.mkdir(exist_ok=True)
    for name, workflow in build_all().items():
        (out / f"{name}.json").write_text(json.dumps(workflow, indent=1) + "\n")
        print("wrote", out / f"{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
