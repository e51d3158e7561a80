"""The DynamiCrafter 3D UNet (`lvdm/modules/networks/openaimodel3d.py`, dims=2 variant) with the ReconX branch.

Frames are folded into the batch for every 2D layer, (B, C, T, H, W) -> (B*T, C, H, W); temporal convolutions
and temporal transformers unfold them again. Parameter names (including the official typo `temopral_conv`) match
the official state_dict after stripping `model.diffusion_model.`, so checkpoints load by name.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import CheckpointError, InputError
from .attention import SpatialTransformer, TemporalTransformer

log = logging.getLogger(__name__)

IMAGE_TOKENS_PER_FRAME = 16  # official hard-coded check: context length 77 + T*16 means per-frame image tokens


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding, [cos | sin] as the official code. timesteps: (N,) any numeric dtype -> (N, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back (the official `GroupNormSpecific`; keeps fp16 stable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float() if self.weight is not None else None,
                            self.bias.float() if self.bias is not None else None, self.eps).to(x.dtype)


class TemporalConvBlock(nn.Module):
    """Four (GroupNorm, SiLU, [Dropout], Conv3d (3,1,1)) layers with a residual. x: (B, C, T, H, W)."""

    def __init__(self, channels: int, dropout: float = 0.1):
        super().__init__()
        k, p = (3, 1, 1), (1, 0, 0)
        self.conv1 = nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv3d(channels, channels, k, padding=p))
        for name in ("conv2", "conv3", "conv4"):
            setattr(self, name, nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(), nn.Dropout(dropout),
                                              nn.Conv3d(channels, channels, k, padding=p)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv4(self.conv3(self.conv2(self.conv1(x))))


class ResBlock(nn.Module):
    """Residual block with the time embedding added after the first conv, then a temporal conv block.

    x: (B*T, C_in, H, W), emb: (B*T, emb_channels) -> (B*T, C_out, H, W).
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: Optional[int] = None,
                 use_temporal_conv: bool = True):
        super().__init__()
        out_channels = out_channels or channels
        self.in_layers = nn.Sequential(GroupNorm32(32, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(32, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        self.use_temporal_conv = use_temporal_conv
        if use_temporal_conv:
            self.temopral_conv = TemporalConvBlock(out_channels, dropout=0.1)  # official spelling: checkpoint keys

    def forward(self, x: torch.Tensor, emb: torch.Tensor, batch_size: int) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        h = self.skip_connection(x) + self.out_layers(h)
        if self.use_temporal_conv:
            h = rearrange(h, "(b t) c h w -> b c t h w", b=batch_size)
            h = rearrange(self.temopral_conv(h), "b c t h w -> (b t) c h w")
        return h


class Downsample(nn.Module):
    """Stride-2 3x3 conv. (N, C, H, W) -> (N, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv. (N, C, H, W) -> (N, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """DynamiCrafter's video UNet. Build it with `build_unet(config)`; the arguments are the official ones."""

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, num_res_blocks: int,
                 attention_resolutions: Sequence[int], dropout: float = 0.0, channel_mult: Sequence[int] = (1, 2, 4, 8),
                 num_head_channels: int = 64, transformer_depth: int = 1, context_dim: int = 1024,
                 use_linear: bool = True, temporal_conv: bool = True, temporal_attention: bool = True,
                 addition_attention: bool = True, image_cross_attention: bool = True,
                 image_cross_attention_scale_learnable: bool = False, default_fs: int = 24, fs_condition: bool = True,
                 temporal_length: int = 16, structure_branch: bool = True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.model_channels = model_channels
        self.context_dim = context_dim
        self.default_fs = default_fs
        self.fs_condition = fs_condition
        self.addition_attention = addition_attention
        self.temporal_length = temporal_length
        # Training only: recompute each input/middle/output block in the backward pass instead of keeping its
        # activations (the official `use_checkpoint`; build_unet sets it from that option).
        self.gradient_checkpointing = False
        emb_dim = model_channels * 4

        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if fs_condition:
            self.fps_embedding = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(),
                                               nn.Linear(emb_dim, emb_dim))
            nn.init.zeros_(self.fps_embedding[-1].weight)
            nn.init.zeros_(self.fps_embedding[-1].bias)

        def res(ch_in, ch_out=None):
            return ResBlock(ch_in, emb_dim, dropout, ch_out, use_temporal_conv=temporal_conv)

        def attn_layers(ch):
            heads = ch // num_head_channels
            layers = [SpatialTransformer(ch, heads, num_head_channels, transformer_depth, context_dim=context_dim,
                                         use_linear=use_linear, image_cross_attention=image_cross_attention,
                                         image_cross_attention_scale_learnable=image_cross_attention_scale_learnable,
                                         structure_branch=structure_branch)]
            if temporal_attention:
                layers.append(TemporalTransformer(ch, heads, num_head_channels, transformer_depth,
                                                  use_linear=use_linear))
            return layers

        self.input_blocks = nn.ModuleList([nn.ModuleList([nn.Conv2d(in_channels, model_channels, 3, padding=1)])])
        if addition_attention:
            # the official init_attn always has 8 heads and no `use_linear` (1x1 Conv1d projections)
            self.init_attn = nn.ModuleList([TemporalTransformer(model_channels, 8, num_head_channels,
                                                                transformer_depth, use_linear=False)])
        chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers += attn_layers(ch)
                self.input_blocks.append(nn.ModuleList(layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(nn.ModuleList([Downsample(ch)]))
                chans.append(ch)
                ds *= 2
        self.middle_block = nn.ModuleList([res(ch)] + attn_layers(ch) + [res(ch)])
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + chans.pop(), mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers += attn_layers(ch)
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(nn.ModuleList(layers))
        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1))

    # -- helpers -------------------------------------------------------------------------------------------------
    @staticmethod
    def _run(layers: nn.ModuleList, h, emb, context, structure, b: int) -> torch.Tensor:
        for layer in layers:
            if isinstance(layer, ResBlock):
                h = layer(h, emb, batch_size=b)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context, structure)
            elif isinstance(layer, TemporalTransformer):
                h = rearrange(h, "(b t) c h w -> b c t h w", b=b)
                h = rearrange(layer(h), "b c t h w -> (b t) c h w")
            else:
                h = layer(h)
        return h

    def _block(self, layers: nn.ModuleList, h, emb, context, structure, b: int) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            # non-reentrant: works with frozen inputs, DDP and keyword-free None arguments; RNG state is replayed
            return checkpoint(self._run, layers, h, emb, context, structure, b, use_reentrant=False)
        return self._run(layers, h, emb, context, structure, b)

    def _frame_context(self, context: torch.Tensor, t: int) -> torch.Tensor:
        """(B, L, D) -> (B*T, L', D). With L = 77 + T*16 every frame gets its own 16 image tokens."""
        length = context.shape[1]
        if length == 77 + t * IMAGE_TOKENS_PER_FRAME:
            text, image = context[:, :77], context[:, 77:]
            text = text.repeat_interleave(t, dim=0)
            image = rearrange(image, "b (t l) c -> (b t) l c", t=t)
            return torch.cat([text, image], dim=1)
        return context.repeat_interleave(t, dim=0)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                fs: Optional[torch.Tensor] = None, structure: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Predict v for a noisy video latent.

        x: (B, in_channels, T, H, W), noisy latent concatenated with the concat condition along channels;
            H and W divisible by 2**(levels-1).
        timesteps: (B,) int64 in [0, 1000). context: (B, 77 + T*16, context_dim) text + per-frame image tokens
            (other lengths are repeated over frames as the official code does).
        fs: (B,) int64 frame stride, None for `default_fs`. structure: (B, M, context_dim) ReconX point-cloud
            tokens, or None to skip the structure branch.
        Returns (B, out_channels, T, H, W) in x's dtype.
        """
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise InputError(f"UNet input must be (B, {self.in_channels}, T, H, W), got {tuple(x.shape)}")
        if context.dim() != 3 or context.shape[-1] != self.context_dim:
            raise InputError(f"context must be (B, L, {self.context_dim}), got {tuple(context.shape)}")
        b, _, t, _, _ = x.shape
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        context = self._frame_context(context.to(dtype), t)
        emb = emb.repeat_interleave(t, dim=0)
        if structure is not None:
            if structure.dim() != 3 or structure.shape[0] != b or structure.shape[-1] != self.context_dim:
                raise InputError(f"structure tokens must be ({b}, M, {self.context_dim}), got {tuple(structure.shape)}")
            structure = structure.to(dtype).repeat_interleave(t, dim=0)
        if self.fs_condition:
            if fs is None:
                fs = torch.full((b,), self.default_fs, dtype=torch.long, device=x.device)
            fs_emb = self.fps_embedding(timestep_embedding(fs, self.model_channels).to(dtype))
            emb = emb + fs_emb.repeat_interleave(t, dim=0)

        h = rearrange(x, "b c t h w -> (b t) c h w").to(dtype)
        hs = []
        for i, block in enumerate(self.input_blocks):
            h = self._block(block, h, emb, context, structure, b)
            if i == 0 and self.addition_attention:
                h = self._block(self.init_attn, h, emb, context, structure, b)
            hs.append(h)
        h = self._block(self.middle_block, h, emb, context, structure, b)
        for block in self.output_blocks:
            h = self._block(block, torch.cat([h, hs.pop()], dim=1), emb, context, structure, b)
        y = self.out(h).to(x.dtype)
        return rearrange(y, "(b t) c h w -> b c t h w", b=b)

    # -- checkpoints --------------------------------------------------------------------------------------------
    def structure_parameter_names(self) -> list:
        """Names of the ReconX branch parameters (`to_k_struct`, `to_v_struct`, `alpha_struct`)."""
        return [k for k in self.state_dict() if "_struct" in k]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load official DynamiCrafter keys (prefix `model.diffusion_model.` already stripped).

        Structure-branch keys may be missing (they come from a separate file); with strict=True anything else
        missing or unexpected raises CheckpointError naming the keys.
        """
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        struct = set(self.structure_parameter_names())
        missing = [k for k in result.missing_keys if k not in struct]
        if strict and (missing or result.unexpected_keys):
            raise CheckpointError(
                f"UNet checkpoint does not match the configuration: {len(missing)} missing keys "
                f"(e.g. {missing[:3]}), {len(result.unexpected_keys)} unexpected keys "
                f"(e.g. {result.unexpected_keys[:3]}). Is this a DynamiCrafter 512 interp checkpoint?")
        return result


UNET_ARGS = {"in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions", "dropout",
             "channel_mult", "num_head_channels", "transformer_depth", "context_dim", "use_linear", "temporal_conv",
             "temporal_attention", "addition_attention", "image_cross_attention",
             "image_cross_attention_scale_learnable", "default_fs", "fs_condition", "temporal_length",
             "structure_branch"}
# Official arguments whose other values this implementation does not support.
UNET_FIXED = {"dims": 2, "use_checkpoint": None, "temporal_selfatt_only": True, "use_relative_position": False,
              "use_causal_attention": False, "use_scale_shift_norm": False, "resblock_updown": False,
              "conv_resample": True, "tempspatial_aware": False, "num_heads": None, "use_fp16": None}


def build_unet(config: dict) -> UNet:
    """Build the UNet from the official `unet_config.params` dict (e.g. dc_tiny.json's constructor_kwargs).

    Arguments that only change training (use_checkpoint) or that must keep their DynamiCrafter value are
    accepted and checked; unknown ones raise InputError. `structure_branch` (default True) adds the ReconX branch.
    """
    kwargs = {}
    for key, value in config.items():
        if key in UNET_ARGS:
            kwargs[key] = value
        elif key in UNET_FIXED:
            want = UNET_FIXED[key]
            if want is not None and value != want and not (key == "num_heads" and value == -1):
                raise InputError(f"UNet option {key}={value!r} is not supported (only {want!r})")
        else:
            raise InputError(f"unknown UNet option {key!r}")
    if kwargs.get("num_head_channels", 64) in (None, -1):
        raise InputError("num_head_channels must be set (DynamiCrafter uses 64)")
    unet = UNet(**kwargs)
    unet.gradient_checkpointing = bool(config.get("use_checkpoint") or False)
    return unet
