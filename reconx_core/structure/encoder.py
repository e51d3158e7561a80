"""ReconX point-cloud encoder: F(P) = FFN(CrossAttn(PosEmb(P~), PosEmb(P))).

P is the scene's confidence-filtered point cloud, P~ its deterministic 1/8 farthest-point downsample. Each token
of P~ attends to the whole cloud P; the output tokens have the UNet's context width (1024 for DynamiCrafter 512)
and feed the structure branch of every spatial cross-attention (see reconx_core.video.attention).

Coordinates are normalised per cloud (centred on the mean, divided by the largest distance from it) before the
Fourier embedding, so the encoder sees the same range whatever DUSt3R's arbitrary scene scale is.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..errors import InputError
from ..types import Scene

DOWNSAMPLE = 8


def normalize_points(points: torch.Tensor) -> torch.Tensor:
    """Centre each cloud on its mean and scale it into the unit ball. points: (B, N, 3) -> (B, N, 3)."""
    centred = points - points.mean(dim=1, keepdim=True)
    radius = centred.norm(dim=-1).amax(dim=1).clamp_min(1e-8)
    return centred / radius[:, None, None]


@torch.no_grad()
def farthest_point_sample(points: torch.Tensor, m: int, callback: Optional[Callable[[int, int], None]] = None
                          ) -> torch.Tensor:
    """Deterministic farthest-point sampling. points: (B, N, 3); returns (B, m) int64 indices.

    Starts from the point nearest each cloud's centroid (not a random one), so the same cloud always gives the
    same tokens. O(m*N) time, O(N) memory. `callback(step, total)` is called every 256 picks.
    """
    b, n, _ = points.shape
    if not 1 <= m <= n:
        raise InputError(f"cannot pick {m} of {n} points")
    pts = points.float()
    idx = torch.empty(b, m, dtype=torch.long, device=points.device)
    far = (pts - pts.mean(dim=1, keepdim=True)).square().sum(-1).argmin(dim=1)
    dist = torch.full((b, n), float("inf"), device=points.device)
    batch = torch.arange(b, device=points.device)
    for i in range(m):
        idx[:, i] = far
        d = (pts - pts[batch, far][:, None]).square().sum(-1)
        dist = torch.minimum(dist, d)
        far = dist.argmax(dim=1)
        if callback is not None and (i % 256 == 255 or i == m - 1):
            callback(i + 1, m)
    return idx


class FourierEmbedding(nn.Module):
    """[xyz, sin(2^k pi xyz), cos(2^k pi xyz)] for k < num_freqs, then a linear map. (B, N, 3) -> (B, N, dim)."""

    def __init__(self, dim: int, num_freqs: int = 8):
        super().__init__()
        self.num_freqs = num_freqs
        self.register_buffer("freqs", self._bands(), persistent=False)
        self.proj = nn.Linear(3 + 6 * num_freqs, dim)

    def _bands(self, device=None) -> torch.Tensor:
        return (2.0 ** torch.arange(self.num_freqs, device=device)) * math.pi

    def reset_buffers(self, device="cpu") -> None:
        """Recreate the frequency bands (not stored in checkpoints), e.g. after a meta build."""
        self.freqs = self._bands(device)

    def forward(self, xyz: torch.Tensor) -> torch.Tensor:
        """xyz: (B, N, 3) normalised coordinates -> (B, N, dim) in the projection's dtype.

        The angles reach 2^(num_freqs-1) pi: half precision cannot hold them (bf16 loses the top bands entirely),
        so the features are computed in float32 and cast only for the projection.
        """
        xyz32 = xyz.float()
        angles = (xyz32[..., None] * self.freqs.float()).flatten(-2)
        features = torch.cat([xyz32, angles.sin(), angles.cos()], dim=-1)
        return self.proj(features.to(self.proj.weight.dtype))


class PointCloudEncoder(nn.Module):
    """Point cloud (B, N, 3) -> structure tokens (B, ceil(N/8), dim).

    dim: token width (the UNet's context_dim, 1024). heads: attention heads. num_freqs: Fourier bands.
    chunk: queries per attention call, which bounds memory to O(chunk*N) when SDPA falls back to the math kernel.
    The output passes through a LayerNorm so the tokens have a fixed scale for `to_k_struct`/`to_v_struct`.
    """

    def __init__(self, dim: int = 1024, heads: int = 8, num_freqs: int = 8, ff_mult: int = 4, chunk: int = 4096):
        super().__init__()
        if dim % heads:
            raise InputError(f"dim {dim} must be divisible by heads {heads}")
        self.dim, self.heads, self.chunk = dim, heads, chunk
        self.config = {"dim": dim, "heads": heads, "num_freqs": num_freqs, "ff_mult": ff_mult}
        self.pos_emb = FourierEmbedding(dim, num_freqs)
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ff_mult * dim), nn.GELU(),
                                nn.Linear(ff_mult * dim, dim))
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, points: torch.Tensor, callback: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
        """points: (B, N, 3) world coordinates (any scale), finite. Returns (B, ceil(N/8), dim) in the weights' dtype."""
        if points.dim() != 3 or points.shape[-1] != 3 or points.shape[1] < 1:
            raise InputError(f"points must be (B, N, 3) with N >= 1, got {tuple(points.shape)}")
        if not points.is_meta and not torch.isfinite(points).all():  # meta: memory tracing (training.memory)
            raise InputError("points contain NaN or inf; filter them (scene_points does) before encoding")
        xyz = normalize_points(points.float())
        m = math.ceil(xyz.shape[1] / DOWNSAMPLE)
        idx = farthest_point_sample(xyz, m, callback)
        queries = torch.gather(xyz, 1, idx[..., None].expand(-1, -1, 3))
        q_emb = self.pos_emb(queries)
        kv_emb = self.pos_emb(xyz)
        k, v = self.to_kv(self.norm_kv(kv_emb)).chunk(2, dim=-1)
        k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (k, v))
        q = rearrange(self.to_q(self.norm_q(q_emb)), "b n (h d) -> b h n d", h=self.heads)
        out = torch.cat([F.scaled_dot_product_attention(q[:, :, s:s + self.chunk], k, v)
                         for s in range(0, m, self.chunk)], dim=2)
        x = q_emb + self.to_out(rearrange(out, "b h n d -> b n (h d)"))
        x = x + self.ff(x)
        return self.norm_out(x)


def scene_points(scene: Scene, max_points: int = 65536) -> torch.Tensor:
    """The scene's confident world points as one cloud: (1, N, 3) float32, N <= max_points.

    Keeps `scene.confident_mask()` (conf > scene.min_conf, finite points), then takes an evenly strided subset
    (deterministic) if more than max_points remain.
    """
    if max_points < 1:
        raise InputError(f"max_points must be >= 1, got {max_points}")
    pts = scene.pts3d[scene.confident_mask()]
    if pts.shape[0] == 0:
        raise InputError(f"no point has confidence above {scene.min_conf:g} (max is {scene.conf.max().item():.2f}); "
                         "lower the minimum confidence of ReconX DUSt3R Global Alignment")
    if pts.shape[0] > max_points:
        sel = torch.linspace(0, pts.shape[0] - 1, max_points, device=pts.device).round().long()
        pts = pts[sel]
    return pts.float()[None]


def encode_scene(encoder: PointCloudEncoder, scene: Scene, max_points: int = 65536,
                 callback: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
    """ReconX structure tokens of a scene: `encoder(scene_points(scene, max_points))`, on the encoder's device.

    Returns (1, ceil(N/8), dim) in the encoder's dtype, N <= max_points confident points.
    """
    device = next(encoder.parameters()).device
    with torch.no_grad():
        return encoder(scene_points(scene, max_points).to(device), callback=callback)
