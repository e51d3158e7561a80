"""Fitting views to another model's resolution: centre crop to the target aspect, then resize, with the
intrinsics following exactly (pixel centres at integer coordinates, as everywhere in reconx_core)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import InputError
from .types import Cameras


def crop_box(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int, int, int]:
    """(x0, y0, w, h): the largest centred box of the target aspect ratio inside a width x height image."""
    if min(width, height, target_w, target_h) <= 0:
        raise InputError(f"sizes must be positive, got {width}x{height} -> {target_w}x{target_h}")
    if width * target_h > height * target_w:  # too wide: crop the sides
        w, h = round(height * target_w / target_h), height
    else:
        w, h = width, round(width * target_h / target_w)
    return (width - w) // 2, (height - h) // 2, w, h


def scale_intrinsics(intrinsics: torch.Tensor, sx: float, sy: float, x0: float = 0.0, y0: float = 0.0) -> torch.Tensor:
    """Intrinsics (N, 3, 3) after cropping at (x0, y0) and resizing by (sx, sy) with align_corners=False.

    Pixel centres sit at integer coordinates, so a pixel u of the crop lands at u' = s (u + 0.5) - 0.5:
    cx' = sx (cx - x0 + 0.5) - 0.5, fx' = sx fx (and likewise in y). Returns a new tensor.
    """
    K = intrinsics.clone()
    K[:, 0, 0] *= sx
    K[:, 1, 1] *= sy
    K[:, 0, 2] = sx * (K[:, 0, 2] - x0 + 0.5) - 0.5
    K[:, 1, 2] = sy * (K[:, 1, 2] - y0 + 0.5) - 0.5
    return K


def crop_resize(images: torch.Tensor, cameras: Cameras, height: int, width: int) -> tuple[torch.Tensor, Cameras]:
    """Centre-crop to the aspect of (height, width), resize to it, and move the intrinsics along.

    images: (N, 3, H, W) float in [0, 1] seen by `cameras` (size W x H).
    Returns images (N, 3, height, width) and Cameras of that size (same poses).
    A pixel u of the cropped image becomes u' = s (u + 0.5) - 0.5 after resizing by s (align_corners=False),
    so cx' = s (cx - x0 + 0.5) - 0.5 and fx' = s fx.
    """
    N, _, H, W = images.shape
    if (cameras.height, cameras.width) != (H, W) or len(cameras) != N:
        raise InputError(f"{N} images of {W}x{H} need {N} cameras of that size, got {len(cameras)} of "
                         f"{cameras.width}x{cameras.height}")
    x0, y0, w, h = crop_box(W, H, width, height)
    cropped = images[:, :, y0:y0 + h, x0:x0 + w]
    sx, sy = width / w, height / h
    resized = cropped if (h, w) == (height, width) else F.interpolate(
        cropped, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    K = scale_intrinsics(cameras.intrinsics, sx, sy, x0, y0)
    return resized.clamp(0, 1), Cameras(cameras.cam_to_world.clone(), K, width, height)


def median_depths(depths, conf=None, min_conf: float | None = None):
    """(N,) median depth of each view over its confident pixels (all pixels where none pass).

    depths: (N, H, W); conf: optional (N, H, W) with `min_conf` the threshold.
    """
    out = []
    for i in range(depths.shape[0]):
        d = depths[i]
        if conf is not None and min_conf is not None and bool((conf[i] > min_conf).any()):
            d = d[conf[i] > min_conf]
        out.append(d.flatten().median())
    return torch.stack(out)
