"""Benchmark of the Gaussian renderers: forward+backward time and peak memory at 256x256 with 20k Gaussians
(torch backend; gsplat too when CUDA and gsplat are available), and fit steps per second at 128x192.

Run: .venv/bin/python bench/bench_render.py [--repeats 5]. Prints a table (median times).
The 20k Gaussians fill a box in front of the camera, sized by their nearest-neighbour spacing like an
initialisation from point maps (x0.4: about 2 px sigma footprints).
"""

import argparse
import math
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from reconx_core.gaussians import fit_gaussians, init_from_points, render  # noqa: E402
from reconx_core.gaussians.rasterize_gsplat import gsplat_available  # noqa: E402
from reconx_core.types import Cameras, Gaussians  # noqa: E402


def bench_scene(n=20000, size=(256, 256), device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    H, W = size
    pts = torch.rand(n, 3, generator=g) * torch.tensor([2.0, 2.0, 1.0]) + torch.tensor([-1.0, -1.0, 2.5])
    cols = torch.rand(n, 3, generator=g)
    gs = init_from_points(pts, cols, sh_degree=3)
    # 0.4x the neighbour spacing: footprints of ~2 px sigma, layered a few deep, as a mid-fit model looks.
    gs = Gaussians(gs.means, torch.randn(n, 4, generator=g),
                   gs.log_scales + math.log(0.4) + 0.3 * torch.randn(n, 3, generator=g),
                   torch.randn(n, generator=g), gs.sh + 0.1 * torch.randn(gs.sh.shape, generator=g)).to(device)
    f = 0.9 * W
    K = torch.tensor([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1.0]])
    cams = Cameras(torch.eye(4)[None], K[None], W, H).to(device)
    return gs, cams


def time_fwd_bwd(gs, cams, backend, repeats):
    leaves = [t.detach().clone().requires_grad_() for t in (gs.means, gs.quats, gs.log_scales, gs.opacity_logits, gs.sh)]
    g = Gaussians(*leaves)
    fwd, tot = [], []
    for _ in range(repeats + 1):
        if cams.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = render(g, cams, backend=backend)
        if cams.device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        (out.rgb.sum() + out.depth.mean()).backward()
        if cams.device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        fwd.append(t1 - t0), tot.append(t2 - t0)
    return statistics.median(fwd[1:]), statistics.median(tot[1:]), float(out.alpha.mean())


def peak_cpu_bytes(fn):
    """Peak bytes allocated by torch's CPU allocator during fn (via the profiler's memory tracking)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak, cur = 0, 0
    events = sorted((e for e in prof.events() if e.cpu_memory_usage), key=lambda e: e.time_range.start)
    for e in events:
        cur += e.cpu_memory_usage
        peak = max(peak, cur)
    return peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fit-steps", type=int, default=30)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cuda {torch.cuda.is_available()}")
    rows = []
    gs, cams = bench_scene()
    f, t, cov = time_fwd_bwd(gs, cams, "torch", args.repeats)
    leaves = [x.detach().clone().requires_grad_() for x in (gs.means, gs.quats, gs.log_scales, gs.opacity_logits, gs.sh)]
    peak = peak_cpu_bytes(lambda: render(Gaussians(*leaves), cams, backend="torch").rgb.sum().backward())
    rows.append(("torch cpu", "render 20k @256x256 fwd", f"{f * 1000:.0f} ms", ""))
    rows.append(("torch cpu", "render 20k @256x256 fwd+bwd", f"{t * 1000:.0f} ms", f"peak {peak / 2**20:.0f} MiB"))
    if torch.cuda.is_available():
        gs_c, cams_c = bench_scene(device="cuda")
        for backend in ("torch", "gsplat") if gsplat_available() else ("torch",):
            torch.cuda.reset_peak_memory_stats()
            f, t, _ = time_fwd_bwd(gs_c, cams_c, backend, args.repeats)
            rows.append((f"{backend} cuda", "render 20k @256x256 fwd+bwd", f"{t * 1000:.1f} ms",
                         f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"))
    # Fit speed: 4 views of 128x192, 20k Gaussians, L1 + SSIM (no LPIPS backbone offline).
    H, W = 128, 192
    gs, _ = bench_scene(size=(H, W))
    f = 0.9 * W
    K = torch.tensor([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1.0]]).expand(4, 3, 3)
    c2w = torch.eye(4).repeat(4, 1, 1)
    c2w[:, 0, 3] = torch.linspace(-0.1, 0.1, 4)
    cams = Cameras(c2w, K.clone(), W, H)
    images = torch.rand(4, 3, H, W, generator=torch.Generator().manual_seed(1))
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        t0 = time.perf_counter()
        fit_gaussians(images.to(device), cams.to(device), init=gs.to(device), steps=args.fit_steps,
                      weights=(0.8, 0.2, 0.0))
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rows.append((f"auto {device}", f"fit 20k @128x192, {args.fit_steps} steps", f"{args.fit_steps / dt:.1f} steps/s", ""))
    print(f"(image coverage of the 256x256 scene: {cov:.2f}; max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")
    print(f"{'backend':<12} {'what':<34} {'time':>14}  memory")
    for r in rows:
        print(f"{r[0]:<12} {r[1]:<34} {r[2]:>14}  {r[3]}")


if __name__ == "__main__":
    main()
