"""OpenCLIP ViT-H-14 towers as DynamiCrafter uses them (key names of open_clip_torch 2.22.0).

- `TextTower` (`cond_stage_model.model.*`): token + positional embedding, causal transformer, and the
  *penultimate* block's output through `ln_final`: (B, 77, 1024).
- `ImageTower` (`embedder.model.visual.*`): kornia bicubic resize to 224 (align_corners, antialias), CLIP
  mean/std, patch embedding, class token, `ln_pre`, all blocks; returns all 257 tokens of the last block
  (no ln_post / proj): (B, 257, 1280).
Tensors the checkpoint carries but these computations never read (text_projection, logit_scale, the visual
ln_post/proj, and the text leftovers inside `embedder.`) are listed in checkpoint.UNUSED_KEYS and not built.
"""

from __future__ import annotations

from typing import Optional

import kornia
import torch
from torch import nn

from ..errors import InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class LayerNorm(nn.LayerNorm):
    """LayerNorm that returns the input dtype (open_clip's, for fp16 / bf16 weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).to(x.dtype)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)); x + mlp(ln_2(x)). x: (B, L, width), batch first."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, hidden))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of `ResidualAttentionBlock`s under the key `resblocks`."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, skip_last: int = 0) -> torch.Tensor:
        for block in self.resblocks[:len(self.resblocks) - skip_last]:
            x = block(x, attn_mask=attn_mask)
        return x


class TextTower(nn.Module):
    """Token ids (B, 77) int64 -> penultimate-layer features (B, 77, width) after ln_final.

    Defaults are ViT-H-14's text tower: width 1024, 24 layers, 16 heads, vocab 49408.
    """

    def __init__(self, width: int = 1024, layers: int = 24, heads: int = 16, vocab_size: int = 49408,
                 context_length: int = 77, layer: str = "penultimate"):
        super().__init__()
        if layer not in ("last", "penultimate"):
            raise InputError(f"text layer must be 'last' or 'penultimate', got {layer!r}")
        self.skip_last = 1 if layer == "penultimate" else 0
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads)
        self.ln_final = LayerNorm(width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.register_buffer("attn_mask", self._causal_mask(), persistent=False)

    def _causal_mask(self, device=None) -> torch.Tensor:
        n = self.context_length
        return torch.full((n, n), float("-inf"), device=device).triu_(1)

    def reset_buffers(self, device="cpu") -> None:
        """Recreate `attn_mask` (not stored in checkpoints), e.g. after building on the meta device."""
        self.attn_mask = self._causal_mask(device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] != self.context_length:
            raise InputError(f"tokens must be (B, {self.context_length}), got {tuple(tokens.shape)}")
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.transformer(x, attn_mask=self.attn_mask.to(x.dtype), skip_last=self.skip_last)
        return self.ln_final(x)


class VisionTransformer(nn.Module):
    """Preprocessed images (B, 3, S, S) -> all S²/p²+1 tokens of the last block, (B, L, width)."""

    def __init__(self, width: int = 1280, layers: int = 32, heads: int = 16, patch_size: int = 14,
                 image_size: int = 224):
        super().__init__()
        self.image_size = image_size
        grid = image_size // patch_size
        self.conv1 = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) * width ** -0.5)
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, grid², width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.transformer(self.ln_pre(x))


class ImageTower(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> CLIP tokens (B, 257, 1280) as FrozenOpenCLIPImageEmbedderV2."""

    def __init__(self, width: int = 1280, layers: int = 32, heads: int = 16, patch_size: int = 14,
                 image_size: int = 224):
        super().__init__()
        self.visual = VisionTransformer(width, layers, heads, patch_size, image_size)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD), persistent=False)

    def reset_buffers(self, device="cpu") -> None:
        """Recreate the CLIP mean/std buffers (not stored in checkpoints), e.g. after a meta build."""
        self.mean = torch.tensor(CLIP_MEAN, device=device)
        self.std = torch.tensor(CLIP_STD, device=device)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 3, 224, 224) CLIP-normalised, float32 (kornia's bicubic as official)."""
        size = self.visual.image_size
        x = kornia.geometry.resize(x.float(), (size, size), interpolation="bicubic", align_corners=True,
                                   antialias=True)
        x = (x + 1.0) / 2.0
        return kornia.enhance.normalize(x, self.mean.float(), self.std.float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise InputError(f"images must be (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        dtype = self.visual.conv1.weight.dtype
        return self.visual(self.preprocess(images).to(dtype))
