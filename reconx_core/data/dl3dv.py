"""DL3DV in its nerfstudio layout.

    ROOT/<scene>/transforms.json          (or ROOT/<scene>/nerfstudio/transforms.json, as DL3DV ships it)
    ROOT/<scene>/images/frame_00001.png   (and images_2/, images_4/, images_8/: the same frames downscaled)

transforms.json (nerfstudio): camera-wide "fl_x", "fl_y", "cx", "cy", "w", "h" (pixels of the frames named in
file_path; any of them may be overridden per frame), optional distortion "k1", "k2", "p1", "p2", and "frames",
each with "file_path" (relative to the json) and "transform_matrix", a 4x4 camera-to-world in the OpenGL camera
convention (x right, y up, z backwards). nerfstudio puts pixel i's centre at i + 0.5 (COLMAP's convention).
Ours: OpenCV (x right, y down, z forward), pixel centres at integer coordinates, so
    cam_to_world = transform_matrix @ diag(1, -1, -1, 1),  cx = cx_ns - 0.5,  cy = cy_ns - 0.5.
Frames are ordered by file_path (the evaluation indices count in that order). Distortion is not modelled: a
scene with non-zero coefficients is read with a warning (DL3DV's frames are nearly pinhole).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..errors import InputError
from ..framing import scale_intrinsics
from ..types import Cameras
from .clip import Clip, check_indices, uint8_to_float

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
OPENGL_TO_OPENCV = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))
_INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h")


def find_transforms(folder: PathLike) -> Path:
    """The scene's transforms.json: in the folder itself or in its nerfstudio/ subfolder."""
    folder = Path(folder)
    for candidate in (folder / "transforms.json", folder / "nerfstudio" / "transforms.json"):
        if candidate.is_file():
            return candidate
    raise InputError(f"no transforms.json in {folder} or {folder / 'nerfstudio'} (DL3DV's nerfstudio layout)")


def cameras_from_nerfstudio(meta: dict) -> tuple:
    """A parsed transforms.json -> (file paths in file_path order (as written), Cameras at (w, h)).

    Per-frame intrinsics override the camera-wide ones; all frames must share w and h.
    """
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise InputError("transforms.json has no 'frames' list")
    paths, c2w, K, sizes = [], [], [], set()
    for n, frame in enumerate(frames):
        values = {key: frame.get(key, meta.get(key)) for key in _INTRINSIC_KEYS}
        missing = [key for key, v in values.items() if v is None]
        if missing or "file_path" not in frame or "transform_matrix" not in frame:
            raise InputError(f"transforms.json frame {n} lacks {missing or ['file_path/transform_matrix']}")
        m = torch.tensor(frame["transform_matrix"], dtype=torch.float64)
        if m.shape == (3, 4):
            m = torch.cat([m, torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)])
        if m.shape != (4, 4):
            raise InputError(f"transforms.json frame {n}: transform_matrix must be 4x4, got {tuple(m.shape)}")
        c2w.append(m @ OPENGL_TO_OPENCV)
        K.append(torch.tensor([[values["fl_x"], 0.0, values["cx"] - 0.5], [0.0, values["fl_y"], values["cy"] - 0.5],
                               [0.0, 0.0, 1.0]], dtype=torch.float64))
        sizes.add((int(values["w"]), int(values["h"])))
        paths.append(str(frame["file_path"]))
    if len(sizes) > 1:
        raise InputError(f"transforms.json mixes frame sizes {sorted(sizes)}")
    (W, H), = sizes
    if any(abs(float(meta.get(k, 0.0) or 0.0)) > 0 for k in ("k1", "k2", "k3", "p1", "p2")):
        log.warning("transforms.json has lens distortion coefficients; frames are read as pinhole images")
    return paths, Cameras(torch.stack(c2w).float(), torch.stack(K).float(), W, H)


def cameras_to_nerfstudio(cameras: Cameras, file_paths: Sequence[str]) -> dict:
    """Cameras -> a transforms.json dict (camera-wide intrinsics from camera 0; the inverse of
    `cameras_from_nerfstudio` when all cameras share intrinsics)."""
    if len(file_paths) != len(cameras):
        raise InputError(f"{len(file_paths)} file paths for {len(cameras)} cameras")
    K = cameras.intrinsics.double()
    gl = cameras.cam_to_world.double() @ OPENGL_TO_OPENCV  # the diagonal flip is its own inverse
    return {"w": cameras.width, "h": cameras.height, "fl_x": float(K[0, 0, 0]), "fl_y": float(K[0, 1, 1]),
            "cx": float(K[0, 0, 2]) + 0.5, "cy": float(K[0, 1, 2]) + 0.5, "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0,
            "camera_model": "OPENCV",
            "frames": [{"file_path": p, "transform_matrix": gl[i].tolist()} for i, p in enumerate(file_paths)]}


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image

    if not path.is_file():
        raise InputError(f"frame {path} does not exist")
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


class Dl3dvScene:
    """One DL3DV scene. downscale: read images_<d>/ instead of images/ (1 = the frames named in file_path);
    intrinsics follow the size of the files actually read (scale_intrinsics, pixel-centre rule)."""

    def __init__(self, folder: PathLike, downscale: int = 1):
        self.transforms = find_transforms(folder)
        self.key = Path(folder).name
        meta = json.loads(self.transforms.read_text())
        paths, cams = cameras_from_nerfstudio(meta)
        order = sorted(range(len(paths)), key=lambda i: paths[i])
        self.file_paths = [paths[i] for i in order]
        self.cameras = Cameras(cams.cam_to_world[order], cams.intrinsics[order], cams.width, cams.height)
        self.downscale = int(downscale)

    def __len__(self) -> int:
        return len(self.file_paths)

    def image_path(self, i: int) -> Path:
        rel = Path(self.file_paths[i])
        if self.downscale != 1 and rel.parts and rel.parts[0] == "images":
            rel = Path(f"images_{self.downscale}", *rel.parts[1:])
        return self.transforms.parent / rel

    def views(self, indices: Optional[Sequence[int]] = None) -> tuple:
        """(images (N, H, W, 3) uint8, Cameras at that size) of the frames `indices` (all when None)."""
        idx = list(range(len(self))) if indices is None else check_indices(indices, len(self), f"scene {self.key}")
        arrays = [_read_image(self.image_path(i)) for i in idx]
        sizes = {a.shape for a in arrays}
        if len(sizes) > 1:
            raise InputError(f"scene {self.key}: frames of different sizes {sorted(sizes)}")
        H, W = arrays[0].shape[:2]
        K = self.cameras.intrinsics[idx]
        if (W, H) != (self.cameras.width, self.cameras.height):
            K = scale_intrinsics(K, W / self.cameras.width, H / self.cameras.height)
        return np.stack(arrays), Cameras(self.cameras.cam_to_world[idx].clone(), K, W, H)

    def clip(self, indices: Optional[Sequence[int]] = None) -> Clip:
        idx = list(range(len(self))) if indices is None else check_indices(indices, len(self), f"scene {self.key}")
        images, cams = self.views(idx)
        return Clip(self.key, uint8_to_float(images), cams, torch.as_tensor(idx, dtype=torch.long))


def read_dl3dv_scene(folder: PathLike, indices: Optional[Sequence[int]] = None, downscale: int = 1) -> Clip:
    """One DL3DV scene as a Clip (frames ordered by file_path; `indices` into that order, all when None)."""
    return Dl3dvScene(folder, downscale).clip(indices)


class Dl3dvDataset:
    """Every scene folder under `root` that holds a transforms.json (directly or in nerfstudio/)."""

    def __init__(self, root: PathLike, downscale: int = 1):
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"{root} is not a folder")
        self.root = root
        self.downscale = int(downscale)
        self._keys = sorted(p.name for p in root.iterdir() if p.is_dir() and (
            (p / "transforms.json").is_file() or (p / "nerfstudio" / "transforms.json").is_file()))
        if not self._keys:
            raise InputError(f"no scene folder with a transforms.json under {root} (DL3DV's nerfstudio layout)")
        self._cached: Optional[Dl3dvScene] = None

    def keys(self) -> list:
        return list(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def scene(self, key: str) -> Dl3dvScene:
        if key not in self._keys:
            raise InputError(f"scene {key} is not under {self.root}")
        if self._cached is None or self._cached.key != key:
            self._cached = Dl3dvScene(self.root / key, self.downscale)
        return self._cached

    def views(self, key: str, indices: Sequence[int]) -> tuple:
        return self.scene(key).views(indices)
