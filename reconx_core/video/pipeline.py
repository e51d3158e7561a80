"""Interpolate videos between consecutive reference views (DynamiCrafter interp mode + the ReconX structure condition).

K reference views give K-1 segments of `frames` frames each; segment k starts at view k and ends at view k+1,
and consecutive segments share that end frame, so the output has (K-1)*(frames-1)+1 frames and reference view k
sits at frame k*(frames-1) (`reference_frame_indices`).
"""

from __future__ import annotations

import logging
from typing import Callable, List, Optional

import torch

from ..errors import InputError, ResourceError
from ..framing import crop_resize
from ..types import Scene, Views
from .model import VideoModel
from .sampler import Conditions, ddim_sample, guided_velocity
from .vae import decode_latents, encode_frames

log = logging.getLogger(__name__)


def reference_frame_indices(num_views: int, frames: int = 16) -> List[int]:
    """Frame index of each reference view in `interpolate`'s output: [0, frames-1, 2*(frames-1), ...]."""
    return [k * (frames - 1) for k in range(num_views)]


def _check_inputs(model: VideoModel, images: torch.Tensor, frames: int, steps: int) -> None:
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] < 2:
        raise InputError(f"images must be (K >= 2, 3, H, W) in [0, 1], got {tuple(images.shape)}")
    levels = len(model.config["unet"]["channel_mult"])
    multiple = 8 * 2 ** (levels - 1)
    h, w = images.shape[-2:]
    if h % multiple or w % multiple:
        rh, rw = model.config.get("resolution", [320, 512])
        raise InputError(f"image size {h}x{w} must be a multiple of {multiple} (the model was trained at "
                         f"{rh}x{rw}); resize the views first")
    if frames < 2:
        raise InputError(f"frames must be >= 2, got {frames}")
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")


@torch.no_grad()
def interpolate(model: VideoModel, images: torch.Tensor, structure: Optional[torch.Tensor] = None, prompt: str = "",
                steps: int = 50, cfg: float = 7.5, structure_scale: float = 1.0, frames: int = 16, seed: int = 0,
                frame_stride: int = 5, guidance_rescale: float = 0.7, eta: float = 1.0, pin_ends: bool = True,
                callback: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Generate the frames between consecutive reference views.

    images: (K, 3, H, W) float in [0, 1], H and W multiples of 64 (320x512 for the official model).
    structure: (M, D) or (1, M, D) point-cloud tokens from model.structure_encoder, or None for plain
        DynamiCrafter. Needs trained branch weights (some alpha_struct != 0), else ResourceError.
    steps, cfg, guidance_rescale, eta, frame_stride: the official sampler settings (50, 7.5, 0.7, 1.0, 5).
    structure_scale: guidance weight of the structure condition (see sampler.guided_velocity).
    pin_ends: keep the first/last latent of each segment at the reference latents (the official sampler's
        mask path), so the end frames are exactly the references' VAE round trip and segments join seamlessly.
        False reproduces the official interp script, whose end frames are only guided by the concat condition.
    seed: all noise (VAE posterior, initial latent, DDIM steps) comes from one CPU generator.
    callback(step, total): once per DDIM step over all segments, total = (K-1)*steps.
    Returns (S, 3, H, W) float32 in [0, 1] on the model's device, S = (K-1)*(frames-1)+1.
    """
    _check_inputs(model, images, frames, steps)
    if structure is not None:
        if structure.dim() == 2:
            structure = structure[None]
        gates = [p for n, p in model.unet.named_parameters() if n.endswith("alpha_struct")]
        if not gates or all(float(g) == 0 for g in gates):
            raise ResourceError("structure tokens were given but the structure branch has no trained weights "
                                "(every alpha_struct is 0); load a structure-branch file "
                                "or run without structure")
        structure = structure.to(model.device, model.dtype)
    device = model.device
    generator = torch.Generator().manual_seed(int(seed))
    views = images.to(device, torch.float32) * 2 - 1
    k_views, _, h, w = views.shape
    latent_shape = (1, 4, frames, h // 8, w // 8)

    text = model.encode_text([prompt])
    uncond_text = model.encode_text([""])
    uncond_image = model.image_tokens(torch.zeros_like(views[:1]))
    with model.stage(model.vae) as vae:
        ref_latents = encode_frames(vae, views, generator).float()  # (K, 4, h/8, w/8)
    fs = torch.tensor([frame_stride], dtype=torch.long, device=device)
    total = (k_views - 1) * steps
    pin = torch.zeros(frames, dtype=torch.bool, device=device)
    pin[[0, -1]] = True

    segments = []
    for seg in range(k_views - 1):
        concat = torch.zeros(latent_shape, device=device)
        concat[:, :, 0], concat[:, :, -1] = ref_latents[seg], ref_latents[seg + 1]
        image = model.image_tokens(views[seg:seg + 1])  # as official: only the first view drives image tokens
        cond = Conditions(concat=concat.to(model.dtype), context=torch.cat([text, image], dim=1),
                          uncond_context=torch.cat([uncond_text, uncond_image], dim=1), fs=fs, structure=structure)
        step_cb = None
        if callback is not None:
            step_cb = lambda i, n, base=seg * steps: callback(base + i, total)  # noqa: E731
        with model.stage(model.unet) as unet:
            latents = ddim_sample(
                lambda x, t: guided_velocity(unet, x, t, cond, cfg, structure_scale, guidance_rescale),
                latent_shape, model.schedule, steps=steps, eta=eta, generator=generator, device=device,
                pin_frames=pin if pin_ends else None, pin_latents=concat, callback=step_cb)
        with model.stage(model.vae) as vae:
            video = decode_latents(vae, latents[0].permute(1, 0, 2, 3)).float()  # (T, 3, H, W) in ~[-1, 1]
        segments.append(video if seg == 0 else video[1:])
        log.info("segment %d/%d done", seg + 1, k_views - 1)
    return ((torch.cat(segments) + 1) / 2).clamp(0, 1)


def interpolate_views(model: VideoModel, scene: Scene, structure: Optional[torch.Tensor] = None, frames: int = 16,
                      seed: int = 0, callback: Optional[Callable[[int, int], None]] = None, **sampling) -> Views:
    """ReconX stage 3 on a scene: its views, centre-cropped and resized to the model's resolution, in their order,
    with the frames between each consecutive pair generated by `interpolate`.

    scene: the aligned reference views (K >= 2). structure: optional point-cloud tokens (see `interpolate`).
    sampling: `interpolate`'s settings (prompt, steps, cfg, structure_scale, frame_stride, ...).
    Returns Views on the scene's device: frames (S, 3, h, w) at the model's resolution, S = (K-1)(frames-1)+1,
    reference_index (K,), reference_cameras (the scene's cameras after the same crop and resize) and
    reference_depths (the references' median confident depths, which fix the scale for confidence mapping when
    the reference cameras share one centre).
    """
    if not isinstance(scene, Scene):
        raise InputError(f"scene must be a RECONX_SCENE (Scene), got {type(scene).__name__}")
    height, width = model.config["resolution"]
    refs, ref_cameras = crop_resize(scene.images, scene.cameras, height, width)
    out = interpolate(model, refs, structure=structure, frames=frames, seed=seed, callback=callback, **sampling)
    index = torch.as_tensor(reference_frame_indices(refs.shape[0], frames), dtype=torch.long, device=scene.device)
    return Views(frames=out.to(scene.device), reference_index=index, reference_cameras=ref_cameras.to(scene.device),
                 reference_depths=scene.median_depths(),
                 info={"segments": refs.shape[0] - 1, "frames_per_segment": frames,
                       "structure": structure is not None, "seed": seed})
