"""The point-cloud cache's content: DUSt3R + two-view alignment on a clip segment's first and last frames.

As at inference (reconx_core.structure.scene_points on the aligned scene): both end frames go through DUSt3R's own
resize and crop, the pair is aligned (two views: DUSt3R's pair viewer, no optimisation), and the confident points
(conf > min_conf) of both views, in the first view's camera frame, become the segment's cloud, with their colours
and confidences; more than `max_points` are thinned by an even stride.

`prepare_cache` walks a dataset and writes one cache entry per segment (reconx_core.training.data.write_cloud),
skipping entries that exist, so an interrupted run continues where it stopped; with several processes
(accelerate launch) each takes an even share of the entries.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from ..errors import InputError, ReconXError
from .data import clip_segments, entry_name, subsample_points, write_cache_index, write_cloud

log = logging.getLogger(__name__)


def clip_length(dataset, key: str) -> int:
    """Frames in clip `key` of a Re10kDataset (chunk layout) or Dl3dvDataset (nerfstudio layout)."""
    if hasattr(dataset, "clip"):
        return len(dataset.clip(key))
    return len(dataset.scene(key))


def end_frames_cloud(dust3r, images: torch.Tensor, min_conf: float = 3.0, max_points: int = 65536,
                     batch_size: int = 2) -> tuple:
    """The cloud of two frames. images: (2, 3, H, W) float in [0, 1] (first and last frame of a segment).

    Returns (points (N, 3) float32 in the first frame's camera frame, colours (N, 3) in [0, 1], conf (N,)), N <=
    max_points; all on the CPU. Raises InputError (from the alignment or scene_points' rule) when no point is
    confident.
    """
    from ..align import align_views
    from ..dust3r import infer_pairs, prepare_images

    device = next(dust3r.parameters()).device
    views = prepare_images(images.to(device), size=dust3r.image_size)
    with torch.inference_mode():
        pairs = infer_pairs(dust3r, views, graph="complete", batch_size=batch_size)
    scene = align_views(pairs, min_conf_thr=min_conf)
    mask = scene.confident_mask()
    if not bool(mask.any()):
        raise InputError(f"no point has confidence above {min_conf:g} (max {float(scene.conf.max()):.2f})")
    points, colours = scene.pts3d[mask], scene.images.permute(0, 2, 3, 1)[mask]
    conf = scene.conf[mask]
    keep = subsample_points(points.shape[0], max_points) if points.shape[0] > max_points else \
        torch.arange(points.shape[0], device=points.device)
    return points[keep].float().cpu(), colours[keep].float().cpu(), conf[keep].float().cpu()


def prepare_cache(dataset, dust3r, cache_dir: Union[str, Path], keys: Optional[Sequence[str]] = None,
                  max_span: Optional[int] = None, min_frames: int = 2, min_conf: float = 3.0,
                  max_points: int = 65536, rank: int = 0, world: int = 1, dust3r_name: str = "",
                  callback: Optional[Callable[[int, int, str], None]] = None) -> dict:
    """Write the cache entries of `keys` (default: all clips) that do not exist yet.

    dataset: a Re10kDataset / Dl3dvDataset; dust3r: a loaded Dust3R; cache_dir: where entries go. max_span: cut
    clips into segments of at most this many frames (None: one segment per clip). Process `rank` of `world` takes
    every world-th clip (so chunk-ordered clips spread evenly). A clip DUSt3R cannot handle is logged and skipped.
    callback(done, total, entry) after each clip. Returns {"written", "skipped", "failed": [(entry, reason)]}.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    keys = list(dataset.keys() if keys is None else keys)
    mine = keys[rank::world]
    written, skipped, failed = 0, 0, []
    for n, key in enumerate(mine):
        try:
            length = clip_length(dataset, key)
        except ReconXError as err:
            failed.append((key, str(err)))
            continue
        for start, end in clip_segments(length, max_span, min_frames):
            name = entry_name(key, start, end, length)
            path = cache_dir / f"{name}.safetensors"
            if path.is_file():
                skipped += 1
                continue
            t0 = time.perf_counter()
            try:
                from ..data.clip import uint8_to_float

                images, _ = dataset.views(key, [start, end])
                points, colours, conf = end_frames_cloud(dust3r, uint8_to_float(images), min_conf, max_points)
            except ReconXError as err:
                log.warning("%s: skipped (%s)", name, err)
                failed.append((name, str(err)))
                continue
            write_cloud(path, points, colours, conf, {"key": key, "start": start, "end": end, "num_frames": length,
                                                      "dust3r": dust3r_name, "min_conf": min_conf,
                                                      "image_size": list(images.shape[1:3])})
            written += 1
            log.info("%s: %d points (%.1f s)", name, points.shape[0], time.perf_counter() - t0)
        if callback is not None:
            callback(n + 1, len(mine), key)
    return {"written": written, "skipped": skipped, "failed": failed}


def finish_cache(cache_dir: Union[str, Path]) -> dict:
    """Rebuild CACHE/index.json from the entries (the main process, after every process is done)."""
    return write_cache_index(cache_dir)
