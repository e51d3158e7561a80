"""Point-cloud renders: z-buffered, alpha-composited splats of the scene's points into any cameras.

These renders are what ViewCrafter's checkpoints take as their concat condition and what render-guided
DynamiCrafter sampling pulls its predictions towards, so they follow ViewCrafter's renderer (PyTorch3D points with
`PointsRasterizer` + `AlphaCompositor`, see the spec in the README's Structure guidance section):
- every point is a disc of radius r pixels (isotropic, in pixels; PyTorch3D's 0.01 NDC is 0.01 min(H, W) / 2 px);
  a pixel centre at distance d < r from the projected point is a candidate, with alpha = 1 - d^2 / r^2;
- per pixel the `points_per_pixel` candidates nearest in camera z are composited front to back,
  C = sum_k alpha_k prod_{l<k} (1 - alpha_l) c_k, with no normalisation (edges darken) and black holes;
- points with camera z <= `near` are skipped.
Coverage (the mask) is 1 - prod_k (1 - alpha_k); depth is the z of the front candidate (a z-buffer).
One convention differs from ViewCrafter's: pixel centres sit at integer coordinates (DESIGN.md), where PyTorch3D
samples (i + 0.5, j + 0.5) of the intrinsics it is given; ViewCrafter's renders are therefore shifted half a
pixel from the true geometry (pass cx - 0.5, cy - 0.5 to reproduce that shift).

How it runs (pure PyTorch, any device, no compile): each point makes one fragment per pixel centre inside its disc
(points are ranked front to back first, so a fragment is just (pixel, rank), generated in z order); one stable
sort by pixel groups them with z order kept, and a fragment is among its pixel's `points_per_pixel` front ones
exactly when the fragment that many places earlier belongs to another pixel. (Peeling the front fragment with
`points_per_pixel` scatter-min passes instead measured 4x slower on the CPU at 1024x576: every pass touches all
fragments.) bench/bench_point_render.py measures it against our Gaussian rasterizer used as a splatter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..camera_path import segment_path
from ..errors import InputError
from ..framing import crop_resize
from ..geometry import resize_cameras
from ..types import Cameras, Scene, _check, _move

@dataclass
class PointRenders:
    """Point-cloud renders of N cameras.

    rgb:   (N, H, W, 3) float32 in [0, 1], composited colour (black where nothing is seen).
    mask:  (N, H, W) float32 in [0, 1], coverage 1 - prod(1 - alpha); 0 in holes.
    depth: (N, H, W) float32, camera z of the front point; 0 in holes.
    """

    rgb: torch.Tensor
    mask: torch.Tensor
    depth: torch.Tensor


def default_radius(width: int, height: int) -> float:
    """Splat radius in pixels when none is given: ViewCrafter's 0.01 NDC, 0.01 min(W, H) / 2 (1.6 px at 512x320,
    2.88 px at 1024x576), but at least 1 px so that every point reaches a pixel centre at small sizes."""
    return max(0.01 * min(int(width), int(height)) / 2, 1.0)


def _fragments(u: torch.Tensor, v: torch.Tensor, radius: float, padded_width: int, pad: int,
               chunk: int = 1 << 18):
    """Every (pixel, point) pair with the pixel centre strictly inside the point's disc.

    u, v: (M,) projected positions (pixel centres at integers) of points sorted front to back.
    Pixels are indexed row-major in the image padded by `pad` pixels on every side (width `padded_width`), so
    discs that cross the border need no bounds tests; `pad` >= the disc's reach.
    Returns pixel (F,) int32 and rank (F,) int32 (the point's index in u, v), point-major (z order).
    """
    reach = math.ceil(radius + 0.5) - 1  # |round(u) + d - u| < radius needs |d| <= reach
    device = u.device
    d = torch.arange(-reach, reach + 1, device=device, dtype=u.dtype)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    dx, dy = dx.reshape(-1), dy.reshape(-1)
    keep_offset = (dx.abs() - 0.5).clamp_min(0) ** 2 + (dy.abs() - 0.5).clamp_min(0) ** 2 < radius * radius
    dx, dy = dx[keep_offset], dy[keep_offset]          # offsets no point can reach are never tested
    offset_index = (dy * padded_width + dx).to(torch.int32)
    bu, bv = torch.round(u), torch.round(v)
    fu, fv = u - bu, v - bv                            # in [-0.5, 0.5]
    base = (bv.to(torch.int32) + pad) * padded_width + (bu.to(torch.int32) + pad)
    r2 = radius * radius
    pix, ranks = [], []
    for s in range(0, u.shape[0], chunk):
        e = min(s + chunk, u.shape[0])
        d2 = (dx - fu[s:e, None]) ** 2 + (dy - fv[s:e, None]) ** 2     # (chunk, offsets)
        point, offset = (d2 < r2).nonzero(as_tuple=True)
        pix.append(base[s:e][point] + offset_index[offset])
        ranks.append((point + s).to(torch.int32))
    return torch.cat(pix), torch.cat(ranks)


def _render_view(points: torch.Tensor, colours: torch.Tensor, world_to_cam: torch.Tensor, K: torch.Tensor,
                 width: int, height: int, radius: float, points_per_pixel: int, near: float):
    """One camera: (H, W, 3) colour, (H, W) coverage, (H, W) depth (see `render_point_cloud`)."""
    device = points.device
    cam = points @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
    z = cam[:, 2]
    zs = z.clamp_min(1e-12)
    u = K[0, 0] * cam[:, 0] / zs + K[0, 2]
    v = K[1, 1] * cam[:, 1] / zs + K[1, 2]
    keep = (z > near) & (u > -radius) & (u < width - 1 + radius) & (v > -radius) & (v < height - 1 + radius)
    idx = keep.nonzero().squeeze(1)
    idx = idx[torch.argsort(z[idx], stable=True)]  # front to back: a point's rank orders it in z
    u, v, z, col = u[idx], v[idx], z[idx], colours[idx]
    if idx.numel() == 0:
        zeros = torch.zeros(height, width, device=device)
        return torch.zeros(height, width, 3, device=device), zeros, zeros.clone()
    pad = math.ceil(2 * radius) + 1  # points lie within radius of the image, their fragments within 2 radius
    pw, ph = width + 2 * pad, height + 2 * pad
    hw = pw * ph
    alpha = torch.zeros(points_per_pixel, hw, device=device)
    slot = torch.zeros((points_per_pixel, hw), dtype=torch.long, device=device)
    pix, rank = _fragments(u, v, radius, pw, pad)
    # Group the fragments by pixel, keeping z order inside each group: the fragments come point-major and the
    # points front to back, so a stable sort by pixel alone is enough.
    pix_sorted, order = torch.sort(pix, stable=True)
    del pix
    n, P = pix_sorted.shape[0], points_per_pixel
    first_p = torch.ones(n, dtype=torch.bool, device=device)  # among its pixel's first P fragments
    first_p[P:] = pix_sorted[P:] != pix_sorted[:-P]
    kept = first_p.nonzero().squeeze(1)
    p, r = pix_sorted[kept].long(), rank[order[kept]].long()
    del pix_sorted, order, rank, first_p
    idx = torch.arange(p.shape[0], device=device)
    starts = torch.ones_like(p, dtype=torch.bool)
    starts[1:] = p[1:] != p[:-1]
    k = idx - torch.where(starts, idx, torch.zeros_like(idx)).cummax(0).values   # slot: position in the pixel
    d2 = ((p % pw - pad).to(u.dtype) - u[r]) ** 2 + ((p // pw - pad).to(v.dtype) - v[r]) ** 2
    alpha[k, p], slot[k, p] = 1.0 - d2 / (radius * radius), r
    before = torch.cumprod(torch.cat([torch.ones_like(alpha[:1]), 1.0 - alpha[:-1]]), dim=0)
    weights = alpha * before                                                  # (P, HW), 0 on empty slots
    crop = lambda t: t.reshape(*t.shape[:-1], ph, pw)[..., pad:pad + height, pad:pad + width]  # noqa: E731
    weights, slot = crop(weights), crop(slot)
    rgb = torch.einsum("phw,phwc->hwc", weights, col[slot])
    coverage = 1.0 - torch.prod(1.0 - crop(alpha), dim=0)
    depth = torch.where(weights[0] > 0, z[slot[0]], torch.zeros_like(weights[0]))
    return rgb.clamp(0, 1), coverage, depth


def render_point_cloud(points: torch.Tensor, colours: torch.Tensor, cameras: Cameras, radius: Optional[float] = None,
                       points_per_pixel: int = 10, near: float = 0.0,
                       callback: Optional[Callable[[int, int], None]] = None) -> PointRenders:
    """Render a coloured point cloud into every camera as z-buffered, alpha-composited splats.

    points: (M, 3) world frame; colours: (M, 3) in [0, 1]; cameras: N OpenCV cameras of size W x H (DESIGN.md).
    radius: splat radius in pixels at the cameras' size (None: `default_radius`, ViewCrafter's 0.01 NDC).
    points_per_pixel: front candidates composited per pixel (ViewCrafter: 10). near: points with camera z <= near
    are skipped. Runs on the points' device; callback(step, total) after each camera.
    Returns PointRenders: rgb (N, H, W, 3), mask (N, H, W) coverage in [0, 1], depth (N, H, W); holes are black
    with mask 0 and depth 0.
    """
    if not isinstance(cameras, Cameras):
        raise InputError(f"cameras must be Cameras, got {type(cameras).__name__}")
    _check("points", points, (None, 3))
    _check("colours", colours, (points.shape[0], 3))
    if points_per_pixel < 1:
        raise InputError(f"points_per_pixel must be >= 1, got {points_per_pixel}")
    W, H = cameras.width, cameras.height
    r = default_radius(W, H) if radius is None or radius <= 0 else float(radius)
    if r > 64:
        raise InputError(f"splat radius {r:g} px is too large (max 64); points are meant to be small splats")
    pts, cols = points.float(), colours.float().to(points.device)
    finite = torch.isfinite(pts).all(-1) & torch.isfinite(cols).all(-1)
    if not bool(finite.all()):
        pts, cols = pts[finite], cols[finite]
    cameras = cameras.to(pts.device)
    w2c = torch.linalg.inv(cameras.cam_to_world.double()).float()
    intr = cameras.intrinsics.float()
    rgbs, masks, depths = [], [], []
    with torch.no_grad():
        for i in range(len(cameras)):
            rgb, mask, depth = _render_view(pts, cols, w2c[i], intr[i], W, H, r, int(points_per_pixel),
                                            float(near))
            rgbs.append(rgb), masks.append(mask), depths.append(depth)
            if callback is not None:
                callback(i + 1, len(cameras))
    return PointRenders(torch.stack(rgbs), torch.stack(masks), torch.stack(depths))


@dataclass
class PathRenders:
    """Renders of a scene's points along a camera path between its reference views (RECONX_RENDERS).

    frames:            (S, 3, H, W) float in [0, 1], the renders (black holes); S = (K-1)(L-1)+1.
    mask:              (S, H, W) float in [0, 1], coverage of each render.
    depth:             (S, H, W) float, camera z of the front point (0 in holes).
    cameras:           Cameras of the S frames at (W, H): the path the renders were made along.
    reference_index:   (K,) long, frame of each reference view, k (L-1).
    references:        (K, 3, H, W) the reference photos centre-cropped and resized to (W, H).
    reference_cameras: Cameras of the K references at (W, H).
    frames_per_segment: L, both ends included.
    path:              the path kind ("linear", "spline", "viewcrafter").
    radius:            splat radius in pixels (at the size the renders were made, see `render_scene_path`).
    info:              free-form metadata (point count, ...).
    """

    frames: torch.Tensor
    mask: torch.Tensor
    depth: torch.Tensor
    cameras: Cameras
    reference_index: torch.Tensor
    references: torch.Tensor
    reference_cameras: Cameras
    frames_per_segment: int
    path: str
    radius: float
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        _check("frames", self.frames, (None, 3, None, None))
        S, _, H, W = self.frames.shape
        _check("mask", self.mask, (S, H, W))
        _check("depth", self.depth, (S, H, W))
        K = len(self.reference_cameras)
        _check("references", self.references, (K, 3, H, W))
        _check("reference_index", self.reference_index, (K,))
        if len(self.cameras) != S or (self.cameras.width, self.cameras.height) != (W, H):
            raise InputError(f"cameras must be {S} cameras of {W}x{H}, got {len(self.cameras)} of "
                             f"{self.cameras.width}x{self.cameras.height}")
        if S != (K - 1) * (int(self.frames_per_segment) - 1) + 1:
            raise InputError(f"{S} frames do not make {K - 1} segments of {self.frames_per_segment} frames")

    def __len__(self) -> int:
        return self.frames.shape[0]

    @property
    def size(self) -> tuple:
        """(height, width)."""
        return tuple(self.frames.shape[-2:])

    def segment(self, k: int) -> slice:
        """The frames of segment k (0-based): L frames from reference k to reference k+1."""
        start = k * (self.frames_per_segment - 1)
        return slice(start, start + self.frames_per_segment)

    def to(self, device=None, dtype=None) -> "PathRenders":
        return _move(self, device, dtype)


def render_scene_path(scene: Scene, frames_per_segment: int, width: int = 0, height: int = 0, path: str = "linear",
                      radius: Optional[float] = None, max_points: int = 0, points_per_pixel: int = 10,
                      downsample: int = 1, callback: Optional[Callable[[int, int], None]] = None) -> PathRenders:
    """Render the scene's confident points along a path through its views, for a video model of width x height.

    scene: K >= 2 aligned views in order. frames_per_segment: L >= 2 (both ends). width, height: the render size
    (0: the scene's); the views are centre-cropped to that aspect and resized, and their cameras follow exactly
    (`reconx_core.framing.crop_resize`). path: `reconx_core.camera_path.segment_path` kind. radius: splat radius
    in pixels (None: `default_radius`). max_points: keep an evenly strided subset of at most this many points
    (0: all confident points, `Scene.confident_points`). downsample: render at 1/downsample of the size (radius
    then refers to that size) and resize bilinearly (align_corners False) to width x height, as ViewCrafter makes
    its 576x1024 conditions from 288x512 renders; depth is resized by nearest neighbour.
    Returns PathRenders on the scene's device, S = (K-1)(L-1)+1 frames, reference k at frame k(L-1).
    """
    if not isinstance(scene, Scene):
        raise InputError(f"scene must be a RECONX_SCENE (Scene), got {type(scene).__name__}")
    if len(scene) < 2:
        raise InputError(f"rendering a path between views needs at least 2 views, got {len(scene)}")
    H, W = int(height) or scene.cameras.height, int(width) or scene.cameras.width
    references, ref_cameras = crop_resize(scene.images, scene.cameras, H, W)
    cameras = segment_path(ref_cameras, int(frames_per_segment), path)
    points, colours = scene.confident_points()
    if points.shape[0] == 0:
        raise InputError(f"no point of the scene has confidence above {scene.min_conf:g}; lower the minimum "
                         "confidence of ReconX DUSt3R Global Alignment")
    if max_points and points.shape[0] > max_points:
        sel = torch.linspace(0, points.shape[0] - 1, int(max_points), device=points.device).round().long()
        points, colours = points[sel], colours[sel]
    ds = max(1, int(downsample))
    if H % ds or W % ds:
        raise InputError(f"a {W}x{H} render cannot be made at 1/{ds} size; use a size divisible by {ds}")
    small = cameras if ds == 1 else resize_cameras(cameras, W // ds, H // ds)
    r = default_radius(W // ds, H // ds) if radius is None or radius <= 0 else float(radius)
    out = render_point_cloud(points, colours, small, radius=r, points_per_pixel=points_per_pixel, callback=callback)
    rgb, mask, depth = out.rgb.permute(0, 3, 1, 2).contiguous(), out.mask, out.depth
    if ds > 1:
        rgb = F.interpolate(rgb, size=(H, W), mode="bilinear", align_corners=False).clamp(0, 1)
        mask = F.interpolate(mask[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0].clamp(0, 1)
        depth = F.interpolate(depth[:, None], size=(H, W), mode="nearest")[:, 0]
    L = int(frames_per_segment)
    index = torch.arange(len(scene), device=scene.device) * (L - 1)
    return PathRenders(frames=rgb, mask=mask, depth=depth, cameras=cameras, reference_index=index,
                       references=references, reference_cameras=ref_cameras, frames_per_segment=L, path=path,
                       radius=r, info={"points": int(points.shape[0]), "downsample": ds})

