"""SYNTHETIC TRAINING DATA for tests: clips in RealEstate10K's chunk layout with ground-truth point-cloud caches.

Two kinds:
- `write_room_clips`: reconx_core.data.synthetic's ray-cast rooms (a camera walking through a textured room) in
  DIR/train, and their cache from the exact 3D points of each clip's first and last frames (no DUSt3R).
- `write_parallax_clips`: clips whose in-between frames the point cloud determines and the two end frames do
  not. Each clip looks at a slanted textured plane: depth z = d0 / (1 - k x) along the ray of normalised image
  coordinate x (inverse depth linear across the image), k drawn per clip in [-k_max, k_max]. The plane's colour at
  a 3D point is a random texture looked up at that point's projection into the first camera, so the first frame
  is the texture itself whatever k and d0 are. The camera slides sideways by b sin(pi s) at time s in [0, 1] and
  comes back: the last frame equals the first. In between, every pixel moves by about f b sin(pi s) / z, so the
  left part of the picture moves more than the right part when k > 0 and less when k < 0. The two references
  (identical, and identical for every k) say nothing about k; the cloud (the plane's points seen by the first
  camera) shows the slant. So a model can only predict the middle frames' motion through the structure tokens.
  The plane is also glossy: its brightness grows by up to `gloss` * k as the camera moves towards the side it
  faces, a global effect of the geometry that even a tiny model can learn from the tokens in a few steps.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..data.re10k import cameras_to_re10k
from ..types import Cameras
from .data import default_cache_dir, entry_name, write_cache_index, write_cloud

PathLike = Union[str, Path]


def _jpeg(image: np.ndarray, quality: int = 95) -> torch.Tensor:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _write_chunks(root: PathLike, split: str, scenes: list, scenes_per_chunk: int) -> list:
    """scenes: dicts in pixelSplat's layout. Writes ROOT/split/NNNNNN.torch + index.json; returns chunk paths."""
    folder = Path(root) / split
    folder.mkdir(parents=True, exist_ok=True)
    chunks, index = [], {}
    for start in range(0, len(scenes), scenes_per_chunk):
        name = f"{len(chunks):06d}.torch"
        part = scenes[start:start + scenes_per_chunk]
        torch.save(part, folder / name)
        chunks.append(folder / name)
        index.update({item["key"]: name for item in part})
    (folder / "index.json").write_text(json.dumps(index))
    return chunks


def _scene(key: str, cameras: Cameras, images: torch.Tensor, url: str) -> dict:
    frames = _to_uint8(images)
    return {"url": url, "timestamps": torch.arange(len(frames)) * 33_366, "cameras": cameras_to_re10k(cameras),
            "key": key, "images": [_jpeg(f) for f in frames]}


def write_room_clips(root: PathLike, n_clips: int = 4, n_frames: int = 12, height: int = 64, width: int = 64,
                     seed: int = 0, split: str = "train", cache: bool = True, scenes_per_chunk: int = 2) -> dict:
    """Synthetic rooms (reconx_core.data.synthetic.SyntheticRoom) as RealEstate10K training clips, and (cache=True)
    their ground-truth cache in ROOT/pointclouds/SPLIT: the exact points of each clip's first and last frames.
    Returns {"keys", "chunks", "cache"}."""
    from ..data.synthetic import SyntheticRoom, synthetic_key

    scenes, clouds = [], {}
    for n in range(n_clips):
        room = SyntheticRoom(seed + n)
        cams = room.trajectory(n_frames, width, height)
        images, _, points = room.render(cams)
        key = synthetic_key(seed + n)
        scenes.append(_scene(key, cams, images, f"synthetic://room/{seed + n}"))
        ends = [0, n_frames - 1]
        clouds[key] = (points[ends].reshape(-1, 3), images[ends].permute(0, 2, 3, 1).reshape(-1, 3))
    chunks = _write_chunks(root, split, scenes, scenes_per_chunk)
    cache_dir = _write_cache(root, split, clouds, n_frames, "ground truth (SyntheticRoom)") if cache else None
    return {"keys": list(clouds), "chunks": chunks, "cache": cache_dir}


def _write_cache(root, split, clouds: dict, n_frames: int, source: str) -> Path:
    cache_dir = default_cache_dir(root, split)
    for key, (points, colours) in clouds.items():
        conf = torch.full((points.shape[0],), 10.0)
        meta = {"key": key, "start": 0, "end": n_frames - 1, "num_frames": n_frames, "dust3r": source}
        write_cloud(cache_dir / f"{entry_name(key, 0, n_frames - 1, n_frames)}.safetensors", points, colours, conf,
                    meta)
    write_cache_index(cache_dir)
    return cache_dir


class ParallaxClip:
    """One slanted-plane clip (see the module docstring). slope k in [-1, 1) keeps the plane in front of the
    camera over the whole view for focal >= 0.75 W; d0 its depth on the optical axis; baseline b the largest
    sideways offset of the camera, as a fraction of d0."""

    def __init__(self, seed: int, size: int = 64, slope: Optional[float] = None, k_max: float = 0.9,
                 baseline: float = 0.25, texture_seed: Optional[int] = None, gloss: float = 0.35):
        g = torch.Generator().manual_seed(int(seed))
        self.size = size
        self.focal = 0.8 * size
        self.centre = (size - 1) / 2
        self.slope = float(slope) if slope is not None else float((2 * torch.rand((), generator=g) - 1) * k_max)
        self.depth = 2.0 + float(torch.rand((), generator=g))
        self.baseline = baseline * self.depth
        self.gloss = gloss
        # texture: a few random oriented sinusoids per channel over camera-0 pixel coordinates (its own seed when
        # given, so that many clips can share one look and differ only in their geometry)
        if texture_seed is not None:
            g = torch.Generator().manual_seed(int(texture_seed))
        self.freq = (0.02 + 0.05 * torch.rand(3, 4, generator=g, dtype=torch.float64)) * 2 * math.pi / (size / 64)
        self.angle = math.pi * torch.rand(3, 4, generator=g, dtype=torch.float64)
        self.phase = 2 * math.pi * torch.rand(3, 4, generator=g, dtype=torch.float64)
        self.base = 0.35 + 0.3 * torch.rand(3, 1, generator=g, dtype=torch.float64)

    def texture(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Colours (3, ...) in [0, 1] at camera-0 pixel coordinates u, v (float64)."""
        direction = torch.cos(self.angle)[..., None] * u.reshape(1, 1, -1) + torch.sin(self.angle)[..., None] * \
            v.reshape(1, 1, -1)
        waves = torch.sin(self.freq[..., None] * direction + self.phase[..., None]).sum(1) * 0.15
        return (self.base + waves).clamp(0, 1).reshape(3, *u.shape)

    def cameras(self, n_frames: int) -> Cameras:
        c2w = torch.eye(4).repeat(n_frames, 1, 1)
        s = torch.linspace(0, 1, n_frames, dtype=torch.float64)
        c2w[:, 0, 3] = (self.baseline * torch.sin(math.pi * s)).float()
        K = torch.tensor([[self.focal, 0, self.centre], [0, self.focal, self.centre], [0, 0, 1.0]])
        return Cameras(c2w, K.expand(n_frames, 3, 3).clone(), self.size, self.size)

    def render(self, n_frames: int) -> tuple:
        """(images (T, 3, S, S) float32 in [0, 1], points (S*S, 3) float32 of the first frame, colours (S*S, 3))."""
        S = self.size
        v, u = torch.meshgrid(torch.arange(S, dtype=torch.float64), torch.arange(S, dtype=torch.float64),
                              indexing="ij")
        dx, dy = (u - self.centre) / self.focal, (v - self.centre) / self.focal
        k, d0 = self.slope, self.depth
        images = []
        for offset in self.cameras(n_frames).cam_to_world[:, 0, 3].double():
            # the ray o + t (dx, dy, 1), o = (offset, 0, 0), meets the plane z = d0 + k X
            t = (d0 + k * offset) / (1 - k * dx)
            x, y, z = offset + t * dx, t * dy, t
            colour = self.texture(self.focal * x / z + self.centre, self.focal * y / z + self.centre)
            # view-dependent reflectance: brighter as the camera moves towards the side the plane faces
            # (its normal is along (-k, 0, 1)), the same at both ends
            shine = 1 + self.gloss * k * float(offset) / self.baseline
            images.append((colour * shine).clamp(0, 1))
        t0 = d0 / (1 - k * dx)
        points = torch.stack([t0 * dx, t0 * dy, t0], -1).reshape(-1, 3)
        return torch.stack(images).float(), points.float(), images[0].reshape(3, -1).T.float()


def parallax_key(seed: int) -> str:
    return f"parallax{int(seed):08x}"


def write_parallax_clips(root: PathLike, n_clips: int = 8, n_frames: int = 8, size: int = 64, seed: int = 0,
                         split: str = "train", scenes_per_chunk: int = 4, slopes: Optional[list] = None,
                         texture_seed: Optional[int] = None, gloss: float = 0.35, baseline: float = 0.25) -> dict:
    """Slanted-plane clips (module docstring) in pixelSplat's layout under ROOT/SPLIT, with their ground-truth
    cache. slopes: one per clip (default: random in [-0.9, 0.9]). texture_seed: one texture for every clip (then
    the references of all clips are the same picture and the in-between frames depend on the slope alone), or
    None for a texture per clip. gloss, baseline: see ParallaxClip. Returns {"keys", "slopes", "cache"}."""
    scenes, clouds, slope_of = [], {}, {}
    for n in range(n_clips):
        clip = ParallaxClip(seed + n, size, None if slopes is None else slopes[n], texture_seed=texture_seed,
                            gloss=gloss, baseline=baseline)
        images, points, colours = clip.render(n_frames)
        key = parallax_key(seed + n)
        scenes.append(_scene(key, clip.cameras(n_frames), images, f"synthetic://parallax/{seed + n}"))
        clouds[key] = (points, colours)
        slope_of[key] = clip.slope
    _write_chunks(root, split, scenes, scenes_per_chunk)
    cache_dir = _write_cache(root, split, clouds, n_frames, "ground truth (ParallaxClip)")
    return {"keys": list(clouds), "slopes": slope_of, "cache": cache_dir}
