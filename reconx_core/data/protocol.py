"""The benchmarks' image preparation: MVSplat / pixelSplat's `rescale_and_crop` to 256 x 256, intrinsics exact.

MVSplat (src/dataset/shims/crop_shim.py) turns each 360 x 640 RealEstate10K / ACID frame into 256 x 256 by
  1. scale = max(256 / 360, 256 / 640); resize to (round(360 scale), round(640 scale)) = 256 x 455 with PIL's
     LANCZOS filter on the 8-bit image;
  2. centre crop: row (256 - 256) // 2 = 0, column (455 - 256) // 2 = 99.
We do the same steps on the same 8-bit pixels, so the frames are identical. The intrinsics follow exactly
(pixel-centre rule of reconx_core.framing): fx' = fx w_scaled / W, cx' = (cx + 0.5) w_scaled / W - 0.5 - column,
likewise in y. MVSplat keeps the normalised principal point through the crop, which puts it half a pixel
from the true one here (its comment: "odd input dimensions induce half-pixel misalignments"); ours is exact.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from ..errors import InputError
from ..framing import scale_intrinsics
from ..types import Cameras
from .clip import uint8_to_float

PROTOCOL_SIZE = (256, 256)  # (height, width), MVSplat's and pixelSplat's test image_shape


def rescale_crop_geometry(height: int, width: int, out_h: int, out_w: int) -> Tuple[int, int, int, int]:
    """(scaled_h, scaled_w, row, col) of MVSplat's resize-then-centre-crop from height x width to out_h x out_w."""
    if out_h > height or out_w > width:
        raise InputError(f"frames of {width}x{height} are smaller than the protocol's {out_w}x{out_h}; MVSplat's "
                         "crop only shrinks (choose a smaller --image-size)")
    scale = max(out_h / height, out_w / width)
    scaled_h, scaled_w = round(height * scale), round(width * scale)
    return scaled_h, scaled_w, (scaled_h - out_h) // 2, (scaled_w - out_w) // 2


def rescale_and_crop(images: np.ndarray, cameras: Cameras, height: int = PROTOCOL_SIZE[0],
                     width: int = PROTOCOL_SIZE[1]) -> tuple:
    """MVSplat's test-time image preparation, with exact intrinsics.

    images: (N, H, W, 3) uint8 (the decoded frames) seen by `cameras` (size W x H).
    Returns (frames (N, 3, height, width) float32 in [0, 1], Cameras of that size, same poses).
    """
    from PIL import Image

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise InputError(f"images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
    N, H, W, _ = images.shape
    if len(cameras) != N or (cameras.height, cameras.width) != (H, W):
        raise InputError(f"{N} frames of {W}x{H} need {N} cameras of that size")
    scaled_h, scaled_w, row, col = rescale_crop_geometry(H, W, height, width)
    out = []
    for image in images:
        pil = Image.fromarray(image).resize((scaled_w, scaled_h), Image.LANCZOS)
        out.append(np.asarray(pil)[row:row + height, col:col + width])
    K = scale_intrinsics(cameras.intrinsics, scaled_w / W, scaled_h / H)
    K[:, 0, 2] -= col
    K[:, 1, 2] -= row
    return uint8_to_float(np.stack(out)), Cameras(cameras.cam_to_world.clone(), K, width, height)
