"""Pair graphs (official `make_pairs` names and order) and batched pairwise DUSt3R inference.

`infer_pairs` encodes every view once and reuses the features for all the edges that touch it; the official
`inference` encodes both images of every pair (or half of them for a symmetric batch). Results agree to float
rounding (the encoder is per-image; only batch composition differs).
"""

from __future__ import annotations

import logging
import math
from typing import Callable, List, Optional, Tuple, Union

import torch

from ..errors import InputError
from ..types import PairPredictions
from .model import Dust3R

log = logging.getLogger(__name__)

MIN_SIDE = 64
GRAPHS = "complete, swin-K, swin-K-noncyclic, logwin-K, logwin-K-noncyclic, oneref-R"


def _window(graph: str) -> int:
    try:
        return int(graph.split("-")[1])
    except (IndexError, ValueError):
        return 3  # the official default when the name carries no number


def make_pair_edges(n_views: int, graph: str = "complete", symmetrize: bool = True) -> torch.Tensor:
    """Directed view pairs (i, j) -> (E, 2) long, in the order of the official `make_pairs`.

    graph: "complete" (all i > j), "swin-K" / "swin-K-noncyclic" (each view with its K next ones, cyclic by
    default), "logwin-K[-noncyclic]" (offsets 1, 2, 4, ... 2^(K-1) on both sides), "oneref-R" (view R with every
    other view). symmetrize appends every pair reversed, after all the forward pairs, as the official code does.
    Self-pairs, which the official cyclic windows produce when K >= n_views, are dropped.
    """
    n = int(n_views)
    if n < 2:
        raise InputError(f"DUSt3R needs at least 2 views to make pairs, got {n}")
    g = str(graph).strip()
    pairs: List[Tuple[int, int]] = []
    if g == "complete":
        pairs = [(i, j) for i in range(n) for j in range(i)]
    elif g.startswith(("swin", "logwin")):
        cyclic = not g.endswith("noncyclic")
        k = _window(g)
        if k < 1:
            raise InputError(f"scene graph {graph!r}: the window must be at least 1")
        # the official code collects unordered pairs in a Python set and iterates it; building the same set with
        # the same insertions reproduces its order
        ids = set()
        for i in range(n):
            if g.startswith("swin"):
                others = [i + d for d in range(1, k + 1)]
            else:
                offsets = [2 ** e for e in range(k)]
                others = [i - o for o in offsets] + [i + o for o in offsets]
            for j in others:
                if cyclic:
                    j = j % n
                if j < 0 or j >= n or (g.startswith("logwin") and j == i):
                    continue
                ids.add((i, j) if i < j else (j, i))
        pairs = [(i, j) for i, j in ids if i != j]
    elif g.startswith("oneref"):
        try:
            ref = int(g.split("-")[1]) if "-" in g else 0
        except ValueError:
            raise InputError(f"scene graph {graph!r}: write oneref-R with R a view index") from None
        if not 0 <= ref < n:
            raise InputError(f"scene graph {graph!r}: reference view {ref} does not exist among {n} views")
        pairs = [(ref, j) for j in range(n) if j != ref]
    else:
        raise InputError(f"unknown scene graph {graph!r}; use one of: {GRAPHS}")
    if symmetrize:
        pairs = pairs + [(j, i) for i, j in pairs]
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def check_views(images: torch.Tensor, patch_size: int = 16) -> None:
    """Raise InputError unless images is (N >= 2, 3, H, W), finite, in [0, 1], H, W >= 64 and multiples of 16."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InputError(f"images must be an (N, 3, H, W) tensor in [0, 1], got {shape}")
    N, _, H, W = images.shape
    if N < 2:
        raise InputError(f"DUSt3R needs at least 2 views, got {N}; add another photo of the scene")
    if min(H, W) < MIN_SIDE:
        raise InputError(f"images are {W}x{H} pixels; DUSt3R needs at least {MIN_SIDE} px on each side")
    if not bool(torch.isfinite(images).all()):
        bad = sorted({int(i) for i in (~torch.isfinite(images)).flatten(1).any(1).nonzero().flatten()})
        raise InputError(f"views {bad} contain NaN or infinite pixels; fix or drop them")
    if H % patch_size or W % patch_size:
        raise InputError(f"images are {W}x{H}; width and height must be multiples of {patch_size}. "
                         "Call reconx_core.dust3r.prepare_images(images, size=model.image_size) first")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise InputError(f"image values span [{lo:.3g}, {hi:.3g}]; expected floats in [0, 1]")


@torch.no_grad()
def infer_pairs(model: Dust3R, images: torch.Tensor, graph: Union[str, torch.Tensor] = "complete",
                batch_size: int = 8, callback: Optional[Callable[[int, int], None]] = None) -> PairPredictions:
    """Run DUSt3R on every edge of a pair graph.

    model: a `Dust3R` (e.g. from `load_dust3r`); its device is where everything runs.
    images: (N, 3, H, W) float in [0, 1], already prepared (`prepare_images`); N >= 2.
    graph: a scene-graph name (see `make_pair_edges`, symmetrised) or an explicit (E, 2) long tensor of edges.
    batch_size: images per encoder forward and pairs per decoder forward.
    callback(done, total): after each batch (encoder batches, then pair batches), done = 1 .. total.
    On CUDA with a float16/bfloat16 model the encoder and decoders run under autocast; heads run in float32.
    Returns PairPredictions on the model's device: edges (E, 2) long; pts_i, pts_j_in_i (E, H, W, 3) float32 in
    camera i's frame; conf_i, conf_j (E, H, W) float32 (>= 1); images (N, 3, H, W) float32.
    """
    check_views(images, model.patch_size)
    N, _, H, W = images.shape
    if isinstance(graph, torch.Tensor):
        edges = graph.to(torch.long).reshape(-1, 2)
        bad = edges.numel() == 0 or int(edges.min()) < 0 or int(edges.max()) >= N
        if bad or bool((edges[:, 0] == edges[:, 1]).any()):
            raise InputError(f"edges must be pairs of distinct view indices in [0, {N}), got {edges.tolist()[:6]}...")
    else:
        edges = make_pair_edges(N, graph)
    batch_size = max(1, int(batch_size))
    device = next(model.parameters()).device
    views = images.to(device=device, dtype=torch.float32)
    normalised = (views - 0.5) / 0.5  # the official ImgNorm
    E = edges.shape[0]
    n_enc, n_dec = math.ceil(N / batch_size), math.ceil(E / batch_size)
    total = n_enc + n_dec
    dtype = model.compute_dtype
    use_amp = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)

    def autocast():
        return torch.autocast("cuda", dtype=dtype, enabled=use_amp)

    feats, poss = [], []
    for b in range(n_enc):
        with autocast():
            f, p = model.encode(normalised[b * batch_size:(b + 1) * batch_size])
        feats.append(f)
        poss.append(p)
        if callback is not None:
            callback(b + 1, total)
    feats, poss = torch.cat(feats), torch.cat(poss)

    pts_i = torch.empty(E, H, W, 3, device=device)
    pts_j = torch.empty(E, H, W, 3, device=device)
    conf_i = torch.empty(E, H, W, device=device)
    conf_j = torch.empty(E, H, W, device=device)
    edges_dev = edges.to(device)
    for b in range(n_dec):
        sl = slice(b * batch_size, (b + 1) * batch_size)
        i, j = edges_dev[sl, 0], edges_dev[sl, 1]
        with autocast():
            dec1, dec2 = model.decode(feats[i], poss[i], feats[j], poss[j])
        pred1, pred2 = model.heads(dec1, dec2, (H, W), descriptors=False)  # MASt3R descriptors: unused here
        pts_i[sl], conf_i[sl] = pred1["pts3d"], pred1["conf"]
        pts_j[sl], conf_j[sl] = pred2["pts3d_in_other_view"], pred2["conf"]
        if callback is not None:
            callback(n_enc + b + 1, total)
    log.info("DUSt3R: %d views, %d pairs at %dx%d", N, E, W, H)
    return PairPredictions(edges=edges_dev, pts_i=pts_i, pts_j_in_i=pts_j, conf_i=conf_i, conf_j=conf_j,
                           images=views)
