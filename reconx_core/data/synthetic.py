"""SYNTHETIC TEST DATA: ray-cast textured rooms written in the benchmarks' dataset layouts.

Not a benchmark. These scenes exist so that the dataset readers, the evaluation protocol and
scripts/evaluate.py (--tiny) can be tested where no real dataset is available: every pixel's colour, depth and
3D point is known exactly, so a reconstruction from all frames can be checked against them.

A scene (`SyntheticRoom(seed)`) is the inside of a box room (x in [-2, 2], y in [-1.2, 1.2] with y down as in
OpenCV, z in [-3, 3]) holding two spheres, every surface carrying a smooth procedural texture whose frequencies
and phases come from the seed. The camera walks a short path with a slight turn, looking along +z, the way
RealEstate10K's walkthroughs move. Pixel centres are ray-cast at integer coordinates (DESIGN.md).

Writers: `write_synthetic_re10k` (pixelSplat's chunk layout, JPEG frames) and `write_synthetic_dl3dv` (nerfstudio
layout, PNG frames), each with an evaluation index in MVSplat's format (two context views, three targets).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Union

import numpy as np
import torch

from ..types import Cameras
from .dl3dv import cameras_to_nerfstudio
from .index import EvaluationEntry, write_evaluation_index
from .re10k import cameras_to_re10k

PathLike = Union[str, Path]
ROOM_MIN = (-2.0, -1.2, -3.0)
ROOM_MAX = (2.0, 1.2, 3.0)


def _look_along(eye: torch.Tensor, forward: torch.Tensor) -> torch.Tensor:
    """(4, 4) OpenCV camera-to-world at `eye` looking along `forward`, image up towards world -y."""
    fwd = forward / forward.norm()
    down = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    right = torch.linalg.cross(down, fwd)
    right = right / right.norm()
    down = torch.linalg.cross(fwd, right)
    m = torch.eye(4, dtype=torch.float64)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, down, fwd, eye
    return m


class SyntheticRoom:
    """One seeded synthetic room: `trajectory(...)` gives cameras, `render(cameras)` ray-casts them exactly."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(int(seed))
        self.seed = int(seed)
        # sphere centres and radii, somewhere in front of the path
        self.spheres = [(torch.tensor([-0.7, 0.35, 1.4], dtype=torch.float64) + 0.3 * torch.rand(3, generator=g,
                                                                                                  dtype=torch.float64),
                         0.45 + 0.1 * float(torch.rand(1, generator=g))),
                        (torch.tensor([0.9, -0.2, 2.0], dtype=torch.float64) + 0.3 * torch.rand(3, generator=g,
                                                                                                 dtype=torch.float64),
                         0.35 + 0.1 * float(torch.rand(1, generator=g)))]
        # per surface (6 walls + 2 spheres) and channel: two sinusoids of the hit point
        self.freq = 1.5 + 2.5 * torch.rand(8, 3, 2, 3, generator=g, dtype=torch.float64)
        self.phase = 2 * math.pi * torch.rand(8, 3, 2, generator=g, dtype=torch.float64)
        self.base = 0.3 + 0.4 * torch.rand(8, 3, generator=g, dtype=torch.float64)
        self.path_start = torch.tensor([-0.4, 0.0, -1.6], dtype=torch.float64) + 0.2 * (
            torch.rand(3, generator=g, dtype=torch.float64) - 0.5)
        self.path_step = torch.tensor([0.8, 0.1, 0.6], dtype=torch.float64)
        self.turn = 0.25 + 0.1 * float(torch.rand(1, generator=g))  # radians of yaw over the path

    def trajectory(self, n_frames: int, width: int, height: int, focal_scale: float = 0.55) -> Cameras:
        """n_frames cameras along the path, frames width x height, focal = focal_scale * width pixels
        (principal point at the image centre, (W - 1) / 2 in our pixel-centre convention)."""
        c2w = []
        for k in range(n_frames):
            s = k / max(1, n_frames - 1)
            yaw = -0.5 * self.turn + self.turn * s
            forward = torch.tensor([math.sin(yaw), 0.08, math.cos(yaw)], dtype=torch.float64)
            c2w.append(_look_along(self.path_start + s * self.path_step, forward))
        f = focal_scale * width
        K = torch.tensor([[f, 0.0, (width - 1) / 2], [0.0, f, (height - 1) / 2], [0.0, 0.0, 1.0]])
        return Cameras(torch.stack(c2w).float(), K.expand(n_frames, 3, 3).clone(), width, height)

    def _texture(self, p: torch.Tensor, surface: torch.Tensor) -> torch.Tensor:
        """(M, 3) colours in [0.05, 0.95] at points p (M, 3) on surfaces (M,) (0-5 walls, 6-7 spheres)."""
        f, ph, base = self.freq[surface], self.phase[surface], self.base[surface]      # (M,3,2,3), (M,3,2), (M,3)
        arg = (f * p[:, None, None, :]).sum(-1) + ph                                   # (M, 3, 2)
        return (base + 0.22 * torch.sin(arg[..., 0]) + 0.15 * torch.sin(arg[..., 1])).clamp(0.05, 0.95)

    def render(self, cameras: Cameras) -> tuple:
        """Ray-cast every pixel centre: images (N, 3, H, W) float32 in [0, 1], depths (N, H, W) camera z,
        points (N, H, W, 3) world frame."""
        W, H = cameras.width, cameras.height
        v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64),
                              indexing="ij")
        lo, hi = torch.tensor(ROOM_MIN, dtype=torch.float64), torch.tensor(ROOM_MAX, dtype=torch.float64)
        images, depths, points = [], [], []
        for K, c2w in zip(cameras.intrinsics.double(), cameras.cam_to_world.double()):
            d_cam = torch.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], torch.ones_like(u)], -1)
            d = d_cam.reshape(-1, 3) @ c2w[:3, :3].T          # unit camera-z component: t is the camera depth
            o = c2w[:3, 3].expand_as(d)
            # the room seen from inside: along each axis, the wall the ray heads for
            safe = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
            t_axes = torch.where(d > 0, (hi - o) / safe, (lo - o) / safe)
            t_axes = torch.where(d.abs() < 1e-12, torch.full_like(t_axes, float("inf")), t_axes)
            t, axis = t_axes.min(-1)
            surface = 2 * axis + (d.gather(1, axis[:, None])[:, 0] > 0).long()
            for s, (centre, radius) in enumerate(self.spheres):
                oc = o - centre
                b = (oc * d).sum(-1)
                a = (d * d).sum(-1)
                disc = b * b - a * ((oc * oc).sum(-1) - radius ** 2)
                t_s = (-b - disc.clamp_min(0).sqrt()) / a
                hit = (disc > 0) & (t_s > 1e-6) & (t_s < t)
                t = torch.where(hit, t_s, t)
                surface = torch.where(hit, torch.full_like(surface, 6 + s), surface)
            p = o + t[:, None] * d
            images.append(self._texture(p, surface).T.reshape(3, H, W))
            depths.append(t.reshape(H, W))
            points.append(p.reshape(H, W, 3))
        return torch.stack(images).float(), torch.stack(depths).float(), torch.stack(points).float()


def synthetic_entry(n_frames: int) -> EvaluationEntry:
    """The evaluation views of a synthetic clip: context at both ends, targets at 1/4, 1/2, 3/4 (interpolation,
    as the benchmarks' targets lie between their context views)."""
    last = n_frames - 1
    return EvaluationEntry((0, last), (round(last / 4), round(last / 2), round(3 * last / 4)))


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def synthetic_key(seed: int) -> str:
    """A 16-character scene key, like RealEstate10K's, that says it is synthetic."""
    return f"synth{int(seed):011x}"


def write_synthetic_re10k(root: PathLike, n_scenes: int = 3, n_frames: int = 12, height: int = 90, width: int = 160,
                          scenes_per_chunk: int = 2, split: str = "test", seed: int = 0, jpeg_quality: int = 95
                          ) -> dict:
    """Write synthetic rooms in pixelSplat's chunk layout: root/split/NNNNNN.torch + index.json, and the
    evaluation index root/evaluation_index.json. Frames are JPEG like RealEstate10K's (360x640 there; 90x160
    by default here). Returns {"keys": [...], "index": path of the evaluation index, "chunks": [paths]}."""
    from PIL import Image

    folder = Path(root) / split
    folder.mkdir(parents=True, exist_ok=True)
    chunk, chunks, index, entries = [], [], {}, {}
    for n in range(n_scenes):
        room = SyntheticRoom(seed + n)
        cams = room.trajectory(n_frames, width, height)
        images = _to_uint8(room.render(cams)[0])
        encoded = []
        for image in images:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="JPEG", quality=jpeg_quality)
            encoded.append(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8))
        key = synthetic_key(seed + n)
        chunk.append({"url": f"synthetic://room/{seed + n}", "timestamps": torch.arange(n_frames) * 33_366,
                      "cameras": cameras_to_re10k(cams), "key": key, "images": encoded})
        entries[key] = synthetic_entry(n_frames)
        if len(chunk) == scenes_per_chunk or n == n_scenes - 1:
            name = f"{len(chunks):06d}.torch"
            torch.save(chunk, folder / name)
            chunks.append(folder / name)
            index.update({item["key"]: name for item in chunk})
            chunk = []
    (folder / "index.json").write_text(json.dumps(index))
    index_path = Path(root) / "evaluation_index.json"
    write_evaluation_index(index_path, entries)
    return {"keys": list(entries), "index": index_path, "chunks": chunks}


def write_synthetic_dl3dv(root: PathLike, n_scenes: int = 2, n_frames: int = 12, height: int = 90, width: int = 160,
                          seed: int = 100) -> dict:
    """Write synthetic rooms in DL3DV's nerfstudio layout: root/<key>/transforms.json + images/frame_NNNNN.png
    (and images_2/ at half size), and root/evaluation_index.json. Returns {"keys", "index"}."""
    from PIL import Image

    root = Path(root)
    entries = {}
    for n in range(n_scenes):
        room = SyntheticRoom(seed + n)
        cams = room.trajectory(n_frames, width, height)
        images = _to_uint8(room.render(cams)[0])
        key = synthetic_key(seed + n)
        folder = root / key
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "images_2").mkdir(parents=True, exist_ok=True)
        # frames listed in reverse so that readers must sort by file_path
        names = [f"images/frame_{k + 1:05d}.png" for k in range(n_frames)]
        for name, image in zip(names, images):
            pil = Image.fromarray(image)
            pil.save(folder / name)
            pil.resize((width // 2, height // 2), Image.LANCZOS).save(folder / name.replace("images/", "images_2/"))
        order = list(reversed(range(n_frames)))
        meta = cameras_to_nerfstudio(Cameras(cams.cam_to_world[order], cams.intrinsics[order], width, height),
                                     [names[k] for k in order])
        (folder / "transforms.json").write_text(json.dumps(meta, indent=1))
        entries[key] = synthetic_entry(n_frames)
    index_path = root / "evaluation_index.json"
    write_evaluation_index(index_path, entries)
    return {"keys": list(entries), "index": index_path}
