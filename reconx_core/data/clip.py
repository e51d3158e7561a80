"""`Clip`: frames of one scene with their cameras, the unit the dataset readers yield."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import InputError
from ..types import Cameras, _check


@dataclass
class Clip:
    """Frames of one scene and their cameras, in our conventions (DESIGN.md).

    key:         the scene's name in its dataset (RealEstate10K / ACID: the 16-hex-digit key; DL3DV: the folder).
    frames:      (T, 3, H, W) float32 in [0, 1].
    cameras:     Cameras of the T frames: OpenCV camera-to-world, pixel intrinsics at the frames' size (W, H),
                 pixel centres at integer coordinates.
    frame_index: (T,) long, each frame's index in the source clip (0..T-1 when the whole clip was decoded).
    timestamps:  optional (T,) int64 (RealEstate10K: microseconds into the video).
    url:         the source video (RealEstate10K / ACID), or "".
    """

    key: str
    frames: torch.Tensor
    cameras: Cameras
    frame_index: Optional[torch.Tensor] = None
    timestamps: Optional[torch.Tensor] = None
    url: str = ""

    def __post_init__(self):
        _check("frames", self.frames, (None, 3, None, None))
        T, _, H, W = self.frames.shape
        if len(self.cameras) != T or (self.cameras.height, self.cameras.width) != (H, W):
            raise InputError(f"clip {self.key!r}: {T} frames of {W}x{H} need {T} cameras of that size, got "
                             f"{len(self.cameras)} of {self.cameras.width}x{self.cameras.height}")
        if self.frame_index is None:
            self.frame_index = torch.arange(T)
        _check("frame_index", self.frame_index, (T,))
        if self.timestamps is not None:
            _check("timestamps", self.timestamps, (T,))

    def __len__(self) -> int:
        return self.frames.shape[0]

    def select(self, positions: Sequence[int]) -> "Clip":
        """The frames at `positions` (positions in this clip, not source indices)."""
        idx = torch.as_tensor(list(positions), dtype=torch.long)
        return Clip(self.key, self.frames[idx], Cameras(self.cameras.cam_to_world[idx], self.cameras.intrinsics[idx],
                                                        self.cameras.width, self.cameras.height),
                    self.frame_index[idx], None if self.timestamps is None else self.timestamps[idx], self.url)


def uint8_to_float(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1].

    Divides in float64 and rounds once to float32, as MVSplat's `np.array(image) / 255` then float32 does.
    """
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8) / 255.0).float().permute(0, 3, 1, 2)


def check_indices(indices: Sequence[int], length: int, what: str) -> list:
    """Validated list of frame indices into a clip of `length` frames (negative indices count from the end)."""
    out = []
    for i in indices:
        i = int(i)
        if not -length <= i < length:
            raise InputError(f"{what}: frame {i} is out of range for a clip of {length} frames; check that the "
                             "evaluation index belongs to this dataset")
        out.append(i % length)
    return out
