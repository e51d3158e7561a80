"""Small visualisations for previews: depth and confidence maps as images, all in torch on the input's device."""

from __future__ import annotations

import torch

# Control points of the "turbo" colour map (Google, Apache-2.0), sampled at 9 positions; linear in between.
_TURBO = torch.tensor([
    [0.190, 0.072, 0.232], [0.275, 0.408, 0.859], [0.153, 0.680, 0.968], [0.102, 0.896, 0.707],
    [0.486, 0.988, 0.329], [0.843, 0.894, 0.207], [0.988, 0.647, 0.200], [0.874, 0.292, 0.053],
    [0.480, 0.016, 0.011],
])


def colorize(values: torch.Tensor, valid: torch.Tensor | None = None, lo_q: float = 0.02, hi_q: float = 0.98) -> torch.Tensor:
    """Map scalar maps to RGB with a turbo-like colour map, normalised by robust quantiles over all maps.

    values: (N, H, W) float.  valid: optional (N, H, W) bool; invalid pixels are black.
    Returns (N, H, W, 3) float in [0, 1] (ComfyUI's IMAGE layout).
    """
    v = values.detach().float()
    sample = v[valid] if valid is not None and valid.any() else v.flatten()
    sample = sample[torch.isfinite(sample)]
    if sample.numel() > 1_000_000:  # quantile has a size limit; a strided sample is plenty for a range
        sample = sample[:: sample.numel() // 1_000_000 + 1]
    if sample.numel() == 0:
        return torch.zeros(*v.shape, 3, device=v.device)
    lo, hi = torch.quantile(sample, torch.tensor([lo_q, hi_q], device=v.device))
    t = ((v - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1).nan_to_num(0.0)
    cmap = _TURBO.to(v.device)
    pos = t * (cmap.shape[0] - 1)
    i0 = pos.floor().long().clamp(max=cmap.shape[0] - 2)
    w = (pos - i0).unsqueeze(-1)
    rgb = cmap[i0] * (1 - w) + cmap[i0 + 1] * w
    if valid is not None:
        rgb = rgb * valid.unsqueeze(-1)
    return rgb


def depth_preview(depths: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Depth maps (N, H, W) -> (N, H, W, 3) images; near is warm, far is cool (inverse depth is coloured)."""
    return colorize(1.0 / depths.clamp_min(1e-6), valid)
