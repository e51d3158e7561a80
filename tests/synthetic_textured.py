"""Ground-truth scenes for the Gaussian tests: textured geometry, known cameras, images made by exact ray casting.

The scene: a sphere (radius 0.6 at the origin) in front of a wall (plane z = 1.5) standing on a floor (plane
y = 0.8; OpenCV world, y down). Each surface has a smooth procedural texture (a few sinusoids of the hit point),
so every pixel's colour, depth and 3D point are known exactly. Cameras look at the origin from an arc of radius 3.
"""

import math

import torch

from reconx_core.types import Cameras, Scene

SPHERE_R = 0.6
WALL_Z = 1.5
FLOOR_Y = 0.8


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, -1.0, 0.0)) -> torch.Tensor:
    """(4, 4) OpenCV camera-to-world looking from eye at target, image 'up' along `up`."""
    eye, target, up = (torch.tensor(v, dtype=torch.float32) for v in (eye, target, up))
    fwd = torch.nn.functional.normalize(target - eye, dim=0)
    right = torch.nn.functional.normalize(torch.linalg.cross(up, fwd), dim=0)
    right = -right
    down = torch.linalg.cross(fwd, right)
    M = torch.eye(4)
    M[:3, 0], M[:3, 1], M[:3, 2], M[:3, 3] = right, down, fwd, eye
    return M


def arc_cameras(angles, width=96, height=64, radius=3.0, focal_scale=1.0, lift=-0.4) -> Cameras:
    """Cameras on a horizontal arc (angles in radians, 0 = looking along +z), all looking at the origin."""
    c2w = torch.stack([look_at((radius * math.sin(a), lift, -radius * math.cos(a))) for a in angles])
    f = focal_scale * width
    K = torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]])
    return Cameras(c2w, K.expand(len(angles), 3, 3).clone(), width, height)


def _texture(p: torch.Tensor, surface: torch.Tensor) -> torch.Tensor:
    """(M, 3) colours in [0.05, 0.95] at hit points p (M, 3) of surfaces 0 sphere, 1 wall, 2 floor."""
    x, y, z = p.unbind(-1)
    sphere = torch.stack([0.55 + 0.35 * torch.sin(4 * x + 2 * y), 0.45 + 0.3 * torch.cos(5 * z - 3 * y),
                          0.35 + 0.25 * torch.sin(3 * y + 4 * z)], -1)
    wall = torch.stack([0.5 + 0.3 * torch.sin(3 * x) * torch.cos(2.5 * y), 0.6 + 0.25 * torch.sin(2 * x + 3 * y),
                        0.4 + 0.3 * torch.cos(4 * y - x)], -1)
    floor = torch.stack([0.4 + 0.3 * torch.cos(3 * x + 2 * z), 0.35 + 0.2 * torch.sin(4 * z),
                         0.55 + 0.3 * torch.sin(2.5 * x) * torch.sin(3 * z)], -1)
    out = torch.where((surface == 0)[:, None], sphere, torch.where((surface == 1)[:, None], wall, floor))
    return out.clamp(0.05, 0.95)


def render_exact(cameras: Cameras):
    """Ray-cast every pixel centre (integer coordinates) of every camera.

    Returns images (N, 3, H, W) in [0, 1], depths (N, H, W) camera z, pts3d (N, H, W, 3) world frame.
    """
    W, H = cameras.width, cameras.height
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    images, depths, points = [], [], []
    for i in range(len(cameras)):
        K, c2w = cameras.intrinsics[i], cameras.cam_to_world[i]
        d_cam = torch.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], torch.ones_like(u)], -1).reshape(-1, 3)
        d = d_cam @ c2w[:3, :3].T                      # world directions with unit camera-z component
        o = c2w[:3, 3].expand_as(d)
        inf = torch.full((d.shape[0],), float("inf"))
        # sphere |o + t d|^2 = r^2
        a, b, c = (d * d).sum(-1), 2 * (o * d).sum(-1), (o * o).sum(-1) - SPHERE_R ** 2
        disc = b * b - 4 * a * c
        t_s = torch.where(disc > 0, (-b - disc.clamp_min(0).sqrt()) / (2 * a), inf)
        t_s = torch.where(t_s > 0, t_s, inf)
        t_w = torch.where(d[:, 2] > 1e-9, (WALL_Z - o[:, 2]) / d[:, 2], inf)
        t_f = torch.where(d[:, 1] > 1e-9, (FLOOR_Y - o[:, 1]) / d[:, 1], inf)
        t_all = torch.stack([t_s, torch.where(t_w > 0, t_w, inf), torch.where(t_f > 0, t_f, inf)], -1)
        t, surface = t_all.min(-1)
        assert torch.isfinite(t).all(), "every ray must hit the scene"
        p = o + t[:, None] * d
        images.append(_texture(p, surface).T.reshape(3, H, W))
        depths.append(t.reshape(H, W))                  # t is the camera z because d has unit camera-z
        points.append(p.reshape(H, W, 3))
    return torch.stack(images), torch.stack(depths), torch.stack(points)


def make_scene(angles, width=96, height=64) -> Scene:
    """A Scene (cameras, exact images/depths/points, confidence 1) seen from cameras at `angles`."""
    cams = arc_cameras(angles, width, height)
    images, depths, pts = render_exact(cams)
    return Scene(cams, depths, pts, torch.ones_like(depths), images)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [0, 1] (any matching shapes)."""
    return float(-10 * torch.log10(((a.clamp(0, 1) - b) ** 2).mean()))
