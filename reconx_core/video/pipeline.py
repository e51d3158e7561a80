"""Interpolate videos between consecutive reference views with a video backbone (DynamiCrafter interp, ViewCrafter;
reconx_core.video.backbones), optionally guided by point-cloud renders (reconx_core.video.guidance) and by the
ReconX structure condition.

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
from ..structure import PathRenders, render_scene_path
from ..types import Scene, Views
from .backbones import get_backbone
from .guidance import GuidanceSettings, RenderFusion, latent_mask
from .model import VideoModel
from .sampler import Conditions, GeneratorNoise, NoiseSource, ddim_sample, guided_velocity
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


def _segment_renders(renders: Optional[torch.Tensor], views: torch.Tensor, seg: int, frames: int):
    """Segment `seg` of the renders, (L, 3, H, W) in [-1, 1], with the reference views in place at both ends (as
    ViewCrafter feeds them), or None."""
    if renders is None:
        return None
    start = seg * (frames - 1)
    out = renders[start:start + frames].to(views.device, torch.float32) * 2 - 1
    out[0], out[-1] = views[seg], views[seg + 1]
    return out


def _check_renders(renders, masks, k_views: int, frames: int, size) -> None:
    count = (k_views - 1) * (frames - 1) + 1
    if renders.dim() != 4 or renders.shape[0] != count or renders.shape[1] != 3 or tuple(renders.shape[-2:]) != size:
        raise InputError(f"renders must be ({count}, 3, {size[0]}, {size[1]}) for {k_views} views and {frames} frames "
                         f"per segment at the model's size, got {tuple(renders.shape)}; render the path with the same "
                         "frames per segment and size as the interpolation")
    if masks is not None and tuple(masks.shape) != (count, *size):
        raise InputError(f"render masks must be ({count}, {size[0]}, {size[1]}), got {tuple(masks.shape)}")


@torch.no_grad()
def interpolate(model: VideoModel, images: torch.Tensor, structure: Optional[torch.Tensor] = None,
                prompt: Optional[str] = None, steps: int = 50, cfg: float = 7.5, structure_scale: float = 1.0,
                frames: Optional[int] = None, seed: int = 0, frame_stride: Optional[int] = None,
                guidance_rescale: Optional[float] = None, eta: Optional[float] = None,
                pin_ends: Optional[bool] = None, callback: Optional[Callable[[int, int], None]] = None, *,
                renders: Optional[torch.Tensor] = None, render_masks: Optional[torch.Tensor] = None,
                guidance: Optional[GuidanceSettings] = None, noise: Optional[NoiseSource] = None) -> torch.Tensor:
    """Generate the frames between consecutive reference views with the model's backbone (`model.config["backbone"]`,
    see reconx_core.video.backbones; DynamiCrafter-512-interp when unset).

    images: (K, 3, H, W) float in [0, 1], H and W multiples of 64 (the backbone's resolution, e.g. 320x512).
    structure: (M, D) or (1, M, D) point-cloud tokens from model.structure_encoder, or None. Needs trained branch
        weights (some alpha_struct != 0), else ResourceError.
    prompt, frames, frame_stride, guidance_rescale, eta, pin_ends: None takes the backbone's (DynamiCrafter: "", 16,
        5, 0.7, 1.0, True; ViewCrafter: "Rotating view of a scene", 25, 10, 0.7, 1.0, False); a model file with its
        own config (the tiny models) sets frames and frame_stride. steps, cfg: the official 50 and 7.5.
    structure_scale: guidance weight of the structure condition (see sampler.guided_velocity).
    pin_ends: keep the first/last latent of each segment at the reference latents (the official sampler's
        mask path), so the end frames are exactly the references' VAE round trip and segments join seamlessly.
        False reproduces the official scripts, whose end frames are only guided by the concat condition.
    renders: (S, 3, H, W) in [0, 1] point-cloud renders along the path, S = (K-1)(frames-1)+1 (needed by ViewCrafter,
        whose concat condition they are, with the references in place at the segment ends; and by render guidance).
    render_masks: (S, H, W) coverage in [0, 1] of the renders (render guidance; None counts every pixel covered).
    guidance: render guidance (reconx_core.video.guidance.GuidanceSettings) on top of the backbone's conditioning.
    seed: all noise (VAE posterior, initial latent, DDIM steps) comes from one CPU generator, unless `noise` (a
        NoiseSource: shape -> draw) is given; draws in order: the backbone's reference encoding (DynamiCrafter: K
        posterior samples), then per segment its render encoding (ViewCrafter: L), the start, the steps' draws.
    callback(step, total): once per DDIM step over all segments, total = (K-1)*steps.
    Returns (S, 3, H, W) float32 in [0, 1] on the model's device, S = (K-1)*(frames-1)+1; consecutive segments
    share their end frame (the first segment's is kept).
    """
    backbone = get_backbone(model)
    prompt = backbone.prompt if prompt is None else prompt
    frames = int(frames or model.config.get("frames", backbone.frames))
    frame_stride = int(frame_stride or model.config.get("frame_stride", backbone.frame_stride))
    guidance_rescale = backbone.guidance_rescale if guidance_rescale is None else guidance_rescale
    eta = backbone.eta if eta is None else eta
    pin_ends = backbone.pin_ends if pin_ends is None else pin_ends
    guidance = guidance or GuidanceSettings()
    _check_inputs(model, images, frames, steps)
    trained = int(model.config.get("frames", backbone.frames))
    if backbone.fixed_frames and frames != trained:
        raise InputError(f"{backbone.title} was trained on {trained}-frame segments; set frames to {trained} "
                         "(0 takes the model's own)")
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
    views = images.to(device, torch.float32) * 2 - 1
    k_views, _, h, w = views.shape
    if renders is None and (backbone.needs_renders or guidance.active):
        need = f"{backbone.title}" if backbone.needs_renders else f"guidance {guidance.mode!r}"
        raise InputError(f"{need} needs point-cloud renders along the camera path: connect ReconX Render Point "
                         "Cloud, or run on a scene (interpolate_views renders them)")
    if renders is not None:
        _check_renders(renders, render_masks, k_views, frames, (h, w))
    draw = noise if noise is not None else GeneratorNoise(torch.Generator().manual_seed(int(seed)))
    latent_shape = (1, 4, frames, h // 8, w // 8)

    text = model.encode_text([prompt])
    uncond_text = model.encode_text([""])
    uncond_image = model.image_tokens(torch.zeros_like(views[:1]))
    state = backbone.prepare(model, views, draw)
    fs = torch.tensor([frame_stride], dtype=torch.long, device=device)
    total = (k_views - 1) * steps
    pin = torch.zeros(frames, dtype=torch.bool, device=device)
    pin[[0, -1]] = True

    segments = []
    for seg in range(k_views - 1):
        seg_renders = _segment_renders(renders, views, seg, frames)
        parts = backbone.segment(model, seg, views, seg_renders, frames, draw, state)
        image = model.image_tokens(parts.image)  # as official: only the segment's first view drives image tokens
        cond = Conditions(concat=parts.concat.to(model.dtype), context=torch.cat([text, image], dim=1),
                          uncond_context=torch.cat([uncond_text, uncond_image], dim=1), fs=fs, structure=structure)
        hook, start_step, start_latents = None, 0, None
        if guidance.active:
            with model.stage(model.vae) as vae:
                z_r = encode_frames(vae, seg_renders, sample=False).float().permute(1, 0, 2, 3)[None]
            if render_masks is None:
                mask = torch.ones(1, 1, frames, h // 8, w // 8, device=device)
            else:
                cover = render_masks[seg * (frames - 1):seg * (frames - 1) + frames].to(device).float().clone()
                cover[0], cover[-1] = 1.0, 1.0  # the references themselves are in place at the ends
                mask = latent_mask(cover, 8, guidance.erosion)[None, None]
            if guidance.fuses:
                hook = RenderFusion(z_r, mask, guidance.strength, guidance.stop_step(steps))
            start_step = guidance.start_step(steps)
            start_latents = z_r
        step_cb = None
        if callback is not None:
            step_cb = lambda i, n, base=seg * steps: callback(base + i, total)  # noqa: E731
        with model.stage(model.unet) as unet:
            latents = ddim_sample(
                lambda x, t: guided_velocity(unet, x, t, cond, cfg, structure_scale, guidance_rescale),
                latent_shape, model.schedule, steps=steps, eta=eta, device=device,
                pin_frames=pin if pin_ends else None, pin_latents=parts.pin_latents, callback=step_cb, noise=draw,
                x0_hook=hook, final_prev_from_start=backbone.final_prev_from_start, start_step=start_step,
                start_latents=start_latents)
        with model.stage(model.vae) as vae:
            video = decode_latents(vae, latents[0].permute(1, 0, 2, 3)).float()  # (T, 3, H, W) in ~[-1, 1]
        segments.append(video if seg == 0 else video[1:])
        log.info("segment %d/%d done", seg + 1, k_views - 1)
    return ((torch.cat(segments) + 1) / 2).clamp(0, 1)


def interpolate_views(model: VideoModel, scene: Scene, structure: Optional[torch.Tensor] = None,
                      frames: Optional[int] = None, seed: int = 0,
                      callback: Optional[Callable[[int, int], None]] = None,
                      renders: Optional[PathRenders] = None, guidance: Optional[GuidanceSettings] = None,
                      path: Optional[str] = None, render_radius: Optional[float] = None, **sampling) -> Views:
    """ReconX stage 3 on a scene: its views, centre-cropped and resized to the model's resolution, in their order,
    with the frames between each consecutive pair generated by `interpolate`.

    scene: the aligned reference views (K >= 2). structure: optional point-cloud tokens (see `interpolate`).
    frames: frames per segment (None: the backbone's). renders: PathRenders of the scene at the model's size and
    frames (`reconx_core.structure.render_scene_path`); when the backbone or the guidance needs renders and none
    are given they are made here along `path` (None: the backbone's path kind) with `render_radius` (None: the
    default). guidance: render guidance settings (see `interpolate`).
    sampling: `interpolate`'s settings (prompt, steps, cfg, structure_scale, frame_stride, ...).
    Returns Views on the scene's device: frames (S, 3, h, w) at the model's resolution, S = (K-1)(frames-1)+1,
    reference_index (K,), reference_cameras (the scene's cameras after the same crop and resize),
    reference_depths (the references' median confident depths, which fix the scale for confidence mapping when
    the reference cameras share one centre), and intended_cameras (the path) when renders guided the model.
    """
    if not isinstance(scene, Scene):
        raise InputError(f"scene must be a RECONX_SCENE (Scene), got {type(scene).__name__}")
    backbone = get_backbone(model)
    height, width = model.config["resolution"]
    frames = int(frames or model.config.get("frames", backbone.frames))
    guidance = guidance or GuidanceSettings()
    refs, ref_cameras = crop_resize(scene.images, scene.cameras, height, width)
    uses_renders = backbone.needs_renders or guidance.active
    if renders is not None and uses_renders:
        if not isinstance(renders, PathRenders):
            raise InputError(f"renders must be RECONX_RENDERS (PathRenders), got {type(renders).__name__}")
        problems = []
        if renders.size != (height, width):
            problems.append(f"they are {renders.size[1]}x{renders.size[0]}, the model runs at {width}x{height}")
        if renders.frames_per_segment != frames:
            problems.append(f"they have {renders.frames_per_segment} frames per segment, the interpolation {frames}")
        if len(renders.reference_cameras) != len(scene):
            problems.append(f"they were made for {len(renders.reference_cameras)} views, the scene has {len(scene)}")
        if problems:
            raise InputError("the renders do not fit this interpolation: " + "; ".join(problems) + ". Set ReconX "
                             "Render Point Cloud's width, height and frames to 0 (they then follow the video model) "
                             "or to the same values")
    elif uses_renders:
        renders = render_scene_path(scene, frames, width, height, path=path or backbone.path, radius=render_radius,
                                    downsample=backbone.render_downsample)
    if not uses_renders:
        if renders is not None:
            log.info("renders given but not used: %s does not take them and render guidance is off",
                     backbone.title)
        renders = None
    out = interpolate(model, refs, structure=structure, frames=frames, seed=seed, callback=callback,
                      renders=None if renders is None else renders.frames,
                      render_masks=None if renders is None else renders.mask, guidance=guidance, **sampling)
    index = torch.as_tensor(reference_frame_indices(refs.shape[0], frames), dtype=torch.long, device=scene.device)
    intended = None if renders is None else renders.cameras.to(scene.device)
    info = {"segments": refs.shape[0] - 1, "frames_per_segment": frames, "structure": structure is not None,
            "seed": seed, "backbone": backbone.name, "guidance": guidance.mode,
            "path": None if renders is None else renders.path}
    return Views(frames=out.to(scene.device), reference_index=index, reference_cameras=ref_cameras.to(scene.device),
                 reference_depths=scene.median_depths(), intended_cameras=intended, info=info)
