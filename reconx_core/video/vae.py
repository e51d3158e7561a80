"""The first-stage VAE: diffusers' AutoencoderKL built from the LDM `ddconfig`, with an explicit key map.

DynamiCrafter's VAE is the Stable Diffusion LDM AutoencoderKL; diffusers' class computes the same function under
other parameter names. `ldm_to_diffusers_key` renames one official key (after stripping `first_stage_model.`);
the attention projections are 1x1 convs there and Linear layers here, so their weights are reshaped.
The 512 interp model encodes and decodes frame by frame (`perframe_ae: True`), which also bounds memory.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

import torch
from diffusers import AutoencoderKL

from ..errors import CheckpointError, InputError

SCALE_FACTOR = 0.18215
LDM_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def build_vae(ddconfig: Optional[dict] = None, embed_dim: int = 4) -> AutoencoderKL:
    """diffusers AutoencoderKL equivalent to `lvdm.models.autoencoder.AutoencoderKL(ddconfig, embed_dim)`."""
    cfg = dict(LDM_DDCONFIG, **(ddconfig or {}))
    if cfg["attn_resolutions"]:
        raise InputError("VAE attn_resolutions other than [] are not supported (DynamiCrafter uses [])")
    if not cfg["double_z"] or cfg["z_channels"] != embed_dim:
        raise InputError("VAE needs double_z=True and z_channels == embed_dim, as in DynamiCrafter")
    levels = len(cfg["ch_mult"])
    return AutoencoderKL(
        in_channels=cfg["in_channels"], out_channels=cfg["out_ch"], latent_channels=embed_dim,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg["ch"] * m for m in cfg["ch_mult"]), layers_per_block=cfg["num_res_blocks"],
        norm_num_groups=32, sample_size=cfg["resolution"], scaling_factor=SCALE_FACTOR)


_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def ldm_to_diffusers_key(key: str, levels: int = 4) -> str:
    """Rename one LDM VAE key (no `first_stage_model.` prefix) to diffusers' AutoencoderKL name.

    The decoder's `up.{i}` counts from the lowest resolution in LDM and from the highest in diffusers.
    Raises CheckpointError for a key of no known layout.
    """
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)", key)
    if m:
        part, kind, i, j, layer, p = m.groups()
        i = int(i) if kind == "down" else levels - 1 - int(i)
        return f"{part}.{kind}_blocks.{i}.resnets.{j}.{_RESNET[layer]}.{p}"
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(weight|bias)", key)
    if m:
        part, kind, i, sampler, p = m.groups()
        i = int(i) if kind == "down" else levels - 1 - int(i)
        return f"{part}.{kind}_blocks.{i}.{sampler}rs.0.conv.{p}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(weight|bias)", key)
    if m:
        part, n, layer, p = m.groups()
        return f"{part}.mid_block.resnets.{int(n) - 1}.{_RESNET[layer]}.{p}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)", key)
    if m:
        part, layer, p = m.groups()
        return f"{part}.mid_block.attentions.0.{_ATTN[layer]}.{p}"
    m = re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)", key)
    if m:
        part, layer, p = m.groups()
        return f"{part}.{'conv_norm_out' if layer == 'norm_out' else layer}.{p}"
    if re.fullmatch(r"(quant_conv|post_quant_conv)\.(weight|bias)", key):
        return key
    raise CheckpointError(f"unknown VAE key {key!r}: not the LDM AutoencoderKL layout of DynamiCrafter")


def diffusers_to_ldm_key(key: str, levels: int = 4) -> str:
    """Inverse of `ldm_to_diffusers_key`: a diffusers AutoencoderKL key -> the LDM (official) key."""
    inv_resnet = {v: k for k, v in _RESNET.items()}
    inv_attn = {v: k for k, v in _ATTN.items()}
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)\.(weight|bias)", key)
    if m:
        part, kind, i, j, layer, p = m.groups()
        i = int(i) if kind == "down" else levels - 1 - int(i)
        return f"{part}.{kind}.{i}.block.{j}.{inv_resnet[layer]}.{p}"
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.conv\.(weight|bias)", key)
    if m:
        part, kind, i, sampler, p = m.groups()
        i = int(i) if kind == "down" else levels - 1 - int(i)
        return f"{part}.{kind}.{i}.{sampler}sample.conv.{p}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(\w+)\.(weight|bias)", key)
    if m:
        part, n, layer, p = m.groups()
        return f"{part}.mid.block_{int(n) + 1}.{inv_resnet[layer]}.{p}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)",
                     key)
    if m:
        part, layer, p = m.groups()
        return f"{part}.mid.attn_1.{inv_attn[layer]}.{p}"
    m = re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(weight|bias)", key)
    if m:
        part, layer, p = m.groups()
        return f"{part}.{'norm_out' if layer == 'conv_norm_out' else layer}.{p}"
    if re.fullmatch(r"(quant_conv|post_quant_conv)\.(weight|bias)", key):
        return key
    raise CheckpointError(f"unknown diffusers VAE key {key!r}")


def convert_ldm_vae_state_dict(state: dict, vae: AutoencoderKL) -> dict:
    """LDM VAE state dict -> diffusers names and shapes for `vae` (attention 1x1 conv weights become Linear)."""
    levels = len(vae.config.block_out_channels)
    target = vae.state_dict()
    out = {}
    for key, value in state.items():
        if key.startswith("loss."):
            continue  # training-only LPIPS/discriminator weights some LDM checkpoints carry
        name = ldm_to_diffusers_key(key, levels)
        if name not in target:
            raise CheckpointError(f"VAE key {key!r} maps to {name!r}, which this VAE configuration lacks")
        if value.dim() == 4 and target[name].dim() == 2:
            value = value[:, :, 0, 0]
        out[name] = value
    return out


def encode_frames(vae: AutoencoderKL, frames: torch.Tensor, generator: Optional[torch.Generator] = None,
                  sample: bool = True, callback: Optional[Callable[[int, int], None]] = None,
                  noise: Optional[Callable] = None) -> torch.Tensor:
    """Frames (N, 3, H, W) in [-1, 1] -> latents (N, 4, H/8, W/8) * 0.18215, one frame at a time.

    sample=True draws from the posterior as the official `encode_first_stage` does (noise from `generator`,
    made on the CPU so results do not depend on the device, or from `noise(shape)`, one draw per frame in order,
    see reconx_core.video.sampler.ReplayNoise); False takes its mean.
    """
    dtype = next(vae.parameters()).dtype
    out = []
    for i in range(frames.shape[0]):
        dist = vae.encode(frames[i:i + 1].to(dtype)).latent_dist
        if sample:
            draw = noise(tuple(dist.mean.shape)) if noise is not None else \
                torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32)
            z = dist.mean + dist.std * draw.to(dist.mean)
        else:
            z = dist.mean
        out.append(z * SCALE_FACTOR)
        if callback is not None:
            callback(i + 1, frames.shape[0])
    return torch.cat(out)


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor,
                   callback: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """Latents (N, 4, h, w) (scaled by 0.18215) -> frames (N, 3, 8h, 8w) in about [-1, 1], one frame at a time."""
    dtype = next(vae.parameters()).dtype
    out = []
    for i in range(latents.shape[0]):
        out.append(vae.decode(latents[i:i + 1].to(dtype) / SCALE_FACTOR).sample)
        if callback is not None:
            callback(i + 1, latents.shape[0])
    return torch.cat(out)
