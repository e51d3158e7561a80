"""DynamiCrafter 512 interp (Doubiiu/DynamiCrafter_512_Interp): the reference views' latents at both ends of the
concat condition, zeros between; image tokens from the first view; the ends held to the references while sampling.

Renders are not part of its conditioning (it was never trained on them); with renders it is guided by them through
reconx_core.video.guidance (x0 fusion, render-initialised sampling), and with trained ReconX weights by the
structure tokens.
"""

from __future__ import annotations

import torch

from ..vae import encode_frames
from . import Backbone, SegmentConditions, register


class DynamiCrafterInterp(Backbone):
    def prepare(self, model, references, noise):
        # every reference encoded once, in order (posterior samples): the draws the seeded sampler always made
        with model.stage(model.vae) as vae:
            return encode_frames(vae, references, noise=noise).float()      # (K, 4, h, w)

    def segment(self, model, k, references, renders, frames, noise, state):
        latents = state
        _, c, h, w = latents.shape
        concat = torch.zeros(1, c, frames, h, w, device=latents.device)
        concat[:, :, 0], concat[:, :, -1] = latents[k], latents[k + 1]
        return SegmentConditions(concat=concat, image=references[k:k + 1], pin_latents=concat)


DYNAMICRAFTER_512_INTERP = register(DynamiCrafterInterp(
    name="dynamicrafter_512_interp", title="DynamiCrafter 512 interp", family="dynamicrafter",
    resolution=(320, 512), frames=16, frame_stride=5, prompt="", base_scale=0.7, final_prev_from_start=False,
    pin_ends=True, path="linear", needs_renders=False, fixed_frames=False,
    family_patterns=(r"dynami_?crafter",), family_default=True))
