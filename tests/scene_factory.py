"""A small, exactly consistent Scene for node tests: N cameras on a line looking at a textured plane."""

import math

import torch

from reconx_core.types import Cameras, Scene


def plane_scene(n_views: int = 2, height: int = 48, width: int = 64, depth: float = 2.0, conf: float = 5.0,
                device: str = "cpu") -> Scene:
    focal = 0.8 * width
    K = torch.tensor([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1.0]]).repeat(n_views, 1, 1)
    c2w = torch.eye(4).repeat(n_views, 1, 1)
    c2w[:, 0, 3] = torch.linspace(-0.2, 0.2, n_views)
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                          indexing="ij")
    depths = torch.full((n_views, height, width), depth)
    x_cam = (u - width / 2) / focal * depth
    y_cam = (v - height / 2) / focal * depth
    pts = torch.stack([x_cam, y_cam, torch.full_like(u, depth)], -1)[None] + c2w[:, None, None, :3, 3]
    # the plane's texture, seen from each camera
    world_x = pts[..., 0]
    images = torch.stack([0.5 + 0.4 * torch.sin(6 * world_x + 3 * pts[..., 1]),
                          0.5 + 0.4 * torch.cos(4 * pts[..., 1]),
                          0.5 + 0.3 * torch.sin(5 * world_x * pts[..., 1] + math.pi / 3)], dim=1)
    scene = Scene(Cameras(c2w, K, width, height), depths, pts, torch.full((n_views, height, width), conf), images,
                  min_conf=3.0)
    return scene.to(device)
