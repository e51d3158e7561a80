"""Training-free render guidance for any video backbone: x0 fusion and render-initialised (SDEdit) sampling.

x0 fusion (ViewExtrapolator; NVS-Solver's DGS replaces a confidence-selected part instead): at each of the first
steps, the predicted x0 = sqrt(a_t) x_t - sqrt(1 - a_t) v is pulled towards the latent of the point-cloud render
where the render covers the frame,
    x0' = x0 + w M (z_r - x0)          (w = strength, M = the latent coverage mask in [0, 1]),
and the step is taken from x0' with the noise it implies (see `ddim_sample`'s x0_hook). Uncovered latents are
left to the model; after the last guided step the model finishes alone, so the details come from it.
Render-initialised sampling (SDEdit / CamTrol) starts part-way down the schedule from the render latents noised to
that level, instead of from pure noise.

Render latents are the VAE posterior means x 0.18215 (ViewExtrapolator encodes with the mode); the latent mask is
the pixel coverage averaged over each 8x8 block, then eroded by `erosion` latent pixels (a min filter), because a
latent pixel half-covered by a render mixes the render's black holes into its code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import InputError

GUIDANCE_MODES = ("none", "x0 fusion", "render init", "render init + x0 fusion")


@dataclass
class GuidanceSettings:
    """How renders guide sampling (beyond whatever the backbone's own conditioning does with them).

    mode: one of GUIDANCE_MODES.
    strength: w of the x0 fusion, in [0, 1] (1 replaces x0 by the render latent where fully covered).
    until: fraction of the sampling steps that are fused: steps i < round(until * S) (ViewExtrapolator: 15 of 25).
    erosion: latent pixels removed from the edge of the covered region (0 keeps the block-averaged coverage).
    init_strength: for the "render init" modes, the part of the schedule that is run: sampling starts at step
        round((1 - init_strength) * S) from the noised render latents (1 = from pure noise; at t = 999 the zero-SNR
        schedule ignores the start anyway).
    """

    mode: str = "none"
    strength: float = 1.0
    until: float = 0.6
    erosion: int = 1
    init_strength: float = 0.8

    def __post_init__(self):
        if self.mode not in GUIDANCE_MODES:
            raise InputError(f"unknown guidance mode {self.mode!r}; choose one of {GUIDANCE_MODES}")
        if not 0 <= self.strength <= 1:
            raise InputError(f"guidance strength must be in [0, 1], got {self.strength}")
        if not 0 <= self.until <= 1:
            raise InputError(f"guidance 'until' must be a fraction in [0, 1], got {self.until}")
        if int(self.erosion) < 0:
            raise InputError(f"mask erosion must be >= 0 latent pixels, got {self.erosion}")
        if not 0 < self.init_strength <= 1:
            raise InputError(f"init strength must be in (0, 1], got {self.init_strength}")

    @property
    def fuses(self) -> bool:
        return "x0 fusion" in self.mode and self.strength > 0 and self.until > 0

    @property
    def initialises(self) -> bool:
        return "render init" in self.mode

    @property
    def active(self) -> bool:
        return self.fuses or self.initialises

    def start_step(self, steps: int) -> int:
        """The first sampling step run (0 = from pure noise)."""
        if not self.initialises:
            return 0
        return min(int(round((1 - self.init_strength) * steps)), steps - 1)

    def stop_step(self, steps: int) -> int:
        """Steps i < stop_step are fused."""
        return int(round(self.until * steps)) if self.fuses else 0


def latent_mask(coverage: torch.Tensor, factor: int = 8, erosion: int = 0) -> torch.Tensor:
    """Pixel coverage (T, H, W) in [0, 1] -> latent mask (T, H/factor, W/factor) in [0, 1].

    Each latent pixel takes the mean coverage of its factor x factor block; `erosion` > 0 then applies a min filter
    of (2 erosion + 1)^2 latent pixels (the image border counts as covered, so frames are not eaten from the edge).
    """
    if coverage.dim() != 3:
        raise InputError(f"coverage must be (T, H, W), got {tuple(coverage.shape)}")
    T, H, W = coverage.shape
    if H % factor or W % factor:
        raise InputError(f"coverage of {W}x{H} is not a multiple of the latent factor {factor}")
    m = F.avg_pool2d(coverage.float()[:, None], factor)
    if erosion > 0:
        k = 2 * int(erosion) + 1
        m = -F.max_pool2d(F.pad(-m, (erosion,) * 4, mode="replicate"), k, stride=1)
    return m[:, 0].clamp(0, 1)


class RenderFusion:
    """The x0 hook of render-guided sampling: x0' = x0 + w M (z_r - x0) for steps i < stop_step, then None.

    latents: (B, C, T, h, w) render latents; mask: (B, 1, T, h, w) or broadcastable, in [0, 1].
    """

    def __init__(self, latents: torch.Tensor, mask: torch.Tensor, strength: float, stop_step: int):
        self.latents, self.mask = latents.float(), mask.float()
        self.weight = float(strength) * self.mask
        self.stop_step = int(stop_step)

    def __call__(self, x0: torch.Tensor, step: int, total: int) -> Optional[torch.Tensor]:
        if step >= self.stop_step:
            return None
        # lerp is exact at both ends: weight 1 gives the render latent, weight 0 the model's x0, bit for bit
        return torch.lerp(x0, self.latents.to(x0).expand_as(x0), self.weight.to(x0).expand_as(x0))
