"""Training data: the point-cloud cache, clip sampling, and the per-sample randomness, all deterministic.

Point-cloud cache (written once by scripts/prepare_pointclouds.py, read every step):

    CACHE/<entry>.safetensors   one clip segment: "points" (N, 3) float32 (DUSt3R's frame of the segment's first
                                frame, its arbitrary scale), "colours" (N, 3) uint8, "conf" (N,) float16 (DUSt3R's
                                raw confidence, > the alignment's min_conf); metadata: key, start, end (source frame
                                indices of the two ends, inclusive), num_frames (of the source clip), dust3r, ...
    CACHE/index.json            {entry: {"key", "start", "end", "num_frames", "points"}} (rebuilt from the files'
                                headers when missing)

CACHE defaults to DATA_ROOT/pointclouds/SPLIT. An entry is `key` for a whole clip, or `key@start-end` when long
clips were cut into segments (--max-span).

A training sample is one cached segment: `frames` frames evenly spaced from its start to its end (both included,
sorted in time; frame 0 and frame T-1 are the references the cloud was made from), centre-cropped and resized to
the model's resolution with reconx_core.framing.crop_resize, plus `points` points of its cloud.

Determinism: sample n of the whole run (n = step * global_batch + i) depends only on (seed, n): the clip (an epoch
permutation of the entries), the diffusion timestep, the noise, the VAE posterior draws and the condition-dropout
draws. So the same global batch gives the same samples whatever the number of processes, and a resumed run
continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import InputError
from ..framing import crop_resize
from ..types import Cameras

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
CACHE_FORMAT = "reconx-pointcloud-cache"
CACHE_VERSION = "1"


# ------------------------------------------------------------------------------------------------ cache I/O
@dataclass
class CachedCloud:
    """One cache entry. points (N, 3) float32; colours (N, 3) float32 in [0, 1]; conf (N,) float32; meta: dict."""

    points: torch.Tensor
    colours: torch.Tensor
    conf: torch.Tensor
    meta: dict


def default_cache_dir(data_root: PathLike, split: str = "train") -> Path:
    return Path(data_root) / "pointclouds" / split


def entry_name(key: str, start: int, end: int, num_frames: int) -> str:
    """`key` for a whole clip, else `key@start-end`."""
    return key if (start, end) == (0, num_frames - 1) else f"{key}@{start}-{end}"


def write_cloud(path: PathLike, points: torch.Tensor, colours: torch.Tensor, conf: torch.Tensor, meta: dict) -> None:
    """Write one cache entry atomically (temporary file in the same folder, then rename): a run stopped mid-write
    leaves no half file, so --resume trusts every file it finds.

    points (N, 3) float, colours (N, 3) float in [0, 1], conf (N,) float; meta: str-able values (JSON-encoded).
    """
    path = Path(path)
    n = points.shape[0]
    if points.shape != (n, 3) or colours.shape != (n, 3) or conf.shape != (n,) or n == 0:
        raise InputError(f"a cached cloud needs points (N, 3), colours (N, 3), conf (N,) with N > 0; got "
                         f"{tuple(points.shape)}, {tuple(colours.shape)}, {tuple(conf.shape)}")
    tensors = {"points": points.detach().float().cpu().contiguous(),
               "colours": (colours.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().contiguous(),
               "conf": conf.detach().to(torch.float16).cpu().contiguous()}
    metadata = {"format": CACHE_FORMAT, "version": CACHE_VERSION}
    metadata.update({k: json.dumps(v) for k, v in meta.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _read_meta(f) -> dict:
    raw = f.metadata() or {}
    if raw.get("format") != CACHE_FORMAT:
        raise InputError("not a ReconX point-cloud cache file")
    return {k: json.loads(v) for k, v in raw.items() if k not in ("format", "version")}


def read_cloud(path: PathLike) -> CachedCloud:
    """Read one cache entry written by `write_cloud`."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = _read_meta(f)
            points, colours, conf = (f.get_tensor(k) for k in ("points", "colours", "conf"))
    except InputError:
        raise InputError(f"{path} is not a point-cloud cache file (written by scripts/prepare_pointclouds.py)") \
            from None
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise InputError(f"{path.name} is damaged ({str(err)[:100]}); delete it and run "
                         "scripts/prepare_pointclouds.py again (it redoes missing entries)") from None
    return CachedCloud(points.float(), colours.float() / 255, conf.float(), meta)


def write_cache_index(cache_dir: PathLike) -> Dict[str, dict]:
    """Scan the cache's files (headers only) and write CACHE/index.json atomically. Returns the index."""
    cache_dir = Path(cache_dir)
    index = {}
    for path in sorted(cache_dir.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = _read_meta(f)
                n = f.get_slice("points").get_shape()[0]
        except Exception:
            log.warning("skipping unreadable cache file %s", path.name)
            continue
        index[path.stem] = {"key": meta["key"], "start": meta["start"], "end": meta["end"],
                            "num_frames": meta["num_frames"], "points": n}
    tmp = cache_dir / f".index.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, cache_dir / "index.json")
    return index


def read_cache_index(cache_dir: PathLike) -> Dict[str, dict]:
    """CACHE/index.json, rebuilt from the files when missing or when it lists fewer entries than there are files."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise InputError(f"no point-cloud cache at {cache_dir}; run scripts/prepare_pointclouds.py --data-root "
                         "DATA_ROOT --dust3r DUST3R_FILE first (or set data.cache_dir)")
    path = cache_dir / "index.json"
    files = len(list(cache_dir.glob("*.safetensors")))
    if path.is_file():
        index = json.loads(path.read_text())
        if len(index) == files:
            return index
    return write_cache_index(cache_dir)


# --------------------------------------------------------------------------------------------- frame sampling
def segment_frames(start: int, end: int, frames: int) -> List[int]:
    """`frames` source indices evenly spaced from start to end, both included, sorted (repeats when the segment
    is shorter than `frames`; such segments are skipped by TrainingClips)."""
    if frames == 1:
        return [start]
    return [int(round(start + (end - start) * k / (frames - 1))) for k in range(frames)]


def clip_segments(num_frames: int, max_span: Optional[int] = None, min_frames: int = 2) -> List[Tuple[int, int]]:
    """(start, end) of the segments a clip of `num_frames` frames is cut into: the whole clip, or consecutive
    non-overlapping pieces of `max_span` frames (the remainder is kept when it has at least min_frames frames)."""
    if max_span is None or max_span >= num_frames:
        return [(0, num_frames - 1)] if num_frames >= min_frames else []
    if max_span < 2:
        raise InputError(f"max_span must be >= 2, got {max_span}")
    out = []
    for start in range(0, num_frames, max_span):
        end = min(start + max_span, num_frames) - 1
        if end - start + 1 >= min_frames:
            out.append((start, end))
    return out


def subsample_points(n_available: int, n: int) -> torch.Tensor:
    """Indices of `n` points out of `n_available`: evenly strided (deterministic, as structure.scene_points), or
    every point repeated cyclically when there are fewer."""
    if n_available >= n:
        return torch.linspace(0, n_available - 1, n).round().long()
    return torch.arange(n) % n_available


# ------------------------------------------------------------------------------------------------ randomness
def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (ints, strings), stable across processes and Python runs."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def epoch_order(seed: int, epoch: int, count: int) -> torch.Tensor:
    """The order entries are visited in during `epoch`: a permutation of range(count)."""
    return torch.randperm(count, generator=generator(seed, "epoch", epoch))


def sample_positions(step: int, global_batch: int, micro_batch: int, accumulation: int, rank: int, world: int,
                     micro: int) -> List[int]:
    """Run-wide sample numbers that process `rank` of `world` handles in micro-step `micro` of optimizer step
    `step`. The global batch of a step is n = step*G .. step*G + G-1 with G = accumulation x world x micro_batch,
    laid out micro-step by micro-step, each micro-step's block split evenly over the processes."""
    if global_batch != accumulation * world * micro_batch:
        raise InputError(f"global batch {global_batch} != {accumulation} x {world} x {micro_batch}")
    first = step * global_batch + micro * world * micro_batch + rank * micro_batch
    return list(range(first, first + micro_batch))


# --------------------------------------------------------------------------------------------------- dataset
@dataclass
class Entry:
    """One cache entry of one dataset: where its frames and its cloud are."""

    source: int          # index of the dataset in TrainingClips.datasets
    name: str            # the cache entry name
    key: str             # the clip's key in its dataset
    start: int
    end: int
    cloud: Path


class TrainingClips(torch.utils.data.Dataset):
    """Training samples by run-wide sample number n (see the module docstring). Map-style: item n -> dict

        frames      (T, 3, H, W) float32 in [0, 1] at `resolution`, T = frames; frame 0 and T-1 are the references
        points      (P, 3) float32, the segment's cached cloud (P = points)
        fs          () int64, the frame-stride condition
        timestep    () int64 in [0, num_timesteps)
        noise       (4, T, h, w) float32, the diffusion noise (h, w = resolution / 8)
        vae_noise   (T, 4, h, w) float32, the VAE posterior draws of the T frames
        drop        (2,) float32 uniforms: DynamiCrafter's text/image dropout draw, the structure dropout draw
        n, entry    the sample number and the cache entry name (for logs)

    datasets: readers with keys() and views(key, indices) -> (uint8 (N, H, W, 3), Cameras) (reconx_core.data's
    Re10kDataset / Dl3dvDataset); caches: their cache folders. Entries whose segment has fewer than `frames`
    frames, or whose clip is no longer in its dataset, are left out (logged).
    """

    def __init__(self, datasets: Sequence, caches: Sequence[PathLike], frames: int, resolution: Sequence[int],
                 points: int, seed: int = 0, num_timesteps: int = 1000, frame_stride: Union[str, int] = "spacing",
                 max_frame_stride: int = 30, latent_factor: int = 8):
        if len(datasets) != len(caches) or not datasets:
            raise InputError("TrainingClips needs one cache folder per dataset")
        self.datasets = list(datasets)
        self.frames, self.points, self.seed = int(frames), int(points), int(seed)
        self.height, self.width = (int(v) for v in resolution)
        if self.height % latent_factor or self.width % latent_factor:
            raise InputError(f"resolution {self.height}x{self.width} must be a multiple of {latent_factor}")
        self.latent = (self.height // latent_factor, self.width // latent_factor)
        self.num_timesteps = num_timesteps
        self.frame_stride, self.max_frame_stride = frame_stride, max_frame_stride
        self.entries: List[Entry] = []
        for source, (dataset, cache) in enumerate(zip(self.datasets, caches)):
            keys = set(dataset.keys())
            index = read_cache_index(cache)
            short = missing = 0
            for name in sorted(index):
                item = index[name]
                if item["key"] not in keys:
                    missing += 1
                elif item["end"] - item["start"] + 1 < self.frames:
                    short += 1
                else:
                    self.entries.append(Entry(source, name, item["key"], int(item["start"]), int(item["end"]),
                                              Path(cache) / f"{name}.safetensors"))
            if short or missing:
                log.warning("%s: %d cached segments have fewer than %d frames and %d clips are not in the dataset; "
                            "they are left out", cache, short, self.frames, missing)
        if not self.entries:
            raise InputError(f"no usable training clip: the caches {[str(c) for c in caches]} hold no segment of at "
                             f"least {self.frames} frames whose clip is in the dataset")

    def __len__(self) -> int:
        return len(self.entries)

    def entry_for(self, n: int) -> Entry:
        count = len(self.entries)
        return self.entries[int(epoch_order(self.seed, n // count, count)[n % count])]

    def fs_for(self, entry: Entry) -> int:
        if self.frame_stride != "spacing":
            return int(self.frame_stride)
        spacing = (entry.end - entry.start) / max(1, self.frames - 1)
        return int(min(self.max_frame_stride, max(1, round(spacing))))

    def load_frames(self, entry: Entry) -> torch.Tensor:
        """(T, 3, H, W) float32 in [0, 1] at the training resolution."""
        from ..data.clip import uint8_to_float

        indices = segment_frames(entry.start, entry.end, self.frames)
        images, cameras = self.datasets[entry.source].views(entry.key, indices)
        frames = uint8_to_float(images)
        cams = Cameras(cameras.cam_to_world, cameras.intrinsics, frames.shape[-1], frames.shape[-2])
        return crop_resize(frames, cams, self.height, self.width)[0]

    def randomness(self, n: int) -> dict:
        """The draws of sample n, in a fixed order from one generator seeded by (seed, n)."""
        g = generator(self.seed, "sample", n)
        h, w = self.latent
        timestep = torch.randint(0, self.num_timesteps, (), generator=g)
        drop = torch.rand(2, generator=g)
        noise = torch.randn(4, self.frames, h, w, generator=g)
        vae_noise = torch.randn(self.frames, 4, h, w, generator=g)
        return {"timestep": timestep, "drop": drop, "noise": noise, "vae_noise": vae_noise}

    def __getitem__(self, n: int) -> dict:
        entry = self.entry_for(n)
        cloud = read_cloud(entry.cloud)
        points = cloud.points[subsample_points(cloud.points.shape[0], self.points)]
        return {"frames": self.load_frames(entry), "points": points,
                "fs": torch.tensor(self.fs_for(entry), dtype=torch.long), **self.randomness(n), "n": n,
                "entry": entry.name}


class SyntheticSamples(torch.utils.data.Dataset):
    """Random frames and clouds made in memory, the same keys as TrainingClips: for timing and memory checks of
    the model without any dataset (their loss means nothing)."""

    def __init__(self, frames: int, resolution: Sequence[int], points: int, seed: int = 0,
                 num_timesteps: int = 1000, latent_factor: int = 8):
        self.frames, self.points, self.seed = int(frames), int(points), int(seed)
        self.height, self.width = (int(v) for v in resolution)
        self.latent = (self.height // latent_factor, self.width // latent_factor)
        self.num_timesteps = num_timesteps

    def __len__(self) -> int:
        return 1 << 30

    randomness = TrainingClips.randomness

    def __getitem__(self, n: int) -> dict:
        g = generator(self.seed, "synthetic", n)
        return {"frames": torch.rand(self.frames, 3, self.height, self.width, generator=g),
                "points": torch.randn(self.points, 3, generator=g), "fs": torch.tensor(5), **self.randomness(n),
                "n": n, "entry": f"synthetic{n}"}


class StepBatches(torch.utils.data.Sampler):
    """Batches of sample numbers for one process: for each optimizer step from `start_step` to `steps`, its
    `accumulation` micro-batches (see sample_positions). Used as a DataLoader batch_sampler."""

    def __init__(self, start_step: int, steps: int, global_batch: int, micro_batch: int, accumulation: int,
                 rank: int, world: int):
        self.start_step, self.steps = start_step, steps
        self.args = (global_batch, micro_batch, accumulation, rank, world)

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step) * self.args[2]

    def __iter__(self) -> Iterator[List[int]]:
        global_batch, micro_batch, accumulation, rank, world = self.args
        for step in range(self.start_step, self.steps):
            for micro in range(accumulation):
                yield sample_positions(step, global_batch, micro_batch, accumulation, rank, world, micro)


def collate(items: List[dict]) -> dict:
    """Stack a micro-batch of samples (lists for the names)."""
    out = {}
    for key in items[0]:
        values = [item[key] for item in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


def open_training_data(data_roots: Sequence[PathLike], split: str = "train", cache_dir: Optional[PathLike] = None,
                       downscale: int = 1) -> Tuple[list, list]:
    """(datasets, cache folders) for one or more dataset roots (RealEstate10K / ACID chunks or DL3DV folders,
    reconx_core.data.open_dataset). cache_dir overrides the default DATA_ROOT/pointclouds/SPLIT (one root only)."""
    from ..data import open_dataset

    if cache_dir is not None and len(data_roots) != 1:
        raise InputError("data.cache_dir can only be set with a single --data-root")
    datasets, caches = [], []
    for root in data_roots:
        datasets.append(open_dataset(root, split, downscale))
        caches.append(Path(cache_dir) if cache_dir is not None else default_cache_dir(root, split))
    return datasets, caches

