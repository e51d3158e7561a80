"""Benchmark of the Gaussian renderers: forward+backward time and peak memory at 256x256 with 20k Gaussians
(torch backend; gsplat too when CUDA and gsplat are available), and fit steps per second at 128x192.

Run: .venv/bin/python bench/bench_render.py [--repeats 5] [--threads 1 2] [--compare DIR]
Prints a table of medians: wall time and process CPU time (all threads) at each thread count, with the load
average before and after. --compare DIR also times the `reconx_core` found in DIR (e.g. an older commit:
`git worktree add /tmp/old <commit>`), interleaved with this one, so before/after numbers share the machine's
conditions. On a shared machine, compare only numbers from the same run; with more runnable threads than cores,
OpenMP's barriers make multi-threaded times erratic (single-threaded CPU time is the stable figure).
The 20k Gaussians fill a box in front of the camera, sized by their nearest-neighbour spacing like an
initialisation from point maps (x0.4: about 2 px sigma footprints).
"""

import argparse
import importlib.util
import math
import os
import statistics
import sys
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def load_core(root: str, name: str):
    """Import the package `reconx_core` under `root` as module `name` (so two versions can sit side by side)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "reconx_core", "__init__.py"),
                                                  submodule_search_locations=[os.path.join(root, "reconx_core")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return importlib.import_module(f"{name}.gaussians"), importlib.import_module(f"{name}.types")


def bench_scene(core, n=20000, size=(256, 256), device="cpu", seed=0):
    """20k Gaussians in a box in front of one camera, as `core`'s Gaussians and Cameras."""
    G, T = core
    g = torch.Generator().manual_seed(seed)
    H, W = size
    pts = torch.rand(n, 3, generator=g) * torch.tensor([2.0, 2.0, 1.0]) + torch.tensor([-1.0, -1.0, 2.5])
    cols = torch.rand(n, 3, generator=g)
    gs = G.init_from_points(pts, cols, sh_degree=3)
    # 0.4x the neighbour spacing: footprints of ~2 px sigma, layered a few deep, as a mid-fit model looks.
    gs = T.Gaussians(gs.means, torch.randn(n, 4, generator=g),
                     gs.log_scales + math.log(0.4) + 0.3 * torch.randn(n, 3, generator=g),
                     torch.randn(n, generator=g), gs.sh + 0.1 * torch.randn(gs.sh.shape, generator=g)).to(device)
    f = 0.9 * W
    K = torch.tensor([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1.0]])
    cams = T.Cameras(torch.eye(4)[None], K[None], W, H).to(device)
    return gs, cams


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_render(core, gs, cams, backend="torch"):
    """One render fwd+bwd: (fwd wall, fwd+bwd wall, fwd+bwd process CPU) in seconds."""
    G, T = core
    leaves = [t.detach().clone().requires_grad_() for t in (gs.means, gs.quats, gs.log_scales, gs.opacity_logits, gs.sh)]
    _sync(cams.device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = G.render(T.Gaussians(*leaves), cams, backend=backend)
    _sync(cams.device)
    t1 = time.perf_counter()
    (out.rgb.sum() + out.depth.mean()).backward()
    _sync(cams.device)
    return t1 - t0, time.perf_counter() - t0, time.process_time() - c0


def fit_problem(core, device="cpu"):
    """4 views of 128x192, 20k Gaussians, random targets."""
    G, T = core
    H, W = 128, 192
    gs, _ = bench_scene(core, size=(H, W), device=device)
    f = 0.9 * W
    K = torch.tensor([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1.0]]).expand(4, 3, 3)
    c2w = torch.eye(4).repeat(4, 1, 1)
    c2w[:, 0, 3] = torch.linspace(-0.1, 0.1, 4)
    cams = T.Cameras(c2w, K.clone(), W, H).to(device)
    images = torch.rand(4, 3, H, W, generator=torch.Generator().manual_seed(1)).to(device)
    return gs, cams, images


def time_fit(core, problem, steps):
    """Seconds per fit step (L1 + SSIM, no LPIPS backbone offline): (wall, process CPU)."""
    G, _ = core
    gs, cams, images = problem
    t0, c0 = time.perf_counter(), time.process_time()
    G.fit_gaussians(images, cams, init=gs, steps=steps, weights=(0.8, 0.2, 0.0))
    _sync(images.device)
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


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
    ap.add_argument("--fit-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    ap.add_argument("--compare", default=None, help="a directory holding another reconx_core to time alongside")
    args = ap.parse_args()
    cores = {"this": load_core(ROOT, "core_this")}
    if args.compare:
        cores["compare"] = load_core(args.compare, "core_compare")
    threads = sorted(set(args.threads))
    print(f"torch {torch.__version__}, cores {os.cpu_count()}, threads {threads}, cuda {torch.cuda.is_available()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    scenes = {k: bench_scene(c) for k, c in cores.items()}
    problems = {k: fit_problem(c) for k, c in cores.items()}
    res = {}
    for nt in threads:
        torch.set_num_threads(nt)
        for name, core in cores.items():                  # warm-up (first calls allocate and initialise)
            time_render(core, *scenes[name])
            time_fit(core, problems[name], 2)
        for _ in range(args.repeats):                      # interleaved, so both versions see the same load
            for name, core in cores.items():
                res.setdefault((name, nt, "render"), []).append(time_render(core, *scenes[name]))
                res.setdefault((name, nt, "fit"), []).append(time_fit(core, problems[name], args.fit_steps))
    rows = []
    for (name, nt, what), v in res.items():
        med = [statistics.median(x[i] for x in v) for i in range(len(v[0]))]
        if what == "render":
            rows.append((name, nt, "render 20k @256x256 fwd", f"{med[0] * 1e3:.0f} ms", ""))
            rows.append((name, nt, "render 20k @256x256 fwd+bwd", f"{med[1] * 1e3:.0f} ms", f"{med[2] * 1e3:.0f} ms"))
        else:
            rows.append((name, nt, f"fit 20k @128x192 ({args.fit_steps} steps)", f"{1 / med[0]:.1f} steps/s",
                         f"{1 / med[1]:.1f} steps/s"))
    torch.set_num_threads(max(threads))
    for name, core in cores.items():
        G, T = core
        gs, cams = scenes[name]
        leaves = [x.detach().clone().requires_grad_() for x in (gs.means, gs.quats, gs.log_scales, gs.opacity_logits,
                                                                gs.sh)]
        peak = peak_cpu_bytes(lambda: G.render(T.Gaussians(*leaves), cams, backend="torch").rgb.sum().backward())
        rows.append((name, max(threads), "render 20k @256x256 fwd+bwd peak", f"{peak / 2**20:.0f} MiB", ""))
    if torch.cuda.is_available():
        core = cores["this"]
        gs_c, cams_c = bench_scene(core, device="cuda")
        for backend in ("torch", "gsplat") if core[0].rasterize_gsplat.gsplat_available() else ("torch",):
            torch.cuda.reset_peak_memory_stats()
            v = [time_render(core, gs_c, cams_c, backend) for _ in range(args.repeats + 1)][1:]
            rows.append((f"this {backend}", "cuda", "render 20k @256x256 fwd+bwd",
                         f"{statistics.median(x[1] for x in v) * 1e3:.1f} ms",
                         f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"))
        t = time_fit(core, fit_problem(core, "cuda"), args.fit_steps)
        rows.append(("this auto", "cuda", f"fit 20k @128x192 ({args.fit_steps} steps)", f"{1 / t[0]:.1f} steps/s", ""))
    print(f"(medians of {args.repeats}; load average at the end {os.getloadavg()[0]:.2f}; 'CPU' is process CPU "
          "time, all threads)")
    print(f"{'code':<10} {'threads':>7}  {'what':<36} {'wall':>14}  {'CPU':>14}")
    for r in rows:
        print(f"{r[0]:<10} {r[1]:>7}  {r[2]:<36} {r[3]:>14}  {r[4]:>14}")


if __name__ == "__main__":
    main()
