"""Datasets of the field's benchmarks, read into our conventions (OpenCV camera-to-world, pixel intrinsics with
pixel centres at integer coordinates, frames (T, 3, H, W) in [0, 1]).

- RealEstate10K and ACID in pixelSplat's chunk layout: `read_re10k_chunk(path) -> list[Clip]`, `Re10kDataset`.
- DL3DV in its nerfstudio layout: `read_dl3dv_scene(folder) -> Clip`, `Dl3dvDataset`.
- MVSplat's evaluation indices: `load_evaluation_index(path) -> {key: EvaluationEntry | None}`.
- The benchmarks' 256 x 256 frames: `rescale_and_crop(images_uint8, cameras, 256, 256)`.
- `open_dataset(root, split)` picks the reader from the folder's layout.
- `synthetic`: ray-cast test scenes written in both layouts (test data, not a benchmark).
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from ..errors import InputError
from .clip import Clip
from .dl3dv import Dl3dvDataset, Dl3dvScene, cameras_from_nerfstudio, cameras_to_nerfstudio, read_dl3dv_scene
from .index import EvaluationEntry, load_evaluation_index, parse_evaluation_index, selected_scenes, \
    write_evaluation_index
from .protocol import PROTOCOL_SIZE, rescale_and_crop, rescale_crop_geometry
from .re10k import EncodedClip, Re10kDataset, cameras_from_re10k, cameras_to_re10k, load_chunk, read_re10k_chunk


def open_dataset(root: Union[str, Path], split: str = "test", downscale: int = 1):
    """The reader for `root`: Re10kDataset when root (or root/split) holds *.torch chunks (RealEstate10K, ACID),
    Dl3dvDataset when its sub-folders hold transforms.json (DL3DV). Both offer keys() and
    views(key, indices) -> (images (N, H, W, 3) uint8, Cameras)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"data root {root} is not a folder")
    if any((root / split).glob("*.torch")) or any(root.glob("*.torch")):
        return Re10kDataset(root, split)
    if any(p.is_dir() and ((p / "transforms.json").is_file() or (p / "nerfstudio" / "transforms.json").is_file())
           for p in root.iterdir()):
        return Dl3dvDataset(root, downscale)
    raise InputError(f"{root} holds neither pixelSplat chunks ({split}/*.torch + index.json, RealEstate10K/ACID) "
                     "nor scene folders with transforms.json (DL3DV); see the README's Benchmarks section")


__all__ = ["Clip", "EncodedClip", "Re10kDataset", "read_re10k_chunk", "load_chunk", "cameras_from_re10k",
           "cameras_to_re10k", "Dl3dvDataset", "Dl3dvScene", "read_dl3dv_scene", "cameras_from_nerfstudio",
           "cameras_to_nerfstudio", "EvaluationEntry", "load_evaluation_index", "parse_evaluation_index",
           "write_evaluation_index", "selected_scenes", "PROTOCOL_SIZE", "rescale_and_crop", "rescale_crop_geometry",
           "open_dataset"]
