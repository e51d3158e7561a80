"""Writers for results that leave the library: coloured point clouds as PLY.

(Gaussians have their own INRIA-layout PLY in `reconx_core.gaussians.ply`.)
"""

from __future__ import annotations

import io

import numpy as np
import torch
from plyfile import PlyData, PlyElement

from .errors import InputError


def point_cloud_ply_bytes(points: torch.Tensor, colours: torch.Tensor) -> bytes:
    """A binary little-endian PLY of coloured points (x, y, z float32; red, green, blue uchar).

    points:  (M, 3) float, any frame (normally world).
    colours: (M, 3) float in [0, 1].
    """
    if points.ndim != 2 or points.shape[-1] != 3 or colours.shape != points.shape:
        raise InputError(f"points {tuple(points.shape)} and colours {tuple(colours.shape)} must both be (M, 3)")
    if points.shape[0] == 0:
        raise InputError("the point cloud is empty: lower the minimum confidence so that some points remain")
    xyz = points.detach().float().cpu().numpy()
    rgb = (colours.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    vertex = np.empty(xyz.shape[0], dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"),
                                           ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    vertex["x"], vertex["y"], vertex["z"] = xyz.T
    vertex["red"], vertex["green"], vertex["blue"] = rgb.T
    buffer = io.BytesIO()
    PlyData([PlyElement.describe(vertex, "vertex")], byte_order="<").write(buffer)
    return buffer.getvalue()


def read_point_cloud_ply(data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `point_cloud_ply_bytes`: (points (M,3) float32, colours (M,3) float32 in [0,1])."""
    vertex = PlyData.read(io.BytesIO(data))["vertex"]
    xyz = np.stack([vertex["x"], vertex["y"], vertex["z"]], axis=1).astype(np.float32)
    rgb = np.stack([vertex["red"], vertex["green"], vertex["blue"]], axis=1).astype(np.float32) / 255.0
    return torch.from_numpy(xyz), torch.from_numpy(rgb)
