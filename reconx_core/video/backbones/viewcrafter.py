"""ViewCrafter (Drexubery/ViewCrafter, Apache-2.0): DynamiCrafter's network fine-tuned to take point-cloud renders
as the concat condition.

Per segment (viewcrafter.py `nvs_sparse_view_interp` -> `run_diffusion` -> `image_guided_synthesis`): the renders
along ViewCrafter's camera path with the reference photos in place of the renders at both ends, every frame
VAE-encoded (posterior sample, one frame at a time) into c_concat; image tokens from frame 0 (the first photo);
prompt "Rotating view of a scene"; fs 10; 50 DDIM steps, eta 1, CFG 7.5 with rescale 0.7; v-prediction on the
zero-terminal-SNR schedule; and its sampler's last step divides x0 by scale_arr[t] (prev scale scale_arr[0] = 1).
The official sampler pins nothing (mask None), so neither does this by default.

Checkpoints: ViewCrafter_25_512 (25 frames, 320x512, base scale 0.7), ViewCrafter_25 and ViewCrafter_25_sparse
(25 frames, 576x1024, base scale 0.3), ViewCrafter_16 (16 frames, 576x1024). The official code renders at 288x512
and resizes to a hard-coded 576x1024, which crashes its own 512 model (upstream issues #18, #35, #74); here the
renders are made at each model's size (for the 1024 models at half size and upsampled x2 bilinearly, as they were
trained), and the photos are centre-cropped to the model's aspect ratio first (16:9 or 8:5).
"""

from __future__ import annotations

from ...errors import InputError
from ..vae import encode_frames
from . import Backbone, SegmentConditions, register

PROMPT = "Rotating view of a scene"


class ViewCrafter(Backbone):
    def segment(self, model, k, references, renders, frames, noise, state):
        if renders is None:
            raise InputError("ViewCrafter needs the segment's renders (ReconX Render Point Cloud)")
        with model.stage(model.vae) as vae:
            latents = encode_frames(vae, renders, noise=noise).float()      # (L, 4, h, w), posterior samples
        concat = latents.permute(1, 0, 2, 3)[None]                          # (1, 4, L, h, w)
        return SegmentConditions(concat=concat, image=renders[:1], pin_latents=concat)


_COMMON = dict(family="viewcrafter", frame_stride=10, prompt=PROMPT, final_prev_from_start=True, pin_ends=False,
               path="viewcrafter", needs_renders=True, fixed_frames=True,
               family_patterns=(r"view_?crafter", r"model_sparse"))

VIEWCRAFTER_25_512 = register(ViewCrafter(
    name="viewcrafter_25_512", title="ViewCrafter_25_512", resolution=(320, 512), frames=25, base_scale=0.7,
    render_downsample=1, variant_patterns=(r"crafter.*512", r"512.*view_?crafter"), **_COMMON))
VIEWCRAFTER_25_1024 = register(ViewCrafter(
    name="viewcrafter_25_1024", title="ViewCrafter_25 / ViewCrafter_25_sparse", resolution=(576, 1024), frames=25,
    base_scale=0.3, render_downsample=2, family_default=True,
    variant_patterns=(r"crafter_?25(?!_?512)", r"crafter.*sparse", r"model_sparse", r"crafter.*1024"), **_COMMON))
VIEWCRAFTER_16_1024 = register(ViewCrafter(
    name="viewcrafter_16_1024", title="ViewCrafter_16", resolution=(576, 1024), frames=16, base_scale=0.3,
    render_downsample=2, variant_patterns=(r"crafter_?16",), **_COMMON))
