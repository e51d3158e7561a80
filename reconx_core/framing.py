"""Fitting views to another model's resolution: centre crop to the target aspect, then resize, with the
intrinsics following exactly (pixel centres at integer coordinates, as everywhere in reconx_core)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import InputError
from .geometry import scale_intrinsics
from .types import Cameras

__all__ = ["crop_box", "crop_resize", "scale_intrinsics"]


def crop_box(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int, int, int]:
    """(x0, y0, w, h): the largest centred box of the target aspect ratio inside a width x height image."""
    if min(width, height, target_w, target_h) <= 0:
        raise InputError(f"sizes must be positive, got {width}x{height} -> {target_w}x{target_h}")
    if width * target_h > height * target_w:  # too wide: crop the sides
        w, h = round(height * target_w / target_h), height
    else:
        w, h = width, round(width * target_h / target_w)
    return (width - w) // 2, (height - h) // 2, w, h


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
