"""DynamiCrafter's diffusion schedule and the DDIM sub-schedule of the official sampler.

Own code rather than diffusers' DDIMScheduler: the official sampler rescales the predicted x0 between steps
(`use_dynamic_rescale`, `scale_arr`), which diffusers' `step` has no hook for, and the values below are checked
against `dc_schedule.safetensors` (the official buffers) in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 of Lin et al. 2023: shift/scale sqrt(alpha_bar) so that alpha_bar[-1] = 0. float64 in and out."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt ** 2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


@dataclass
class DDIMSteps:
    """The DDIM sub-schedule, ascending in time; index i is used at sampling step S-1-i.

    timesteps: (S,) int64. alphas, alphas_prev, sigmas, scale, scale_prev: (S,) float32.
    """

    timesteps: torch.Tensor
    alphas: torch.Tensor
    alphas_prev: torch.Tensor
    sigmas: torch.Tensor
    scale: torch.Tensor
    scale_prev: torch.Tensor

    def __len__(self) -> int:
        return self.timesteps.shape[0]


@dataclass
class DiffusionSchedule:
    """v-prediction schedule with zero terminal SNR (configs/inference_512_v1.0.yaml). All (T,) float32, CPU."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    scale_arr: torch.Tensor

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @classmethod
    def official(cls, timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012,
                 rescale_betas_zero_snr: bool = True, base_scale: float = 0.7, turning_step: int = 400
                 ) -> "DiffusionSchedule":
        """The DDPM 'linear' schedule (betas = linspace(sqrt(start), sqrt(end))**2) as LatentVisualDiffusion builds it."""
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        scale_arr = torch.cat([torch.linspace(1.0, base_scale, turning_step, dtype=torch.float64),
                               torch.full((timesteps,), base_scale, dtype=torch.float64)])
        f32 = lambda t: t.to(torch.float32)  # noqa: E731 - the official buffers are float32 casts of float64 values
        return cls(f32(betas), f32(alphas_cumprod), f32(prev), f32(alphas_cumprod.sqrt()),
                   f32((1.0 - alphas_cumprod).sqrt()), f32(scale_arr))

    def ddim(self, steps: int = 50, eta: float = 1.0, spacing: str = "uniform_trailing",
             final_prev_from_start: bool = False) -> DDIMSteps:
        """DDIM sub-schedule as `make_ddim_timesteps` / `make_ddim_sampling_parameters` build it.

        spacing 'uniform_trailing': round(arange(T, 0, -T/S)) flipped, minus 1 (19, 39, ..., 999 for S=50);
        'uniform': arange(0, T, T//S) + 1.
        final_prev_from_start: the dynamic rescale's "previous" scale of the last step (index 0). False: that step's
        own scale (DynamiCrafter: x0 is not rescaled at the last step); True: scale_arr[0] = 1.0 (ViewCrafter's
        sampler, lvdm/models/samplers/ddim.py "fix a bug": the last x0 is divided by scale_arr[t_last]).
        """
        T = self.num_timesteps
        if not 1 <= steps <= T:
            raise InputError(f"steps must be in [1, {T}], got {steps}")
        if spacing == "uniform_trailing":
            ts = torch.round(torch.arange(T, 0, -T / steps, dtype=torch.float64)).flip(0).long() - 1
        elif spacing == "uniform":
            ts = torch.arange(0, T, T // steps, dtype=torch.long) + 1
        else:
            raise InputError(f"unknown timestep spacing {spacing!r}; use 'uniform_trailing' or 'uniform'")
        ac = self.alphas_cumprod.to(torch.float64)
        alphas = ac[ts]
        alphas_prev = torch.cat([ac[:1], ac[ts[:-1]]])
        sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
        scale = self.scale_arr[ts]
        first = self.scale_arr[:1] if final_prev_from_start else scale[:1]
        scale_prev = torch.cat([first, scale[:-1]])
        return DDIMSteps(ts, alphas.float(), alphas_prev.float(), sigmas.float(), scale, scale_prev)
