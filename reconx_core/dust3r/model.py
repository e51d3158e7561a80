"""The DUSt3R network (AsymmetricCroCo3DStereo): a shared ViT encoder, two cross-attending decoders, two heads.

MASt3R (AsymmetricMASt3R) is the same network with the "catmlp+dpt" head (mast3r.py): `Dust3R` runs both; the
head type comes from the checkpoint (config.head_type "linear", "dpt" or "catmlp+dpt").

Parameter names follow the official checkpoints exactly (`enc_blocks.3.attn.qkv.weight`, `dec_blocks2.*`,
`downstream_head1.dpt.*`, ...), so an official state dict loads with `load_state_dict(strict=True)` once the
known key variants are normalised (see checkpoint.py).

Semantics match the official model as loaded by `dust3r.model.load_model` (PatchEmbedDust3R, landscape_only=False):
images are embedded as they are (portrait images are not transposed), RoPE2D with frequency 100 on (y, x) patch
positions, pre-norm blocks with LayerNorm eps 1e-6, and the exp depth / exp confidence post-processing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import InputError
from .heads import DPTHead, LinearHead
from .mast3r import Mast3RHead

log = logging.getLogger(__name__)

LN_EPS = 1e-6

# "auto": the official explicit softmax(q k^T / sqrt(d)) v on the CPU (bitwise equal to the reference there), and
# torch's fused scaled_dot_product_attention on accelerators (memory-efficient kernels; rounding differs ~1e-6).
ATTENTION_BACKENDS = ("auto", "exact", "sdpa")
_attention_backend = "auto"


def set_attention_backend(name: str) -> None:
    """Choose how attention is computed: "auto" (default), "exact" (official formula) or "sdpa" (fused)."""
    global _attention_backend
    if name not in ATTENTION_BACKENDS:
        raise InputError(f"unknown attention backend {name!r}; use one of {ATTENTION_BACKENDS}")
    _attention_backend = name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (B, h, Nq, d), k and v (B, h, Nk, d) -> (B, h, Nq, d), scaled by 1/sqrt(d), no mask."""
    fused = _attention_backend == "sdpa" or (_attention_backend == "auto" and q.device.type != "cpu")
    if fused:
        return F.scaled_dot_product_attention(q, k, v)
    weights = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    return weights.softmax(dim=-1) @ v


@dataclass
class Dust3RConfig:
    """Architecture of a DUSt3R network; every field can be read off a checkpoint (see checkpoint.py).

    `dpt_*` fields are used when head_type is "dpt" or "catmlp+dpt" (MASt3R). `image_size` is the resolution the
    checkpoint was trained at (224 or 512): it decides preprocessing, not the network's shapes (RoPE has no
    positional table). The MASt3R fields (`desc_*`, `two_confs`, `mlp_hidden`) are used only for "catmlp+dpt";
    their defaults are the public MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric's.
    """

    enc_embed_dim: int = 1024
    enc_depth: int = 24
    enc_num_heads: int = 16
    dec_embed_dim: int = 768
    dec_depth: int = 12
    dec_num_heads: int = 12
    patch_size: int = 16
    mlp_ratio: float = 4.0
    rope_freq: float = 100.0
    head_type: str = "dpt"
    has_conf: bool = True
    depth_mode: Tuple[str, float, float] = ("exp", float("-inf"), float("inf"))
    conf_mode: Tuple[str, float, float] = ("exp", 1.0, float("inf"))
    dpt_feature_dim: int = 256
    dpt_last_dim: int = 128
    dpt_layer_dims: Tuple[int, ...] = (96, 192, 384, 768)
    dpt_hooks: Optional[Tuple[int, ...]] = None  # None: the official [0, L/2, 3L/4, L] of the decoder depth L
    desc_dim: int = 24
    two_confs: bool = True
    desc_conf_mode: Tuple[str, float, float] = ("exp", 0.0, float("inf"))
    mlp_hidden: int = 7168  # MASt3R local-feature MLP width: 4 * (enc_embed_dim + dec_embed_dim)
    image_size: int = 512
    extra: dict = field(default_factory=dict)

    def hooks(self) -> Tuple[int, ...]:
        L = self.dec_depth
        return tuple(self.dpt_hooks) if self.dpt_hooks is not None else (0, L * 2 // 4, L * 3 // 4, L)


class Rope2D:
    """2D rotary position embedding: the first half of each head's channels rotates with the patch row (y),
    the second half with the patch column (x), each with frequencies base**(-2k/D) as in CroCo's RoPE2D."""

    def __init__(self, base: float = 100.0):
        self.base = float(base)

    def tables(self, pos: torch.Tensor, head_dim: int, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for `pos` (B, N, 2) long (y, x) -> two (B, 1, N, head_dim) tensors in `dtype`."""
        if head_dim % 4:
            raise InputError(f"RoPE2D needs a head dimension divisible by 4, got {head_dim}")
        half = head_dim // 2
        inv_freq = 1.0 / (self.base ** (torch.arange(0, half, 2, device=pos.device).float() / half))
        seq = int(pos.max().item()) + 1 if pos.numel() else 1
        angles = torch.arange(seq, device=pos.device, dtype=torch.float32)[:, None] * inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)  # (seq, half)
        cos_t, sin_t = angles.cos(), angles.sin()
        # y half then x half, matching the channel split in `apply`
        cos = torch.cat((cos_t[pos[..., 0]], cos_t[pos[..., 1]]), dim=-1)[:, None]
        sin = torch.cat((sin_t[pos[..., 0]], sin_t[pos[..., 1]]), dim=-1)[:, None]
        return cos.to(dtype), sin.to(dtype)

    @staticmethod
    def apply(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate `t` (B, heads, N, D) with tables from `tables`; each D/2 half is rotated on its own."""
        a = t.unflatten(-1, (2, 2, t.shape[-1] // 4))  # (.., half y/x, first/second quarter, D/4)
        rotated = torch.stack((-a[..., 1, :], a[..., 0, :]), dim=-2).flatten(-3)
        return t * cos + rotated * sin


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        cos, sin = rope
        q, k = Rope2D.apply(q, cos, sin), Rope2D.apply(k, cos, sin)
        out = attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.projq = nn.Linear(dim, dim)
        self.projk = nn.Linear(dim, dim)
        self.projv = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, y, rope_x, rope_y):
        B, Nq, C = x.shape
        heads = lambda t: t.reshape(B, t.shape[1], self.num_heads, C // self.num_heads).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.projq(x)), heads(self.projk(y)), heads(self.projv(y))
        q, k = Rope2D.apply(q, *rope_x), Rope2D.apply(k, *rope_y)
        out = attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, Nq, C))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, rope):
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Self-attention on this view's tokens, cross-attention to the other view's (normalised) tokens, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = SelfAttention(dim, num_heads)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm3 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm_y = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x, y, rope_x, rope_y):
        x = x + self.attn(self.norm1(x), rope_x)
        y = self.norm_y(y)
        x = x + self.cross_attn(self.norm2(x), y, rope_x, rope_y)
        return x + self.mlp(self.norm3(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, img: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """img (B, 3, H, W) -> tokens (B, H/p * W/p, C), positions (B, N, 2) long (row, column), row-major."""
        x = self.proj(img)
        B, _, gh, gw = x.shape
        ys, xs = torch.meshgrid(torch.arange(gh, device=img.device), torch.arange(gw, device=img.device),
                                indexing="ij")
        pos = torch.stack((ys.reshape(-1), xs.reshape(-1)), dim=-1)[None].expand(B, -1, -1)
        return x.flatten(2).transpose(1, 2), pos


class Dust3R(nn.Module):
    """DUSt3R: two views in, both views' 3D points in the first view's camera frame out.

    Build from a `Dust3RConfig` (normally through `load_dust3r`). `image_size` (224 or 512) is the resolution
    the weights expect; use it with `prepare_images`.
    """

    def __init__(self, config: Dust3RConfig):
        super().__init__()
        c = self.config = config
        self.image_size = int(config.image_size)
        self.patch_size = c.patch_size
        self.rope = Rope2D(c.rope_freq)
        self.patch_embed = PatchEmbed(c.patch_size, c.enc_embed_dim)
        self.enc_blocks = nn.ModuleList(EncoderBlock(c.enc_embed_dim, c.enc_num_heads, c.mlp_ratio)
                                        for _ in range(c.enc_depth))
        self.enc_norm = nn.LayerNorm(c.enc_embed_dim, eps=LN_EPS)
        # CroCo's pre-training mask token: unused here, kept so official state dicts load strictly
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.dec_embed_dim))
        self.decoder_embed = nn.Linear(c.enc_embed_dim, c.dec_embed_dim)
        self.dec_blocks = nn.ModuleList(DecoderBlock(c.dec_embed_dim, c.dec_num_heads, c.mlp_ratio)
                                        for _ in range(c.dec_depth))
        self.dec_blocks2 = nn.ModuleList(DecoderBlock(c.dec_embed_dim, c.dec_num_heads, c.mlp_ratio)
                                         for _ in range(c.dec_depth))
        self.dec_norm = nn.LayerNorm(c.dec_embed_dim, eps=LN_EPS)
        self.downstream_head1 = self._make_head()
        self.downstream_head2 = self._make_head()

    def _make_head(self) -> nn.Module:
        c = self.config
        out_channels = 3 + int(c.has_conf)
        if c.head_type == "linear":
            return LinearHead(c.dec_embed_dim, c.patch_size, out_channels, c.depth_mode, c.conf_mode)
        if c.head_type == "catmlp+dpt":
            return Mast3RHead(c.enc_embed_dim, c.dec_embed_dim, hooks=c.hooks(), layer_dims=c.dpt_layer_dims,
                              feature_dim=c.dpt_feature_dim, last_dim=c.dpt_last_dim, has_conf=c.has_conf,
                              patch_size=c.patch_size, mlp_hidden=c.mlp_hidden, desc_dim=c.desc_dim,
                              two_confs=c.two_confs, depth_mode=c.depth_mode, conf_mode=c.conf_mode,
                              desc_conf_mode=c.desc_conf_mode)
        return DPTHead(dim_tokens=(c.enc_embed_dim, c.dec_embed_dim, c.dec_embed_dim, c.dec_embed_dim),
                       hooks=c.hooks(), layer_dims=c.dpt_layer_dims, feature_dim=c.dpt_feature_dim,
                       last_dim=c.dpt_last_dim, out_channels=out_channels, patch_size=c.patch_size,
                       depth_mode=c.depth_mode, conf_mode=c.conf_mode)

    @property
    def is_mast3r(self) -> bool:
        """True for a MASt3R network (its heads also produce descriptors)."""
        return self.config.head_type == "catmlp+dpt"

    # ------------------------------------------------------------------------------------------------- stages
    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype of the encoder/decoder weights (the heads stay float32, see `load_dust3r`)."""
        return self.patch_embed.proj.weight.dtype

    def encode(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) normalised to [-1, 1], H and W multiples of the patch size
        -> features (B, N, enc_embed_dim) after enc_norm, positions (B, N, 2) long (row, column)."""
        x, pos = self.patch_embed(images.to(self.compute_dtype))
        rope = self.rope.tables(pos, x.shape[-1] // self.config.enc_num_heads, x.dtype)
        for blk in self.enc_blocks:
            x = blk(x, rope)
        return self.enc_norm(x), pos

    def decode(self, feat1, pos1, feat2, pos2) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Both decoders, each view attending to the other's previous-layer tokens.

        Returns two lists of dec_depth + 1 token tensors (B, N, C): the encoder features, then every decoder
        block's output, the last one passed through dec_norm (what the heads consume).
        """
        dh = self.config.dec_embed_dim // self.config.dec_num_heads
        f1, f2 = self.decoder_embed(feat1), self.decoder_embed(feat2)
        rope1 = self.rope.tables(pos1, dh, f1.dtype)
        rope2 = rope1 if pos2 is pos1 or torch.equal(pos1, pos2) else self.rope.tables(pos2, dh, f2.dtype)
        out1, out2 = [feat1], [feat2]
        for blk1, blk2 in zip(self.dec_blocks, self.dec_blocks2):
            f1, f2 = blk1(f1, f2, rope1, rope2), blk2(f2, f1, rope2, rope1)
            out1.append(f1)
            out2.append(f2)
        out1[-1], out2[-1] = self.dec_norm(out1[-1]), self.dec_norm(out2[-1])
        return out1, out2

    def heads(self, dec1: Sequence[torch.Tensor], dec2: Sequence[torch.Tensor], hw1: Tuple[int, int],
              hw2: Optional[Tuple[int, int]] = None, descriptors: bool = True
              ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Run both heads in float32 (as the official forward does, outside autocast).

        dec1, dec2: token lists from `decode`; hw1, hw2: (H, W) of view 1 and view 2 (hw2 defaults to hw1).
        descriptors: for MASt3R, also compute 'desc' (B, H, W, D) and 'desc_conf' (B, H, W) per view (ignored for
            DUSt3R); infer_pairs passes False because nothing downstream reads them.
        Returns pred1 {'pts3d', 'conf'} and pred2 {'pts3d_in_other_view', 'conf'}, float32 (plus 'desc',
        'desc_conf' for MASt3R with descriptors=True).
        """
        device_type = dec1[-1].device.type
        kw = {"descriptors": descriptors} if self.is_mast3r else {}
        with torch.autocast(device_type=device_type, enabled=False):
            pred1 = self.downstream_head1([t.float() for t in dec1], tuple(hw1), **kw)
            pred2 = self.downstream_head2([t.float() for t in dec2], tuple(hw2 or hw1), **kw)
        pred2["pts3d_in_other_view"] = pred2.pop("pts3d")
        return pred1, pred2

    def forward(self, img1: torch.Tensor, img2: torch.Tensor, true_shape1: Optional[torch.Tensor] = None,
                true_shape2: Optional[torch.Tensor] = None):
        """Predict both views' point maps in view 1's frame.

        img1, img2: (B, 3, H, W) float normalised to [-1, 1] ((x - 0.5) / 0.5), H and W multiples of 16; the two
            views may differ in size. true_shape1/2: optional (B, 2) (H, W), accepted for compatibility with the
            official call; they must equal the image sizes (images are never padded here).
        Returns pred1 {'pts3d' (B, H, W, 3), 'conf' (B, H, W)} in view 1's camera frame, and
        pred2 {'pts3d_in_other_view' (B, H2, W2, 3), 'conf' (B, H2, W2)}, view 2's points in view 1's frame.
        A MASt3R network adds 'desc' (B, H, W, D) unit descriptors and 'desc_conf' (B, H, W) to both (same keys as
        the official model); ReconX's alignment does not use them.

        As the official model does, a "symmetric" batch (element 2k+1 is element 2k with the views swapped) encodes
        only half the images and shares the features.
        """
        for name, img, shape in (("img1", img1, true_shape1), ("img2", img2, true_shape2)):
            self._check_input(name, img, shape)
        if img1.shape[0] != img2.shape[0]:
            raise InputError(f"img1 and img2 hold {img1.shape[0]} and {img2.shape[0]} images; pass one pair per row")
        B = img1.shape[0]
        symmetric = (B % 2 == 0 and img1.shape == img2.shape and torch.equal(img1[0::2], img2[1::2])
                     and torch.equal(img1[1::2], img2[0::2]))
        if symmetric:
            feat_a, feat_b, pos_a, pos_b = self._encode_two(img1[0::2], img2[0::2])
            feat1 = torch.stack((feat_a, feat_b), dim=1).flatten(0, 1)
            feat2 = torch.stack((feat_b, feat_a), dim=1).flatten(0, 1)
            pos1 = torch.stack((pos_a, pos_b), dim=1).flatten(0, 1)
            pos2 = torch.stack((pos_b, pos_a), dim=1).flatten(0, 1)
        else:
            feat1, feat2, pos1, pos2 = self._encode_two(img1, img2)
        dec1, dec2 = self.decode(feat1, pos1, feat2, pos2)
        return self.heads(dec1, dec2, tuple(img1.shape[-2:]), tuple(img2.shape[-2:]))

    def _encode_two(self, img1, img2):
        if img1.shape[-2:] == img2.shape[-2:]:
            feat, pos = self.encode(torch.cat((img1, img2), dim=0))
            (f1, f2), (p1, p2) = feat.chunk(2, dim=0), pos.chunk(2, dim=0)
            return f1, f2, p1, p2
        (f1, p1), (f2, p2) = self.encode(img1), self.encode(img2)
        return f1, f2, p1, p2

    def _check_input(self, name: str, img: torch.Tensor, true_shape: Optional[torch.Tensor]) -> None:
        if not isinstance(img, torch.Tensor) or img.dim() != 4 or img.shape[1] != 3:
            raise InputError(f"{name} must be a (B, 3, H, W) tensor, got "
                             f"{tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__}")
        H, W = img.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise InputError(f"{name} is {H}x{W} (HxW); both sides must be multiples of {p}. "
                             "Call reconx_core.dust3r.prepare_images first")
        if true_shape is not None:
            ts = torch.as_tensor(true_shape).reshape(-1, 2).to("cpu")
            if not bool((ts[:, 0] == H).all() and (ts[:, 1] == W).all()):
                raise InputError(f"{name}: true_shape {ts.tolist()} differs from the image size {H}x{W}; "
                                 "padded batches are not supported, pass images of their true size")
