"""Our tiled, differentiable Gaussian rasterizer in plain PyTorch (any device, no compile step).

Compositing follows gsplat's kernels: for each pixel, Gaussians front to back by camera depth,
alpha = min(0.999, opacity * exp(-sigma)) with sigma = 0.5 (a dx^2 + c dy^2) + b dx dy, a Gaussian is skipped
when sigma < 0 or alpha < 1/255, and the pixel stops (exclusively: the Gaussian that would bring the
transmittance to <= 1e-4 is not blended) as in gsplat.

How it is organised, and why:
- Pairing: every visible Gaussian is listed once per screen tile its opacity-aware box touches, in depth order
  (one global sort, all vectorised). Outside that box alpha < 1/255, so tiling changes nothing but the cost.
- Per pair, log2(opacity * exp(-sigma)) is a quadratic in the pixel offset from the tile centre: its six
  coefficients are computed once per pair with ordinary (autograd) tensor ops, and the dense part turns them into
  alphas for a whole chunk with one matrix product against the shared basis (1, i, j, i^2, ij, j^2).
- Tiles are processed in chunks padded to the chunk's longest list (tiles sorted by list length, so padding is
  small); a chunk is a dense (tiles, gaussians, pixels) block, so the work is a few large vectorised ops. The
  sequential transmittance is an exclusive cumulative product.
- The dense part is a custom autograd Function over the per-pair coefficients and features, with a hand-written
  backward (dL/dw -> dL/dalpha -> dL/dexponent). It keeps the three (tiles, gaussians, pixels) tensors the
  backward needs while they fit in `save_elems`; chunks beyond that budget are recomputed in the backward pass
  (as gsplat's CUDA backward does), so memory stays bounded.
- Only elementwise ops that CPUs run vectorised are used on the dense blocks: exp2 rather than exp, a cumulative
  product rather than log1p + cumsum + exp (log1p is far costlier than a multiply), and thresholds applied with
  `threshold_` rather than boolean masks (`torch.where` and products with masks are much slower than a
  multiply). Chunks of ~2^19 elements (2 MiB) stay in cache. bench/bench_render.py measures the whole.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .project import ALPHA_THRESHOLD

MAX_ALPHA = 0.999  # gsplat 1.5.3 (RasterizeToPixels3DGSFwd.cu: min(0.999f, ...)); Inria 3DGS uses 0.99
TRANSMITTANCE_THRESHOLD = 1e-4
LOG2E = 1.0 / math.log(2.0)
# Exponents (log2 alpha) below this are thresholded away anyway (2^-30 << 1/255); clamping them keeps exp2 on its
# fast path (very negative arguments take a slow path).
MIN_LOG2_ALPHA = -30.0
# (tiles, gaussians, pixels) elements of the backward's saved tensors (3 float tensors each); beyond this the
# remaining chunks are recomputed in the backward pass.
SAVE_ELEMS = 1 << 24
# Below this many (tiles, gaussians, pixels) elements the remaining tiles form one chunk whatever their padding.
SMALL_CHUNK_ELEMS = 1 << 17


def _below(value: float, dtype: torch.dtype) -> float:
    """The largest `dtype` number below `value` in that dtype: `x > _below(v)` is exactly `x >= v`."""
    v = torch.tensor(value, dtype=dtype)
    return float(torch.nextafter(v, torch.tensor(-math.inf, dtype=dtype)))


class TileLayout:
    """Which Gaussians touch which tile, in depth order, grouped into chunks (all integer tensors, no grad).

    Pairs (one per Gaussian and touched tile) are sorted by tile, then front to back:
    pair_gauss: (n_pairs,) long, the Gaussian of each pair.  pair_tile: (n_pairs,) long, its tile.
    chunks: list of (tile_ids (T,) long, pair_ids (T, k) long); pair_ids index the pairs, n_pairs = an empty slot
    (a padding row that renders nothing). Tiles are numbered row-major, tiles_x per row.
    centre: (n_tiles, 2) tile-centre pixel coordinates; basis: (6, P) the monomials (1, i, j, i^2, ij, j^2) of
    each pixel's offset (i, j) from its tile centre, P = tile_size^2, pixels row-major within a tile.
    """

    def __init__(self, means2d, radii, depths, visible, width, height, tile_size=8, chunk_elems=1 << 19,
                 pad_ratio=0.7):
        self.width, self.height, self.tile_size = width, height, tile_size
        self.tiles_x, self.tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
        n_tiles = self.tiles_x * self.tiles_y
        self.n_tiles = n_tiles
        device = means2d.device
        self.n_gaussians = means2d.shape[0]
        with torch.no_grad():
            ids = torch.nonzero(visible, as_tuple=False).squeeze(1)
            ids = ids[torch.argsort(depths.detach()[ids], stable=True)]          # front to back
            m, r = means2d.detach()[ids], radii[ids].to(means2d.dtype)
            # Pixel centres covered by the box, then the tiles holding them (inclusive ranges).
            u0 = torch.ceil(m[:, 0] - r[:, 0]).clamp(0, width - 1)
            u1 = torch.floor(m[:, 0] + r[:, 0]).clamp(0, width - 1)
            v0 = torch.ceil(m[:, 1] - r[:, 1]).clamp(0, height - 1)
            v1 = torch.floor(m[:, 1] + r[:, 1]).clamp(0, height - 1)
            tx0, tx1 = (u0 // tile_size).long(), (u1 // tile_size).long()
            ty0, ty1 = (v0 // tile_size).long(), (v1 // tile_size).long()
            nx, ny = (tx1 - tx0 + 1).clamp_min(0), (ty1 - ty0 + 1).clamp_min(0)
            touches = nx * ny
            gauss = torch.repeat_interleave(ids, touches)
            start = torch.cumsum(touches, 0) - touches
            offset = torch.arange(gauss.shape[0], device=device) - torch.repeat_interleave(start, touches)
            nx_rep = torch.repeat_interleave(nx, touches)
            tile = ((torch.repeat_interleave(ty0, touches) + offset // nx_rep) * self.tiles_x
                    + torch.repeat_interleave(tx0, touches) + offset % nx_rep)
            tile, order = torch.sort(tile, stable=True)                            # keeps depth order per tile
            self.pair_gauss, self.pair_tile = gauss[order], tile
            self.n_pairs = n_pairs = int(tile.shape[0])
            counts = torch.bincount(tile, minlength=n_tiles)
            tile_start = torch.cumsum(counts, 0) - counts
            # Chunks of tiles with similar list lengths, each about chunk_elems pair-pixels.
            by_len = torch.argsort(counts, descending=True)
            lengths = counts[by_len].tolist()
            P = tile_size * tile_size
            self.chunks = []
            n_busy = sum(1 for L in lengths if L > 0)
            i = 0
            while i < n_busy:
                k = lengths[i]
                n = max(1, min(n_busy - i, chunk_elems // max(1, k * P)))
                # End the chunk early where lists get much shorter, so that padding stays under ~1/3, unless all
                # the remaining tiles fit in a small chunk: there a chunk's fixed cost (~25 ops) outweighs padding.
                if n < n_busy - i or (n_busy - i) * k * P > SMALL_CHUNK_ELEMS:
                    n = max(1, min(n, sum(1 for L in lengths[i:i + n] if L >= pad_ratio * k)))
                tiles = by_len[i:i + n]
                slot = torch.arange(k, device=device)
                pair = tile_start[tiles, None] + slot
                pair = torch.where(slot < counts[tiles, None], pair, torch.full_like(pair, n_pairs))
                self.chunks.append((tiles, pair))
                i += n
            ty = torch.div(torch.arange(n_tiles, device=device), self.tiles_x, rounding_mode="floor")
            tx = torch.arange(n_tiles, device=device) % self.tiles_x
            # Offsets are taken from each tile's centre: small numbers keep the expanded quadratic form accurate.
            half = (tile_size - 1) / 2.0
            self.centre = torch.stack([tx * tile_size + half, ty * tile_size + half], -1).to(means2d.dtype)
            j, i2 = torch.meshgrid(torch.arange(tile_size, device=device), torch.arange(tile_size, device=device),
                                   indexing="ij")
            li, lj = (i2.reshape(-1) - half).to(means2d.dtype), (j.reshape(-1) - half).to(means2d.dtype)
            self.basis = torch.stack([torch.ones_like(li), li, lj, li * li, li * lj, lj * lj])   # (6, P)

    @property
    def dense_elems(self) -> int:
        """(tile, gaussian, pixel) elements of all chunks, padding included: the dense work per pass."""
        return sum(int(p.numel()) for _, p in self.chunks) * self.tile_size ** 2


def pair_coefficients(means2d, conics, opacities, layout: TileLayout) -> torch.Tensor:
    """Per pair, the coefficients of log2(alpha_raw) = log2(opacity) - sigma / ln 2 in the basis (1, i, j, i^2, ij,
    j^2) of the pixel offset from the pair's tile centre (differentiable ordinary ops).

    means2d: (N, 2); conics: (N, 3) (a, b, c); opacities: (N,). Returns (n_pairs + 1, 6); the last row is the
    empty slot (alpha 0).
    """
    g = layout.pair_gauss
    m = means2d[g] - layout.centre[layout.pair_tile]               # mean relative to the tile centre
    mx, my = m.unbind(-1)
    A, B, C = conics[g].unbind(-1)
    log_op = torch.log(opacities.clamp_min(1e-30))[g]
    coef = torch.stack([0.5 * A * mx * mx + B * mx * my + 0.5 * C * my * my - log_op, -(A * mx + B * my),
                        -(C * my + B * mx), 0.5 * A, B, 0.5 * C], -1) * (-LOG2E)
    empty = coef.new_zeros(1, 6)
    empty[0, 0] = 2.0 * MIN_LOG2_ALPHA
    return torch.cat([coef, empty], 0)


def _chunk_weights(coef, pair, basis, for_grad: bool, alpha_min: float):
    """Blending weights of one chunk, all (T, k, P).

    coef: (n_pairs + 1, 6) log2-alpha coefficients; pair: (T, k) pair ids; basis: (6, P).
    Returns w (weights alpha_k T_k, 0 after the stop) and, when for_grad, w_nc and q: w and alpha / (1 - alpha)
    where the alpha is not clamped at MAX_ALPHA (they carry d(alpha)/d(exponent)), 0 elsewhere.
    """
    raw = torch.matmul(coef[pair], basis)                          # log2(opacity exp(-sigma))
    raw.clamp_min_(MIN_LOG2_ALPHA).exp2_()
    F.threshold(raw, alpha_min, 0.0, inplace=True)                 # alpha < 1/255: skipped
    a = raw.clamp_max(MAX_ALPHA) if for_grad else raw.clamp_max_(MAX_ALPHA)
    one_minus = torch.rsub(a, 1.0)
    t = torch.cumprod(one_minus, 1)                                # transmittance after each Gaussian
    F.threshold(t, TRANSMITTANCE_THRESHOLD, 0.0, inplace=True)     # the stop is exclusive: <= 1e-4 is not blended
    t.div_(one_minus)                                              # transmittance before each Gaussian
    if not for_grad:
        return a.mul_(t), None, None
    w = a * t
    a_nc = F.threshold(raw.neg_(), -MAX_ALPHA, 0.0, inplace=True).neg_()   # raw where raw < MAX_ALPHA, else 0
    return w, t.mul_(a_nc), a_nc.div_(one_minus)


def _composite_forward(coef, feats, layout: TileLayout, save_elems: int = 0):
    """out (n_tiles, C + 1, P): per tile and pixel sum_k w_k [feats_k, 1]; and per chunk the saved tensors
    (w, w_nc, q) of `_chunk_weights` while they fit in save_elems elements (None after)."""
    alpha_min = _below(ALPHA_THRESHOLD, coef.dtype)
    f = torch.cat([feats, feats.new_ones(feats.shape[0], 1)], 1)  # the ones column accumulates alpha
    P = layout.tile_size ** 2
    out = feats.new_zeros(layout.n_tiles, f.shape[1], P)
    saved, used = [], 0
    for tiles, pair in layout.chunks:
        keep = save_elems > 0 and used + pair.numel() * P <= save_elems
        w, w_nc, q = _chunk_weights(coef, pair, layout.basis, keep, alpha_min)
        out[tiles] = torch.bmm(f[pair].transpose(1, 2), w)
        saved.append((w, w_nc, q) if keep else None)
        used += pair.numel() * P if keep else 0
    return out, saved


class _Composite(torch.autograd.Function):
    """Front-to-back compositing of every tile from per-pair coefficients and features.

    Inputs: coef (n_pairs + 1, 6) from `pair_coefficients`; feats (n_pairs + 1, C), the last row the empty slot;
    layout: TileLayout; save_elems: budget of saved dense elements. Output: (n_tiles, C + 1, P), the last channel
    the accumulated alpha.
    """

    @staticmethod
    def forward(ctx, coef, feats, layout, save_elems):
        out, saved = _composite_forward(coef, feats, layout, save_elems)
        ctx.layout, ctx.saved = layout, saved
        ctx.save_for_backward(coef, feats)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        coef, feats = ctx.saved_tensors
        layout = ctx.layout
        alpha_min = _below(ALPHA_THRESHOLD, coef.dtype)
        f = torch.cat([feats, feats.new_ones(feats.shape[0], 1)], 1)
        g_coef, g_f = torch.zeros_like(coef), torch.zeros_like(f)
        for (tiles, pair), saved in zip(layout.chunks, ctx.saved):
            w, w_nc, q = saved if saved is not None else _chunk_weights(coef, pair, layout.basis, True, alpha_min)
            go = grad_out[tiles]                                       # (T, C + 1, P)
            g_f[pair] = torch.bmm(go, w.transpose(1, 2)).transpose(1, 2)   # (T, k, C + 1)
            dw = torch.bmm(f[pair], go)                                # dL/dw_k per pixel, (T, k, P)
            # dL/dalpha_k = T_k dw_k - sum_{j > k} w_j dw_j / (1 - alpha_k); times d(alpha)/d(log2 alpha) / ln 2.
            later = (w * dw).cumsum_(1)
            later.sub_(later[:, -1:].clone())                          # -sum over the later Gaussians
            d = dw.mul_(w_nc).addcmul_(later, q)
            # basis @ d^T rather than d @ basis^T: BLAS is faster with the long dimension as N.
            g_coef[pair.reshape(-1)] = torch.mm(layout.basis, d.reshape(-1, d.shape[-1]).t()).t()
        ctx.saved = None
        g_coef.mul_(math.log(2.0))
        g_coef[-1] = 0                                                 # the empty slot (written by every chunk)
        g_f[-1] = 0
        return g_coef, g_f[:, :-1], None, None


def rasterize_torch(means2d, conics, opacities, feats, layout: TileLayout, save_elems: Optional[int] = None):
    """Composite Gaussians into one image.

    means2d: (N, 2) pixels; conics: (N, 3); opacities: (N,) in [0, 1]; feats: (N, C) (colour, depth, ...).
    save_elems: budget of (tile, gaussian, pixel) elements kept from the forward for the backward pass (3 float
    tensors of that size); chunks beyond it are recomputed. None: the module's SAVE_ELEMS (1 << 24, 192 MiB).
    Returns feat_img (H, W, C) = sum_i w_i f_i and alpha (H, W) = sum_i w_i (no background), differentiable.
    """
    save_elems = SAVE_ELEMS if save_elems is None else int(save_elems)
    coef = pair_coefficients(means2d, conics, opacities, layout)
    pf = feats[layout.pair_gauss]
    pf = torch.cat([pf, pf.new_zeros(1, pf.shape[1])], 0)
    if torch.is_grad_enabled() and (coef.requires_grad or pf.requires_grad):
        out = _Composite.apply(coef, pf, layout, save_elems)
    else:
        out = _composite_forward(coef, pf, layout)[0]
    ts, H, W = layout.tile_size, layout.height, layout.width
    C = feats.shape[1] + 1
    img = out.reshape(layout.tiles_y, layout.tiles_x, C, ts, ts).permute(0, 3, 1, 4, 2)
    img = img.reshape(layout.tiles_y * ts, layout.tiles_x * ts, C)[:H, :W]
    return img[..., :-1], img[..., -1]
