"""DDIM sampling as the official interpolation script runs it, plus ReconX's multi-condition guidance.

Official (lvdm/models/samplers/ddim.py, run with --timestep_spacing uniform_trailing --ddim_eta 1.0
--unconditional_guidance_scale 7.5 --guidance_rescale 0.7):
    v   = uc + s * (c - uc), then rescale_noise_cfg(v, c, 0.7)
    eps = sqrt(a_t) v + sqrt(1 - a_t) x;   x0 = sqrt(a_t) x - sqrt(1 - a_t) v;   x0 *= scale_prev / scale_t
    x'  = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma²) eps + sigma * noise
ReconX adds the structure condition F(P) as a third guidance term (see `guided_velocity`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .schedule import DiffusionSchedule


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Lin et al. 2023 §3.4: mix `guided` with itself rescaled to the std of `cond` (std over all but dim 0)."""
    if rescale <= 0:
        return guided
    dims = list(range(1, guided.dim()))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rescale * rescaled + (1 - rescale) * guided


@dataclass
class Conditions:
    """Everything the UNet is conditioned on in one sampling run (B = batch of segments).

    concat: (B, 4, T, h, w) latent concat condition (first and last frame latents, zeros between).
    context: (B, 77 + T*16 or 77 + 16*video_length, D) text + image tokens; uncond_context: same shape, from
    the empty prompt and a black image ('empty_seq'). fs: (B,) int64 frame stride.
    structure: (B, M, D) point-cloud tokens or None.
    """

    concat: torch.Tensor
    context: torch.Tensor
    uncond_context: torch.Tensor
    fs: torch.Tensor
    structure: Optional[torch.Tensor] = None


def guided_velocity(unet, x: torch.Tensor, t: torch.Tensor, cond: Conditions, cfg: float = 7.5,
                    structure_scale: float = 1.0, guidance_rescale: float = 0.7) -> torch.Tensor:
    """Classifier-free guided v prediction. x: (B, 4, T, h, w) float32; t: (B,) int64. Returns (B, 4, T, h, w).

    Without structure tokens (or with structure_scale 0) this is exactly the official CFG. With them:
        v = uc + cfg * (c_view - uc) + structure_scale * (c_view+struct - c_view)
    where c_view is conditioned on text + reference views, c_view+struct additionally on F(P), and the
    guidance rescale uses the fully conditioned prediction. structure_scale 1 leaves the structure branch at
    its trained strength; larger values push the samples further toward the point-cloud condition.
    """
    xc = torch.cat([x, cond.concat.to(x)], dim=1)
    use_structure = cond.structure is not None and structure_scale != 0
    c_view = unet(xc, t, cond.context, fs=cond.fs)
    if cfg == 1.0 and not use_structure:
        return c_view
    uc = unet(xc, t, cond.uncond_context, fs=cond.fs) if cfg != 1.0 else c_view
    guided = uc + cfg * (c_view - uc)
    full = c_view
    if use_structure:
        full = unet(xc, t, cond.context, fs=cond.fs, structure=cond.structure)
        guided = guided + structure_scale * (full - c_view)
    return rescale_guidance(guided, full, guidance_rescale)


@torch.no_grad()
def ddim_sample(velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape: tuple,
                schedule: DiffusionSchedule, steps: int = 50, eta: float = 1.0, spacing: str = "uniform_trailing",
                generator: Optional[torch.Generator] = None, device="cpu", dynamic_rescale: bool = True,
                pin_frames: Optional[torch.Tensor] = None, pin_latents: Optional[torch.Tensor] = None,
                callback: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Run DDIM from pure noise. Returns the latent (B, C, T, h, w) float32 on `device`.

    velocity_fn(x (B,C,T,h,w) float32, t (B,) int64) -> v prediction (guided). Noise (initial and per step) is
    drawn on the CPU from `generator`, so a seed gives the same result on any device.
    pin_frames: (T,) bool, frames whose latents are replaced by `pin_latents` (B, C, T, h, w): before each step
    by the reference noised to the current level (the official `mask`/`x0` path), and exactly at the end.
    callback(step, total) is called after every step.
    """
    ddim = schedule.ddim(steps, eta, spacing)
    sqrt_ac = schedule.sqrt_alphas_cumprod
    sqrt_1m_ac = schedule.sqrt_one_minus_alphas_cumprod

    def randn():
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)

    x = randn()
    b = shape[0]
    total = len(ddim)
    for i in range(total):
        index = total - 1 - i
        step = int(ddim.timesteps[index])
        if pin_frames is not None:
            noised = sqrt_ac[step] * pin_latents + sqrt_1m_ac[step] * randn()
            x = torch.where(pin_frames.view(1, 1, -1, 1, 1), noised, x)
        t = torch.full((b,), step, dtype=torch.long, device=device)
        v = velocity_fn(x, t).float()
        eps = sqrt_ac[step] * v + sqrt_1m_ac[step] * x
        x0 = sqrt_ac[step] * x - sqrt_1m_ac[step] * v
        if dynamic_rescale:
            x0 = x0 * (ddim.scale_prev[index] / ddim.scale[index])
        a_prev, sigma = ddim.alphas_prev[index], ddim.sigmas[index]
        # clamp: at t=999 (alpha_bar = 0, eta = 1) the argument is 0 up to float rounding
        direction = (1.0 - a_prev - sigma ** 2).clamp_min(0).sqrt() * eps
        x = a_prev.sqrt() * x0 + direction + sigma * randn()
        if callback is not None:
            callback(i + 1, total)
    if pin_frames is not None:
        x = torch.where(pin_frames.view(1, 1, -1, 1, 1), pin_latents, x)
    return x
