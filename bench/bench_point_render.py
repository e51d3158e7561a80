"""Benchmark of the point-cloud renderer (`render_point_cloud`) against our Gaussian rasterizer used as a splatter.

Run: .venv/bin/python bench/bench_point_render.py [--frames 3] [--threads 2] [--sizes 320x512 576x1024]
     [--device cpu|cuda]
The scene: the ray-cast synthetic scene of tests/synthetic_textured.py seen by two cameras at the render size,
all pixels' points with their true colours (2 x H x W points: 328k at 320x512, 1.18M at 576x1024), rendered
along ViewCrafter's path between the two cameras. For each size it times, side by side in one run:
- splats: `render_point_cloud` (ViewCrafter's semantics: radius 0.01 NDC, 10 points per pixel, alpha 1 - d^2/r^2),
- gaussians: the same points as isotropic Gaussians of fixed screen size (sigma = r / 2 px, opacity 0.99), through
  `reconx_core.gaussians` (project_gaussians + the tiled torch rasterizer, forward only).
It prints the median seconds per frame, the 25-frame estimate (median x 25) and the ratio gaussians / splats.
Timings swing with the machine's load: compare only numbers of one run (tests never assert timings).
"""

import argparse
import math
import os
import statistics
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from reconx_core.camera_path import segment_path  # noqa: E402
from reconx_core.gaussians.project import project_gaussians  # noqa: E402
from reconx_core.gaussians.rasterize_torch import TileLayout, rasterize_torch  # noqa: E402
from reconx_core.structure import default_radius, render_point_cloud  # noqa: E402
from tests.synthetic_textured import arc_cameras, render_exact  # noqa: E402


def gaussian_splats(points, colours, cameras, radius):
    """The points as isotropic Gaussians whose screen sigma is radius / 2 px in every view (forward only)."""
    out = []
    w2c = torch.linalg.inv(cameras.cam_to_world)
    quats = torch.zeros(points.shape[0], 4, device=points.device)
    quats[:, 0] = 1
    opac = torch.full((points.shape[0],), 0.99, device=points.device)
    for i in range(len(cameras)):
        z = (points @ w2c[i, :3, :3].T + w2c[i, :3, 3])[:, 2].clamp_min(1e-6)
        f = cameras.intrinsics[i, 0, 0]
        scales = (0.5 * radius * z / f)[:, None].expand(-1, 3).contiguous()
        proj = project_gaussians(points, quats, scales, opac, w2c[i], cameras.intrinsics[i], cameras.width,
                                 cameras.height, eps2d=0.0)
        layout = TileLayout(proj.means2d, proj.radii, proj.depths, proj.visible, cameras.width, cameras.height)
        img, alpha = rasterize_torch(proj.means2d, proj.conics, proj.opacities, colours, layout)
        out.append((img, alpha))
    return out


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=2, help="frames timed per size (each timed once per repeat)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", nargs="+", default=["320x512", "576x1024"])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"load average before: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores), torch threads {args.threads}, "
          f"device {device}")
    print(f"{'size':>9} {'points':>9} {'renderer':>10} {'s/frame':>9} {'25 frames':>10} {'coverage':>9}")
    for size in args.sizes:
        H, W = (int(x) for x in size.split("x"))
        refs = arc_cameras([-0.3, 0.3], W, H, focal_scale=0.8)
        images, _, pts = render_exact(refs)
        points = pts.reshape(-1, 3).to(device)
        colours = images.permute(0, 2, 3, 1).reshape(-1, 3).to(device)
        path = segment_path(refs, 25, "viewcrafter")
        cams = path[torch.linspace(1, 23, args.frames).round().long().tolist()].to(device) if args.frames > 1 \
            else path[12].to(device)
        r = default_radius(W, H)
        result = {}
        t_splat = timed(lambda: result.__setitem__("s", render_point_cloud(points, colours, cams)), args.repeats)
        with torch.no_grad():
            t_gauss = timed(lambda: result.__setitem__("g", gaussian_splats(points, colours, cams, r)), args.repeats)
        n = len(cams)
        cover_s = float((result["s"].mask > 0.5).float().mean())
        cover_g = statistics.mean(float((a > 0.5).float().mean()) for _, a in result["g"])
        for name, t, cover in (("splats", t_splat, cover_s), ("gaussians", t_gauss, cover_g)):
            print(f"{size:>9} {points.shape[0]:>9} {name:>10} {t / n:>9.2f} {25 * t / n:>10.1f} {cover:>9.3f}")
        print(f"{size:>9}  ratio gaussians / splats: {t_gauss / t_splat:.2f}x")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
