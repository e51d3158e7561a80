"""The image-token Resampler (`lvdm/modules/encoders/resampler.py`): CLIP image tokens -> per-frame tokens.

A Perceiver: `num_queries * video_length` learned latents attend to [image tokens | latents]. Key names are the
official ones after stripping `image_proj_model.`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..errors import InputError


class PerceiverAttention(nn.Module):
    """Latents attend to [x | latents]. x: (B, N, dim), latents: (B, L, dim) -> (B, L, dim)."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, length, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1)
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        # the official code scales q and k by d**-1/4 each and takes the softmax in float32 (fp16 stability)
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = (weight @ v).permute(0, 2, 1, 3).reshape(b, length, -1)
        return self.to_out(out)


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class Resampler(nn.Module):
    """CLIP image tokens (B, N, embedding_dim) -> (B, num_queries*video_length, output_dim) frame tokens."""

    def __init__(self, dim: int = 1024, depth: int = 8, dim_head: int = 64, heads: int = 16, num_queries: int = 8,
                 embedding_dim: int = 768, output_dim: int = 1024, ff_mult: int = 4,
                 video_length: Optional[int] = None):
        super().__init__()
        self.num_queries, self.video_length, self.embedding_dim = num_queries, video_length, embedding_dim
        total = num_queries * (video_length or 1)
        self.latents = nn.Parameter(torch.randn(1, total, dim) / dim ** 0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList([
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), _feed_forward(dim, ff_mult)])
            for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, embedding_dim) CLIP tokens (257 for ViT-H). Returns (B, num_queries*video_length, output_dim)."""
        if x.dim() != 3 or x.shape[-1] != self.embedding_dim:
            raise InputError(f"Resampler input must be (B, N, {self.embedding_dim}), got {tuple(x.shape)}")
        latents = self.latents.repeat(x.shape[0], 1, 1)
        x = self.proj_in(x.to(self.latents.dtype))
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


RESAMPLER_ARGS = {"dim", "depth", "dim_head", "heads", "num_queries", "embedding_dim", "output_dim", "ff_mult",
                  "video_length"}


def build_resampler(config: dict) -> Resampler:
    """Build from the official `image_proj_stage_config.params` dict; unknown keys raise InputError."""
    unknown = set(config) - RESAMPLER_ARGS
    if unknown:
        raise InputError(f"unknown Resampler options {sorted(unknown)}")
    return Resampler(**config)
