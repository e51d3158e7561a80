"""Frames made by any video model, as Views: the photos' frames and cameras, and the intended path when known."""

from __future__ import annotations

from typing import Sequence

import torch

from ..camera_path import segment_path
from ..errors import InputError
from ..framing import crop_resize
from ..types import Scene, Views


def frames_to_views(frames: torch.Tensor, scene: Scene, reference_index: Sequence[int],
                    path: str = "linear") -> Views:
    """Views of a video generated elsewhere between the scene's photos (e.g. a first-last-frame model).

    frames: (S, 3, H, W) in [0, 1]. scene: the K photos the video was made from, in its order.
    reference_index: the frame of each photo, increasing. path: `segment_path` kind of the intended camera path.
    The reference cameras are the scene's, centre-cropped to the frames' aspect and resized to (W, H)
    (`reconx_core.framing.crop_resize`). When the photos are evenly spaced (photo k at frame k(L-1)), the frames
    get intended cameras along `path` with L frames per segment; otherwise none (the video's motion is unknown).
    Returns Views on the scene's device.
    """
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise InputError(f"frames must be (S, 3, H, W), got {tuple(frames.shape)}")
    S, _, H, W = frames.shape
    index = [int(i) for i in reference_index]
    if len(index) != len(scene):
        raise InputError(f"{len(index)} reference frames for the scene's {len(scene)} photos; give one per photo")
    if any(not 0 <= i < S for i in index) or any(b <= a for a, b in zip(index, index[1:])):
        raise InputError(f"reference frames {index} must increase and lie in [0, {S})")
    _, ref_cameras = crop_resize(scene.images, scene.cameras, H, W)
    intended = None
    step = index[1] - index[0] if len(index) > 1 else 0
    if step > 0 and index == [k * step for k in range(len(index))] and index[-1] == S - 1:
        intended = segment_path(ref_cameras, step + 1, path).to(scene.device)
    return Views(frames=frames.to(scene.device).float().clamp(0, 1),
                 reference_index=torch.tensor(index, dtype=torch.long, device=scene.device),
                 reference_cameras=ref_cameras.to(scene.device), reference_depths=scene.median_depths(),
                 intended_cameras=intended,
                 info={"source": "external video", "path": path if intended is not None else None,
                       "frames_per_segment": step + 1 if intended is not None else None})
