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
from typing import Callable, Optional, Sequence

import torch

from ..errors import InputError
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


class GeneratorNoise:
    """Standard normal draws from a torch.Generator on the CPU (a seed gives the same noise on any device)."""

    def __init__(self, generator: Optional[torch.Generator] = None):
        self.generator = generator

    def __call__(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32)


class ReplayNoise:
    """Given draws handed out in order (e.g. the ones an official run recorded); a draw of another shape, or one
    more than were given, is an InputError."""

    def __init__(self, draws: Sequence[torch.Tensor]):
        self.draws = list(draws)
        self.used = 0

    def __call__(self, shape: Sequence[int]) -> torch.Tensor:
        if self.used >= len(self.draws):
            raise InputError(f"noise draw {self.used + 1} of shape {tuple(shape)} asked, only {len(self.draws)} given")
        draw = self.draws[self.used]
        if tuple(draw.shape) != tuple(shape):
            raise InputError(f"noise draw {self.used + 1} has shape {tuple(draw.shape)}, the sampler asks for "
                             f"{tuple(shape)}")
        self.used += 1
        return draw.float().cpu()


NoiseSource = Callable[[Sequence[int]], torch.Tensor]
# x0 hook: (predicted x0 (B, C, T, h, w) after the dynamic rescale, sampling step i = 0..S-1, S) -> a replacement
# x0 or None for "unchanged". See reconx_core.video.guidance.
X0Hook = Callable[[torch.Tensor, int, int], Optional[torch.Tensor]]


@torch.no_grad()
def ddim_sample(velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape: tuple,
                schedule: DiffusionSchedule, steps: int = 50, eta: float = 1.0, spacing: str = "uniform_trailing",
                generator: Optional[torch.Generator] = None, device="cpu", dynamic_rescale: bool = True,
                pin_frames: Optional[torch.Tensor] = None, pin_latents: Optional[torch.Tensor] = None,
                callback: Optional[Callable[[int, int], None]] = None, *, noise: Optional[NoiseSource] = None,
                x0_hook: Optional[X0Hook] = None, final_prev_from_start: bool = False, start_step: int = 0,
                start_latents: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Run DDIM from pure noise (or from noised latents part-way). Returns the latent (B, C, T, h, w) float32.

    velocity_fn(x (B,C,T,h,w) float32, t (B,) int64) -> v prediction (guided).
    noise: where the Gaussian draws come from, called with a shape, in this order: the start, then per step the
    pinned frames' noise (when pinning) and the step noise (`GeneratorNoise`, `ReplayNoise`). Default: CPU draws
    from `generator`, so a seed gives the same result on any device.
    pin_frames: (T,) bool, frames whose latents are replaced by `pin_latents` (B, C, T, h, w): before each step
    by the reference noised to the current level (the official `mask`/`x0` path), and exactly at the end.
    x0_hook(x0, i, S): may replace the predicted x0 of step i (after the dynamic rescale); the step then uses the
    noise implied by the new x0, eps' = eps - sqrt(a_t / (1 - a_t)) (x0' - x0), i.e. (x - sqrt(a_t) x0') /
    sqrt(1 - a_t) (ViewExtrapolator's / NVS-Solver's solver step from the fused x0); where x0' = x0 nothing changes.
    final_prev_from_start: the last step's dynamic-rescale rule (`DiffusionSchedule.ddim`; True for ViewCrafter).
    start_step, start_latents: skip the first start_step steps and start from start_latents (B, C, T, h, w) noised to
    that step's level, sqrt(a) z + sqrt(1 - a) n (SDEdit); start_step 0 starts from pure noise.
    callback(step, total) is called after every step (and once with the skipped count when starting later).
    """
    ddim = schedule.ddim(steps, eta, spacing, final_prev_from_start=final_prev_from_start)
    sqrt_ac = schedule.sqrt_alphas_cumprod
    sqrt_1m_ac = schedule.sqrt_one_minus_alphas_cumprod
    draw = noise if noise is not None else GeneratorNoise(generator)

    def randn():
        return draw(shape).to(device)

    b = shape[0]
    total = len(ddim)
    start_step = int(start_step)
    if not 0 <= start_step < total:
        raise InputError(f"start_step must be in [0, {total}), got {start_step}")
    if start_step == 0:
        x = randn()
    else:
        if start_latents is None:
            raise InputError("start_step > 0 needs start_latents (the latents to noise and start from)")
        t0 = int(ddim.timesteps[total - 1 - start_step])
        x = sqrt_ac[t0] * start_latents.to(device, torch.float32) + sqrt_1m_ac[t0] * randn()
        if callback is not None:
            callback(start_step, total)
    for i in range(start_step, total):
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
        if x0_hook is not None:
            fused = x0_hook(x0, i, total)
            if fused is not None:
                eps = eps - (sqrt_ac[step] / sqrt_1m_ac[step]) * (fused - x0)
                x0 = fused
        a_prev, sigma = ddim.alphas_prev[index], ddim.sigmas[index]
        # clamp: at t=999 (alpha_bar = 0, eta = 1) the argument is 0 up to float rounding
        direction = (1.0 - a_prev - sigma ** 2).clamp_min(0).sqrt() * eps
        x = a_prev.sqrt() * x0 + direction + sigma * randn()
        if callback is not None:
            callback(i + 1, total)
    if pin_frames is not None:
        x = torch.where(pin_frames.view(1, 1, -1, 1, 1), pin_latents, x)
    return x
