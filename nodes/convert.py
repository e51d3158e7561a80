"""Conversions at the node boundary between ComfyUI's layouts and reconx_core's.

ComfyUI: IMAGE (B, H, W, 3) float in [0, 1], MASK (B, H, W). reconx_core: images (N, 3, H, W) float in [0, 1].
"""

from __future__ import annotations

import torch

from reconx_core.errors import InputError


def image_to_core(image: torch.Tensor, name: str = "images", device=None) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) -> (B, 3, H, W) float32 on `device` (alpha dropped, grey expanded)."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise InputError(f"{name} must be a ComfyUI IMAGE batch (B, H, W, 3), got {shape}")
    channels = image.shape[-1]
    if channels == 1:
        image = image.expand(-1, -1, -1, 3)
    elif channels == 4:
        image = image[..., :3]
    elif channels != 3:
        raise InputError(f"{name} has {channels} channels; expected an RGB IMAGE (3 channels)")
    out = image.permute(0, 3, 1, 2).float()
    if device is not None:
        out = out.to(device)
    if not torch.isfinite(out).all():
        raise InputError(f"{name} has NaN or infinite pixels; check the node that produced it")
    return out.contiguous()


def image_to_comfy(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> ComfyUI IMAGE (N, H, W, 3), clamped to [0, 1]."""
    return images.detach().permute(0, 2, 3, 1).clamp(0, 1).contiguous().float()


def confidence_to_mask(conf: torch.Tensor) -> torch.Tensor:
    """DUSt3R confidences (N, H, W), >= 1, -> MASK in [0, 1) via 1 - 1/conf (monotone, 0 = no confidence)."""
    return (1.0 - 1.0 / conf.detach().float().clamp_min(1.0)).contiguous()
