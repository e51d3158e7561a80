"""RealEstate10K and ACID in pixelSplat's chunk layout (the layout MVSplat and ReconX evaluate on).

    ROOT/{train,test}/000000.torch, 000001.torch, ...   chunks, each about 100 MB of JPEG bytes
    ROOT/{train,test}/index.json                         {scene key: chunk file name}

A chunk is a list of scenes, each a dict (read with torch.load(weights_only=True); it holds only tensors and
strings):
    "key"        str, 16 hex digits
    "url"        str, the source video
    "timestamps" (T,) int64, microseconds
    "cameras"    (T, 18) float32: fx, fy, cx, cy, two zeros, then the 3x4 world-to-camera matrix row-major
    "images"     list of T uint8 tensors, each a JPEG file's bytes (360x640 for RealEstate10K and ACID)

Cameras as pixelSplat stores them: intrinsics normalised by the image size with the origin at the image's
top-left corner (pixel i's centre at (i + 0.5) / W, as pixelSplat's `sample_image_grid`), and OpenCV
world-to-camera extrinsics (x right, y down, z forward; RealEstate10K's own convention). Ours: OpenCV
camera-to-world and pixel intrinsics with pixel centres at integer coordinates, so
    fx = fx_n W,  fy = fy_n H,  cx = cx_n W - 0.5,  cy = cy_n H - 0.5,  cam_to_world = inverse(world_to_cam).

Readers stream: `Re10kDataset` loads one chunk at a time (the last one stays cached) and decodes JPEGs only for
the frames asked for.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from ..errors import InputError
from ..types import Cameras
from .clip import Clip, check_indices, uint8_to_float

log = logging.getLogger(__name__)

PathLike = Union[str, Path]


def rigid_inverse(matrices: torch.Tensor) -> torch.Tensor:
    """(N, 4, 4) rigid transforms -> their inverses [R^T | -R^T t], computed in float64, returned in float64."""
    m = matrices.double()
    out = torch.zeros_like(m)
    rt = m[:, :3, :3].transpose(1, 2)
    out[:, :3, :3] = rt
    out[:, :3, 3] = -(rt @ m[:, :3, 3:4])[..., 0]
    out[:, 3, 3] = 1
    return out


def cameras_from_re10k(raw: torch.Tensor, width: int, height: int) -> Cameras:
    """pixelSplat's (T, 18) camera rows -> Cameras of frames `width` x `height` pixels (see the module docstring)."""
    raw = torch.as_tensor(raw)
    if raw.ndim != 2 or raw.shape[1] != 18:
        raise InputError(f"RealEstate10K cameras must be (T, 18), got {tuple(raw.shape)}")
    raw = raw.double()
    T = raw.shape[0]
    K = torch.zeros(T, 3, 3, dtype=torch.float64)
    K[:, 0, 0] = raw[:, 0] * width
    K[:, 1, 1] = raw[:, 1] * height
    K[:, 0, 2] = raw[:, 2] * width - 0.5
    K[:, 1, 2] = raw[:, 3] * height - 0.5
    K[:, 2, 2] = 1
    w2c = torch.eye(4, dtype=torch.float64).repeat(T, 1, 1)
    w2c[:, :3, :4] = raw[:, 6:].reshape(T, 3, 4)
    if not torch.isfinite(w2c).all() or not torch.isfinite(K).all():
        raise InputError("RealEstate10K cameras contain NaN or infinite values")
    return Cameras(rigid_inverse(w2c).float(), K.float(), width, height)


def cameras_to_re10k(cameras: Cameras) -> torch.Tensor:
    """Cameras -> pixelSplat's (T, 18) float32 rows (the inverse of `cameras_from_re10k`)."""
    K = cameras.intrinsics.double()
    W, H = cameras.width, cameras.height
    raw = torch.zeros(len(cameras), 18, dtype=torch.float64)
    raw[:, 0] = K[:, 0, 0] / W
    raw[:, 1] = K[:, 1, 1] / H
    raw[:, 2] = (K[:, 0, 2] + 0.5) / W
    raw[:, 3] = (K[:, 1, 2] + 0.5) / H
    raw[:, 6:] = rigid_inverse(cameras.cam_to_world)[:, :3, :4].reshape(-1, 12)
    return raw.float()


def decode_jpeg(data: torch.Tensor) -> np.ndarray:
    """One image's encoded bytes (a uint8 tensor) -> (H, W, 3) uint8 RGB, decoded by PIL as pixelSplat does."""
    from PIL import Image

    with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
        return np.asarray(image.convert("RGB"))


def image_size(data: torch.Tensor) -> tuple:
    """(width, height) of an encoded image, read from its header only."""
    from PIL import Image

    with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
        return image.size


@dataclass
class EncodedClip:
    """One scene of a chunk, still encoded: decode only the frames you need.

    key, url: as stored.  timestamps: (T,) int64.  raw_cameras: (T, 18) float32 (pixelSplat's rows).
    images: T uint8 tensors of JPEG bytes.
    """

    key: str
    url: str
    timestamps: torch.Tensor
    raw_cameras: torch.Tensor
    images: list

    def __len__(self) -> int:
        return len(self.images)

    def decode_uint8(self, indices: Optional[Sequence[int]] = None) -> tuple:
        """(images (N, H, W, 3) uint8 numpy, Cameras at that size, indices list) for the frames `indices` (all
        when None). Every frame must have the same size."""
        idx = list(range(len(self))) if indices is None else check_indices(indices, len(self), f"scene {self.key}")
        arrays = [decode_jpeg(self.images[i]) for i in idx]
        sizes = {a.shape for a in arrays}
        if len(sizes) > 1:
            raise InputError(f"scene {self.key}: frames of different sizes {sorted(sizes)}")
        H, W = arrays[0].shape[:2]
        cams = cameras_from_re10k(self.raw_cameras[idx], W, H)
        return np.stack(arrays), cams, idx

    def decode(self, indices: Optional[Sequence[int]] = None) -> Clip:
        """A Clip of the frames `indices` (all when None), frames (N, 3, H, W) float32 in [0, 1]."""
        images, cams, idx = self.decode_uint8(indices)
        return Clip(self.key, uint8_to_float(images), cams, torch.as_tensor(idx, dtype=torch.long),
                    self.timestamps[idx].clone(), self.url)


def _as_encoded(item, path: Path, n: int) -> EncodedClip:
    if not isinstance(item, dict) or not {"key", "cameras", "images"} <= set(item):
        raise InputError(f"{path}: scene {n} is not a dict with key, cameras and images (pixelSplat's layout); "
                         "is this a RealEstate10K/ACID chunk?")
    cams = torch.as_tensor(item["cameras"])
    images = list(item["images"])
    if cams.ndim != 2 or cams.shape[1] != 18 or cams.shape[0] != len(images):
        raise InputError(f"{path}: scene {item['key']} has cameras {tuple(cams.shape)} for {len(images)} images; "
                         "expected (T, 18)")
    stamps = torch.as_tensor(item.get("timestamps", torch.arange(len(images))), dtype=torch.int64)
    return EncodedClip(str(item["key"]), str(item.get("url", "")), stamps, cams.float(), images)


def load_chunk(path: PathLike) -> list:
    """A chunk file -> list of EncodedClip (nothing decoded). torch.load(weights_only=True): no code can run."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"chunk {path} does not exist")
    try:
        chunk = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path} cannot be read as a pixelSplat chunk ({exc}); download it again") from None
    if not isinstance(chunk, (list, tuple)):
        raise InputError(f"{path} holds a {type(chunk).__name__}, not a list of scenes")
    return [_as_encoded(item, path, n) for n, item in enumerate(chunk)]


def read_re10k_chunk(path: PathLike) -> list:
    """Every scene of one chunk, decoded: list of Clip(key, frames (T, 3, H, W) float in [0, 1], cameras) with
    pixel intrinsics at the frames' size and OpenCV camera-to-world poses. Decodes all frames: a whole chunk of
    360x640 frames takes GBs as floats; `Re10kDataset` decodes only the frames asked for."""
    return [clip.decode() for clip in load_chunk(path)]


class Re10kDataset:
    """One split of RealEstate10K or ACID in pixelSplat's layout, read lazily.

    root: the folder holding train/ and test/ (or a split folder itself, with index.json and chunks).
    split: "test" (the benchmarks) or "train".
    `keys()` lists scenes in chunk order; `clip(key)` gives an EncodedClip (loads its chunk, caching one chunk);
    `views(key, indices)` decodes those frames only.
    """

    def __init__(self, root: PathLike, split: str = "test"):
        root = Path(root)
        folder = root / split if (root / split).is_dir() else root
        chunks = sorted(folder.glob("*.torch"))
        if not chunks:
            raise InputError(f"no .torch chunks in {folder}; --data-root must hold {split}/*.torch and "
                             f"{split}/index.json (pixelSplat's layout; see the README's Benchmarks section)")
        self.folder = folder
        index_file = folder / "index.json"
        if index_file.is_file():
            raw = json.loads(index_file.read_text())
            self.index = {str(k): folder / v for k, v in raw.items()}
            gone = sorted({p.name for p in self.index.values() if not p.is_file()})
            if gone:
                log.warning("%s names %d chunk files that are missing (%s ...); their scenes are skipped",
                            index_file, len(gone), ", ".join(gone[:3]))
                self.index = {k: p for k, p in self.index.items() if p.is_file()}
        else:
            log.warning("%s is missing: scanning %d chunks for their scene keys", index_file, len(chunks))
            self.index = {}
            for path in chunks:
                for clip in load_chunk(path):
                    self.index[clip.key] = path
        order = {p: n for n, p in enumerate(chunks)}
        self._keys = sorted(self.index, key=lambda k: (order.get(self.index[k], len(order)), k))
        self._cached_path: Optional[Path] = None
        self._cached: dict = {}

    def keys(self) -> list:
        """Scene keys, grouped by chunk (so walking them in order loads each chunk once)."""
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self._keys)

    def chunk_of(self, key: str) -> Path:
        if key not in self.index:
            raise InputError(f"scene {key} is not in {self.folder}/index.json")
        return self.index[key]

    def clip(self, key: str) -> EncodedClip:
        path = self.chunk_of(key)
        if path != self._cached_path:
            self._cached = {}  # drop the previous chunk before loading the next one
            self._cached = {c.key: c for c in load_chunk(path)}
            self._cached_path = path
        if key not in self._cached:
            raise InputError(f"index.json puts scene {key} in {path.name}, but that chunk does not hold it")
        return self._cached[key]

    def views(self, key: str, indices: Sequence[int]) -> tuple:
        """(images (N, H, W, 3) uint8, Cameras at that size) of frames `indices` of scene `key`."""
        images, cams, _ = self.clip(key).decode_uint8(indices)
        return images, cams

    def iter_clips(self, keys: Optional[Iterable[str]] = None) -> Iterator[EncodedClip]:
        """EncodedClips of `keys` (all when None), chunk by chunk."""
        wanted = self._keys if keys is None else [k for k in self._keys if k in set(keys)]
        for key in wanted:
            yield self.clip(key)
