"""Transformer layers of the DynamiCrafter UNet, with the ReconX structure branch.

Parameter names follow the official `lvdm/modules/attention.py` so checkpoints load by name. Attention runs
through `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on GPUs); its
default scale dim_head**-0.5 is the official one.

The ReconX branch lives in the cross-attention of every *spatial* transformer block (`attn2`):

    out = Attn(Q, K_txt, V_txt) + s_img * Attn(Q, K_img, V_img) + tanh(alpha_struct) * Attn(Q, K_F, V_F)

with K_F / V_F new projections (`to_k_struct`, `to_v_struct`) of the point-cloud tokens F(P). `alpha_struct`
starts at 0, so public DynamiCrafter weights behave exactly as released until the branch is trained.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

TEXT_CONTEXT_LEN = 77  # the official cross-attention splits text / image tokens at this hard-coded length


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head softmax attention.

    q: (B, Lq, heads*d), k / v: (B, Lk, heads*d), same dtype. Returns (B, Lq, heads*d).
    """
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=heads) for t in (q, k, v))
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        # CPU kernels for half-precision attention need AVX-512 on some builds ("pack_vnni2 is only supported
        # when avx512 is supported"): compute in float32 there, the result rounded back to the weights' dtype.
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return rearrange(out, "b h n d -> b n (h d)")


class CrossAttention(nn.Module):
    """Self- or cross-attention with the optional image branch (`to_k_ip`/`to_v_ip`) and structure branch.

    query_dim: width of the queries; context_dim: width of the context tokens (None: self-attention).
    image_cross_attention: context is [77 text tokens | image tokens]; the image tokens get their own K/V.
    image_cross_attention_scale_learnable: adds the official `alpha` gate, out_ip * (tanh(alpha) + 1).
    structure_branch: adds `to_k_struct`, `to_v_struct` (from context_dim) and `alpha_struct` (0 at init).
    """

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0, image_cross_attention: bool = False, image_cross_attention_scale: float = 1.0,
                 image_cross_attention_scale_learnable: bool = False, structure_branch: bool = False,
                 text_context_len: int = TEXT_CONTEXT_LEN):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))
        self.image_cross_attention = image_cross_attention
        self.image_cross_attention_scale = image_cross_attention_scale
        self.image_cross_attention_scale_learnable = image_cross_attention_scale_learnable
        self.text_context_len = text_context_len
        if image_cross_attention:
            self.to_k_ip = nn.Linear(context_dim, inner_dim, bias=False)
            self.to_v_ip = nn.Linear(context_dim, inner_dim, bias=False)
            if image_cross_attention_scale_learnable:
                self.alpha = nn.Parameter(torch.tensor(0.0))
        self.structure_branch = structure_branch
        if structure_branch:
            self.to_k_struct = nn.Linear(context_dim, inner_dim, bias=False)
            self.to_v_struct = nn.Linear(context_dim, inner_dim, bias=False)
            self.alpha_struct = nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                structure: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, L, query_dim); context: (B, Lc, context_dim) or None (self-attention);
        structure: (B, M, context_dim) point-cloud tokens or None. Returns (B, L, query_dim)."""
        q = self.to_q(x)
        if context is None:
            out = attention(q, self.to_k(x), self.to_v(x), self.heads)
            return self.to_out(out)
        text = context[:, :self.text_context_len]
        out = attention(q, self.to_k(text), self.to_v(text), self.heads)
        if self.image_cross_attention:
            image = context[:, self.text_context_len:]
            out_ip = attention(q, self.to_k_ip(image), self.to_v_ip(image), self.heads)
            if self.image_cross_attention_scale_learnable:
                out = out + self.image_cross_attention_scale * out_ip * (torch.tanh(self.alpha) + 1)
            else:
                out = out + self.image_cross_attention_scale * out_ip
        if structure is not None and self.structure_branch:
            out_struct = attention(q, self.to_k_struct(structure), self.to_v_struct(structure), self.heads)
            # tanh(0) = 0 exactly, so an untrained branch adds +0.0 and leaves `out` bitwise unchanged
            out = out + torch.tanh(self.alpha_struct).to(out.dtype) * out_struct
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU projection: (..., dim_in) -> (..., dim_out)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP with 4x width, key names `net.0.proj`, `net.2` as the official one."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, feed-forward; pre-LayerNorm residuals. x: (B, L, dim)."""

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: Optional[int] = None,
                 image_cross_attention: bool = False, image_cross_attention_scale_learnable: bool = False,
                 structure_branch: bool = False):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout,
                                    image_cross_attention=image_cross_attention,
                                    image_cross_attention_scale_learnable=image_cross_attention_scale_learnable,
                                    structure_branch=structure_branch)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                structure: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context, structure=structure) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Per-frame transformer over the H*W tokens. x: (B*T, C, H, W) -> same shape.

    context: (B*T, Lc, context_dim); structure: (B*T, M, context_dim) or None.
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: Optional[int] = None, use_linear: bool = True, image_cross_attention: bool = False,
                 image_cross_attention_scale_learnable: bool = False, structure_branch: bool = True):
        super().__init__()
        inner = n_heads * d_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(in_channels, inner) if use_linear else nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, n_heads, d_head, dropout, context_dim, image_cross_attention,
                                  image_cross_attention_scale_learnable, structure_branch)
            for _ in range(depth)])
        self.proj_out = nn.Linear(inner, in_channels) if use_linear else nn.Conv2d(inner, in_channels, 1)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                structure: Optional[torch.Tensor] = None) -> torch.Tensor:
        _, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = rearrange(x, "b c h w -> b (h w) c").contiguous()
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context=context, structure=structure)
        if self.use_linear:
            x = self.proj_out(x)
        x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w).contiguous()
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class TemporalTransformer(nn.Module):
    """Self-attention along time at every pixel. x: (B, C, T, H, W) -> same shape.

    Only the configuration DynamiCrafter uses is implemented: temporal self-attention only, no causal mask, no
    relative positions (the 512 models set temporal_selfatt_only, use_relative_position=False,
    use_causal_attention=False).
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 use_linear: bool = False):
        super().__init__()
        inner = n_heads * d_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(in_channels, inner) if use_linear else nn.Conv1d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, n_heads, d_head, dropout, None) for _ in range(depth)])
        self.proj_out = nn.Linear(inner, in_channels) if use_linear else nn.Conv1d(inner, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, _, h, w = x.shape
        x_in = x
        x = rearrange(self.norm(x), "b c t h w -> (b h w) c t").contiguous()
        if not self.use_linear:
            x = self.proj_in(x)
        x = rearrange(x, "n c t -> n t c").contiguous()
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x)  # no context: both attn1 and attn2 attend over time
        if self.use_linear:
            x = self.proj_out(x)
            x = rearrange(x, "(b h w) t c -> b c t h w", b=b, h=h, w=w).contiguous()
        else:
            x = self.proj_out(rearrange(x, "n t c -> n c t").contiguous())
            x = rearrange(x, "(b h w) c t -> b c t h w", b=b, h=h, w=w).contiguous()
        return x + x_in
