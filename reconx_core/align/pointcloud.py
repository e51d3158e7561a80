"""The clean-point-cloud step for an aligned Scene, and the official confidence masks."""

from __future__ import annotations

import dataclasses

import torch

from ..errors import InputError
from ..types import Scene


def confidence_masks(conf: torch.Tensor, min_conf_thr: float = 3.0) -> torch.Tensor:
    """(N, H, W) bool: pixels whose confidence is above `min_conf_thr` (official `get_masks`).

    For a Scene use `scene.confident_mask()`, which applies the scene's own threshold."""
    return conf > min_conf_thr


@torch.no_grad()
def clean_pointcloud(conf: torch.Tensor, cam_to_world: torch.Tensor, intrinsics: torch.Tensor,
                     depths: torch.Tensor, pts3d: torch.Tensor, tol: float = 0.001, bad_conf: float = 0.0):
    """Lower the confidence of points that another view sees *behind* its own, more confident surface.

    For every ordered pair of views (i, j): project view i's points into camera j; where such a point lies in
    front of view j's depth (by more than `tol`, relative) at that pixel and is less confident than view j's
    pixel there, its confidence is clipped to `bad_conf` (official `clean_pointcloud`, same visiting order).
    conf, depths: (N, H, W); cam_to_world: (N, 4, 4); intrinsics: (N, 3, 3); pts3d: (N, H, W, 3) world frame.
    Returns the new confidences (N, H, W); the inputs are not modified.
    """
    if not 0 <= tol < 1:
        raise InputError(f"tol must be in [0, 1), got {tol}")
    N, H, W = conf.shape
    res = conf.clone()
    world_to_cam = torch.linalg.inv(cam_to_world)
    for i in range(N):
        for j in range(N):  # sequential on purpose: view j's confidences may already have been lowered
            if i == j:
                continue
            proj = pts3d[i] @ world_to_cam[j, :3, :3].T + world_to_cam[j, :3, 3]
            proj_depth = proj[..., 2]
            uvw = proj @ intrinsics[j].T
            uv = (uvw[..., :2] / uvw[..., 2:3]).round()
            u, v = uv[..., 0], uv[..., 1]
            visible = (proj_depth > 0) & (u >= 0) & (u < W) & (v >= 0) & (v < H)
            ui, vi = u[visible].long(), v[visible].long()
            bad = (proj_depth[visible] < (1 - tol) * depths[j][vi, ui]) & (res[i][visible] < res[j][vi, ui])
            bad_mask = torch.zeros_like(visible)
            bad_mask[visible] = bad
            res[i][bad_mask] = res[i][bad_mask].clip(max=bad_conf)
    return res


def clean_scene(scene: Scene, tol: float = 0.001, bad_conf: float = 0.0) -> Scene:
    """A copy of `scene` whose `conf` went through `clean_pointcloud` (cameras, depths, points unchanged)."""
    conf = clean_pointcloud(scene.conf, scene.cameras.cam_to_world, scene.cameras.intrinsics, scene.depths,
                            scene.pts3d, tol=tol, bad_conf=bad_conf)
    return dataclasses.replace(scene, conf=conf, info=dict(scene.info, cleaned=True))
