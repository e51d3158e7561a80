"""Typed containers that carry data between the stages.

Each container is a dataclass of tensors that checks its shapes on construction and moves with `.to(device)`.
Data flows one way: images -> `PairPredictions` -> `Scene` -> structure tokens -> frames -> `Gaussians`.

Conventions (see DESIGN.md): OpenCV cameras (x right, y down, z forward), camera-to-world 4x4 poses,
intrinsics in pixels with pixel centres at integer coordinates, images (N, 3, H, W) float in [0, 1].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .errors import InputError


def _check(name: str, t: torch.Tensor, shape: tuple) -> None:
    """Check `t` against `shape`, where an int must match and None matches anything."""
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise InputError(f"{name} has shape {tuple(t.shape)}, expected {want}")


def _move(obj: Any, device, dtype=None) -> Any:
    """Move every tensor field (and tensors nested in dicts) of a dataclass; returns a new instance."""
    def mv(v):
        if isinstance(v, torch.Tensor):
            if dtype is not None and v.is_floating_point():
                return v.to(device=device, dtype=dtype)
            return v.to(device=device)
        if dataclasses.is_dataclass(v) and hasattr(v, "to"):
            return v.to(device, dtype)
        if isinstance(v, dict):
            return {k: mv(x) for k, x in v.items()}
        return v
    return dataclasses.replace(obj, **{f.name: mv(getattr(obj, f.name)) for f in dataclasses.fields(obj)})


@dataclass
class Cameras:
    """Pinhole cameras.

    cam_to_world: (N, 4, 4) float32, OpenCV camera-to-world.
    intrinsics:   (N, 3, 3) float32, pixels; principal point defaults to (W/2, H/2) as in DUSt3R.
    width, height: image size in pixels that the intrinsics refer to.
    """

    cam_to_world: torch.Tensor
    intrinsics: torch.Tensor
    width: int
    height: int

    def __post_init__(self):
        _check("cam_to_world", self.cam_to_world, (None, 4, 4))
        _check("intrinsics", self.intrinsics, (self.cam_to_world.shape[0], 3, 3))
        if int(self.width) <= 0 or int(self.height) <= 0:
            raise InputError(f"camera size must be positive, got {self.width}x{self.height}")
        self.width, self.height = int(self.width), int(self.height)

    def __len__(self) -> int:
        return self.cam_to_world.shape[0]

    @property
    def device(self) -> torch.device:
        return self.cam_to_world.device

    @property
    def world_to_cam(self) -> torch.Tensor:
        """(N, 4, 4) world-to-camera matrices."""
        return torch.linalg.inv(self.cam_to_world)

    @property
    def focals(self) -> torch.Tensor:
        """(N,) mean of fx and fy, in pixels."""
        return 0.5 * (self.intrinsics[:, 0, 0] + self.intrinsics[:, 1, 1])

    def __getitem__(self, idx) -> "Cameras":
        if isinstance(idx, int):
            if not -len(self) <= idx < len(self):
                raise IndexError(f"camera {idx} out of range for {len(self)} cameras")
            idx = slice(idx % len(self), idx % len(self) + 1)
        return Cameras(self.cam_to_world[idx], self.intrinsics[idx], self.width, self.height)

    def to(self, device=None, dtype=None) -> "Cameras":
        return _move(self, device, dtype)


@dataclass
class PairPredictions:
    """DUSt3R's pairwise point maps, one row per directed edge (i, j).

    edges:      (E, 2) long, view indices (i, j).
    pts_i:      (E, H, W, 3) float32, view i's points in camera i's frame.
    pts_j_in_i: (E, H, W, 3) float32, view j's points in camera i's frame.
    conf_i, conf_j: (E, H, W) float32, DUSt3R's raw confidences (>= 1).
    images:     optional (N, 3, H, W) float in [0, 1], the views the edges index (for colours).
    """

    edges: torch.Tensor
    pts_i: torch.Tensor
    pts_j_in_i: torch.Tensor
    conf_i: torch.Tensor
    conf_j: torch.Tensor
    images: Optional[torch.Tensor] = None

    def __post_init__(self):
        _check("edges", self.edges, (None, 2))
        E = self.edges.shape[0]
        _check("pts_i", self.pts_i, (E, None, None, 3))
        H, W = self.pts_i.shape[1:3]
        _check("pts_j_in_i", self.pts_j_in_i, (E, H, W, 3))
        _check("conf_i", self.conf_i, (E, H, W))
        _check("conf_j", self.conf_j, (E, H, W))
        if self.images is not None:
            _check("images", self.images, (None, 3, H, W))

    @property
    def n_views(self) -> int:
        if self.images is not None:
            return self.images.shape[0]
        return int(self.edges.max().item()) + 1

    def to(self, device=None, dtype=None) -> "PairPredictions":
        return _move(self, device, dtype)


@dataclass
class Scene:
    """Views aligned in one world frame.

    cameras:  Cameras of the N views, images of size (W, H).
    depths:   (N, H, W) float32, z-depth in each camera.
    pts3d:    (N, H, W, 3) float32, world frame.
    conf:     (N, H, W) float32, per-pixel confidence (DUSt3R's raw confidence, >= 1, after alignment).
    images:   (N, 3, H, W) float32 in [0, 1].
    info:     free-form metadata (loss, graph, timings); tensors in it move with `.to`.
    min_conf: the confidence a pixel must exceed to count as confident (`confident_mask`); the alignment sets
              it to its `min_conf_thr` (DUSt3R's default 3). Every later stage filters through it.
    """

    cameras: Cameras
    depths: torch.Tensor
    pts3d: torch.Tensor
    conf: torch.Tensor
    images: torch.Tensor
    info: dict = field(default_factory=dict)
    min_conf: float = 0.0

    def __post_init__(self):
        N, H, W = len(self.cameras), self.cameras.height, self.cameras.width
        _check("depths", self.depths, (N, H, W))
        _check("pts3d", self.pts3d, (N, H, W, 3))
        _check("conf", self.conf, (N, H, W))
        _check("images", self.images, (N, 3, H, W))
        self.min_conf = float(self.min_conf)

    def __len__(self) -> int:
        return len(self.cameras)

    @property
    def device(self) -> torch.device:
        return self.pts3d.device

    def confident_mask(self) -> torch.Tensor:
        """(N, H, W) bool: conf > min_conf (DUSt3R's `get_masks`) and a finite point."""
        return (self.conf > self.min_conf) & torch.isfinite(self.pts3d).all(dim=-1)

    def confident_points(self, views=None) -> tuple:
        """The confident points of `views` (default: all) and their colours: (M, 3) world frame, (M, 3) in [0, 1]."""
        idx = slice(None) if views is None else list(views)
        mask = self.confident_mask()[idx]
        return self.pts3d[idx][mask], self.images[idx].permute(0, 2, 3, 1)[mask]

    def median_depths(self) -> torch.Tensor:
        """(N,) median depth of each view over its confident pixels (all its pixels where none is confident)."""
        mask = self.confident_mask()
        return torch.stack([d[m].median() if bool(m.any()) else d.median() for d, m in zip(self.depths, mask)])

    def to(self, device=None, dtype=None) -> "Scene":
        return _move(self, device, dtype)


@dataclass
class Gaussians:
    """3D Gaussians, raw (optimisable) parameterisation.

    means:          (N, 3) world frame.
    quats:          (N, 4) wxyz, not necessarily normalised.
    log_scales:     (N, 3) natural log of the standard deviations along the local axes.
    opacity_logits: (N,) logit of the opacity.
    sh:             (N, K, 3) spherical-harmonic coefficients, K = (degree + 1)**2; colour = 0.5 + SH(dir),
                    clamped at 0, as gsplat does.
    """

    means: torch.Tensor
    quats: torch.Tensor
    log_scales: torch.Tensor
    opacity_logits: torch.Tensor
    sh: torch.Tensor

    def __post_init__(self):
        _check("means", self.means, (None, 3))
        N = self.means.shape[0]
        _check("quats", self.quats, (N, 4))
        _check("log_scales", self.log_scales, (N, 3))
        _check("opacity_logits", self.opacity_logits, (N,))
        _check("sh", self.sh, (N, None, 3))
        K = self.sh.shape[1]
        if K not in (1, 4, 9, 16, 25):
            raise InputError(f"sh has {K} coefficients per channel; expected (degree+1)**2 for degree 0-4")

    def __len__(self) -> int:
        return self.means.shape[0]

    @property
    def sh_degree(self) -> int:
        return int(round(self.sh.shape[1] ** 0.5)) - 1

    @property
    def device(self) -> torch.device:
        return self.means.device

    @property
    def scales(self) -> torch.Tensor:
        return self.log_scales.exp()

    @property
    def opacities(self) -> torch.Tensor:
        return torch.sigmoid(self.opacity_logits)

    def detach(self) -> "Gaussians":
        return Gaussians(*(getattr(self, f.name).detach() for f in dataclasses.fields(self)))

    def to(self, device=None, dtype=None) -> "Gaussians":
        return _move(self, device, dtype)


@dataclass
class Views:
    """Generated frames between reference views, with what is known about them (RECONX_VIEWS).

    frames:            (S, 3, H, W) float in [0, 1]; the reference views sit at `reference_index`.
    reference_index:   (K,) long, frame index of each reference view (increasing; first 0, last S-1).
    reference_cameras: Cameras of the K reference views at the frames' size (W, H).
    cameras:           optional Cameras of all S frames, recovered by confidence mapping.
    conf:              optional (S, H, W) float in [0, 1], per-pixel confidence of each frame (the fit's weight).
    pts3d:             optional (S, H, W, 3) float, world frame, per-frame point maps.
    intended_cameras:  optional Cameras of all S frames: the camera path the frames were generated for (renders
                       along it guided the video model), when known; confidence mapping may start from it.
    reference_depths:  optional (K,) median depth of each reference view in the scene they came from (fixes the
                       scale when the reference cameras share one centre).
    info:              free-form metadata.
    """

    frames: torch.Tensor
    reference_index: torch.Tensor
    reference_cameras: Cameras
    cameras: Optional[Cameras] = None
    conf: Optional[torch.Tensor] = None
    pts3d: Optional[torch.Tensor] = None
    info: dict = field(default_factory=dict)
    intended_cameras: Optional[Cameras] = None
    reference_depths: Optional[torch.Tensor] = None

    def __post_init__(self):
        _check("frames", self.frames, (None, 3, None, None))
        S, _, H, W = self.frames.shape
        _check("reference_index", self.reference_index, (len(self.reference_cameras),))
        if (self.reference_cameras.height, self.reference_cameras.width) != (H, W):
            raise InputError(f"reference cameras are {self.reference_cameras.width}x{self.reference_cameras.height}, "
                             f"frames {W}x{H}")
        idx = self.reference_index
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= S):
            raise InputError(f"reference_index {idx.tolist()} outside the {S} frames")
        if self.conf is not None:
            _check("conf", self.conf, (S, H, W))
        if self.pts3d is not None:
            _check("pts3d", self.pts3d, (S, H, W, 3))
        for name in ("cameras", "intended_cameras"):
            cams = getattr(self, name)
            if cams is not None and (len(cams) != S or (cams.height, cams.width) != (H, W)):
                raise InputError(f"{name} must be {S} cameras of size {W}x{H}, got {len(cams)} of "
                                 f"{cams.width}x{cams.height}")
        if self.reference_depths is not None:
            _check("reference_depths", self.reference_depths, (len(self.reference_cameras),))

    def __len__(self) -> int:
        return self.frames.shape[0]

    @property
    def device(self) -> torch.device:
        return self.frames.device

    def to(self, device=None, dtype=None) -> "Views":
        return _move(self, device, dtype)
