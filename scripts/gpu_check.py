#!/usr/bin/env python3
"""The GPU path measured in one run: every network built with random weights at its real size, nothing downloaded.

    python scripts/gpu_check.py --output gpu_check.json           # on a CUDA machine (~5-7 min on an H100/H200)
    python scripts/gpu_check.py --quick                            # first smoke run: real models, fewer steps
    python scripts/gpu_check.py --dry-run                          # what would run, on any machine; runs nothing
    python scripts/gpu_check.py --device cpu --quick               # CPU simulation: tiny models, same code paths
    python scripts/gpu_check.py --estimate-memory                  # parameter counts and memory estimates (meta)

Sections, in the order they run (each with a time budget; later ones are skipped when the run's --time-limit is
near; one section failing never stops the others):
  dust3r       DUSt3R ViT-L 512-dpt: one pair of 512x384 views (both directions, as `infer_pairs`), fp32 and bf16
  video        DynamiCrafter-512-interp (`build_video_model(OFFICIAL_512_INTERP)`): 16 x 320 x 512, 50 DDIM steps,
               fp16 and bf16, staged offload off and on
  align        global alignment of 8 views at 512x384 from ray-cast pair predictions (tests/synthetic_pairs.py;
               random-weight point maps would be meaningless)
  gaussians    3DGS fit, 1,000 steps on 32 frames of 320x512 with LPIPS, torch and gsplat backends, and the two
               backends' images of the same Gaussians compared
  train        a few steps of training stages 1 and 2 (reconx_core.training.run_steps)
  viewcrafter  ViewCrafter-512 with random weights, when the pack has a config for it
The dust3r -> video -> align order puts gsplat's first compile (started in the background at once) beside work
that does not need it.

One JSON goes to stdout at the end and, after every section and sub-run, to --output (so a timeout still leaves
results). Each section is {"status": "ok" | "skipped" | "failed", "reason": ..., figures...}. Times are seconds
(CUDA-synchronised), memory MiB (torch.cuda.max_memory_allocated after a reset, i.e. tensors, not the CUDA
context). Random weights make every picture noise: the figures are speed and memory, not quality.
Exit status 0 unless --strict and a section failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import importlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

SECTION_ORDER = ["dust3r", "video", "align", "gaussians", "train", "viewcrafter"]
PLANS = {"dust3r": "DUSt3R ViT-L 512-dpt, random weights: one pair of views (both directions), fp32 and bf16: "
                   "time and peak memory",
         "video": "DynamiCrafter-512-interp, random weights: 16 frames, DDIM with CFG, fp16 and bf16, staged "
                  "offload off and on: time, time per step, peak memory",
         "align": "global alignment of ray-cast pair predictions: time, peak memory, loss, error vs ground truth",
         "gaussians": "3DGS fit with LPIPS, torch and gsplat backends (gsplat built in the background): steps/s, "
                      "peak memory; both backends' images of the same Gaussians compared",
         "train": "a few steps of training stages 1 and 2 through reconx_core.training.run_steps",
         "viewcrafter": "ViewCrafter-512 with random weights: one interpolation run"}
# Time budget per section in seconds (full profile); a section stops starting sub-runs past its budget.
BUDGETS = {"dust3r": 60, "video": 170, "align": 60, "gaussians": 190, "train": 60, "viewcrafter": 70}

# Sizes. "full": the figures issue 13 asks for. "quick": the same real architectures and image sizes (so memory
# figures hold) with fewer steps, views and frames. "tiny": tiny architectures on tiny inputs, for the CPU
# simulation (`--device cpu`), which only proves the code paths.
PROFILES = {
    "full": {"dust3r": {"height": 384, "width": 512, "reps": 3},
             "video": {"frames": 16, "height": 320, "width": 512, "steps": 50},
             "align": {"views": 8, "height": 384, "width": 512, "niter": 300},
             "gaussians": {"frames": 32, "height": 320, "width": 512, "steps": 1000, "points": 100_000},
             "train": {"steps": 3}, "viewcrafter": {"steps": 50}},
    "quick": {"dust3r": {"height": 384, "width": 512, "reps": 1},
              "video": {"frames": 16, "height": 320, "width": 512, "steps": 3},
              "align": {"views": 4, "height": 384, "width": 512, "niter": 50},
              "gaussians": {"frames": 8, "height": 320, "width": 512, "steps": 100, "points": 50_000},
              "train": {"steps": 2}, "viewcrafter": {"steps": 3}},
    "tiny": {"dust3r": {"height": 64, "width": 80, "reps": 1},
             "video": {"frames": 4, "height": 64, "width": 64, "steps": 2},
             "align": {"views": 3, "height": 24, "width": 32, "niter": 20},
             "gaussians": {"frames": 4, "height": 48, "width": 64, "steps": 6, "points": 300},
             "train": {"steps": 1}, "viewcrafter": {"steps": 2}},
}
VIDEO_RUNS = [("bfloat16", False), ("bfloat16", True), ("float16", False), ("float16", True)]
TINY_DUST3R = {"enc_embed_dim": 96, "enc_depth": 2, "enc_num_heads": 4, "dec_embed_dim": 32, "dec_depth": 10,
               "dec_num_heads": 4, "head_type": "dpt", "dpt_feature_dim": 32, "dpt_last_dim": 16,
               "dpt_layer_dims": (16, 32, 48, 64), "image_size": 224}
MIB = 2 ** 20


class BudgetExceeded(Exception):
    """Raised from a progress callback to stop a loop that has used its time."""


# --------------------------------------------------------------------------------------------- the report
class Report:
    """The JSON document, written to `path` (atomically) whenever it changes."""

    def __init__(self, path, args, mode):
        self.path = Path(path) if path else None
        self.started = time.perf_counter()
        self.data = {"tool": "scripts/gpu_check.py", "format": 1,
                     "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                     "mode": mode, "args": vars(args), "profile": {}, "section_order": [], "budgets_s": {},
                     "machine": {}, "sections": {}, "finished": False}

    def save(self):
        self.data["elapsed_s"] = round(time.perf_counter() - self.started, 2)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def text(self):
        return json.dumps(self.data, indent=1, default=str)


class Context:
    """What every section needs: device, profile, deadlines, the report, the gsplat build in the background."""

    def __init__(self, args, report, profile_name):
        self.args, self.report = args, report
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.profile_name = profile_name
        self.profile = PROFILES[profile_name]
        self.real_models = profile_name != "tiny"
        self.deadline = time.perf_counter() + args.time_limit
        self.section_deadline = self.deadline
        self.gsplat_build = None          # GsplatBuild when started

    def remaining(self) -> float:
        return min(self.deadline, self.section_deadline) - time.perf_counter()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self):
        if self.cuda:
            self.sync()
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mib(self):
        return round(torch.cuda.max_memory_allocated(self.device) / MIB, 1) if self.cuda else None

    def allocated_mib(self):
        return round(torch.cuda.memory_allocated(self.device) / MIB, 1) if self.cuda else None

    def timed(self, fn):
        """(result, seconds) of fn() between two device synchronisations."""
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return out, round(time.perf_counter() - t0, 4)


def free_memory(ctx):
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


def error_record(exc: BaseException) -> dict:
    """A failed (sub-)section: the error in one line and the end of its traceback."""
    oom = isinstance(exc, torch.cuda.OutOfMemoryError)
    first = str(exc).splitlines()[0][:300] if str(exc) else ""
    reason = ("out of GPU memory: " if oom else "") + f"{type(exc).__name__}: {first}"
    return {"status": "failed", "reason": reason, "traceback_tail": traceback.format_exc()[-1800:]}


def finite(t) -> bool:
    return bool(torch.isfinite(t).all())


# ------------------------------------------------------------------------------------------ machine facts
def _run_quiet(cmd, timeout=15):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except Exception as exc:  # tool missing or hung: say so, never fail the report
        return f"unavailable ({type(exc).__name__})"


def package_versions() -> dict:
    from importlib import metadata
    out = {}
    for name in ("torch", "torchvision", "numpy", "diffusers", "lpips", "kornia", "roma", "plyfile", "einops",
                 "safetensors", "gsplat", "accelerate", "ninja", "jaxtyping", "rich"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_facts(cuda: bool) -> dict:
    facts = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
             "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
             "packages": package_versions()}
    try:
        import gsplat
        facts["gsplat"] = {"version": getattr(gsplat, "__version__", "?"), "importable": True}
    except Exception as exc:
        facts["gsplat"] = {"version": None, "importable": False, "why": f"{type(exc).__name__}: {exc}"[:300]}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, gpu_memory_mib=round(props.total_memory / MIB), capability=f"{props.major}."
                     f"{props.minor}", multiprocessors=props.multi_processor_count,
                     cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported(),
                     tf32={"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32})
        facts["driver"] = _run_quiet(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        nvcc = _run_quiet(["nvcc", "--version"]).splitlines()
        facts["nvcc"] = nvcc[-1] if nvcc else None
        facts["CUDA_HOME"] = os.environ.get("CUDA_HOME")
    return facts


# ------------------------------------------------------------------------------- gsplat's first compile
class GsplatBuild:
    """gsplat's JIT build (`from gsplat.cuda._backend import _C`) in a child process, started at once so that its
    minutes overlap the sections that do not need it. The main process must not import gsplat's backend while it
    runs (gsplat deletes a half-built folder it finds)."""

    def __init__(self, log_dir: Path):
        self.log_path = log_dir / "gsplat_build.log"
        # Set here, in this process, so that this process's later load of the extension computes the same ninja
        # flags (a different arch list would rebuild everything).
        os.environ.setdefault("MAX_JOBS", str(max(1, (os.cpu_count() or 4) - 4)))
        if "TORCH_CUDA_ARCH_LIST" not in os.environ:
            major, minor = torch.cuda.get_device_capability(0)
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"   # one architecture: a fraction of the work
        env = dict(os.environ)
        self.env_used = {k: env.get(k) for k in ("MAX_JOBS", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME",
                                                 "TORCH_EXTENSIONS_DIR")}
        code = ("import json, time; t = time.time()\n"
                "from gsplat.cuda._backend import _C\n"
                "print('GSPLAT_BUILD_RESULT ' + json.dumps({'ok': _C is not None, 'seconds': time.time() - t}))\n")
        self.started = time.perf_counter()
        self.log = open(self.log_path, "w")
        # its own process group, so that stop() also ends the nvcc/ninja processes it starts
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, cwd=str(REPO), start_new_session=True)
        self.result = None

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> dict:
        try:
            self.proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return self.status()
        return self.status()

    def status(self) -> dict:
        out = {"running": self.running(), "env": self.env_used,
               "elapsed_s": round(time.perf_counter() - self.started, 1)}
        if not self.running():
            self.log.flush()
            text = self.log_path.read_text(errors="replace")
            line = [ln for ln in text.splitlines() if ln.startswith("GSPLAT_BUILD_RESULT ")]
            out["returncode"] = self.proc.returncode
            out["ok"] = bool(line) and json.loads(line[-1].split(" ", 1)[1])["ok"]
            if line:
                out["build_s"] = round(json.loads(line[-1].split(" ", 1)[1])["seconds"], 1)
            if not out["ok"]:
                out["log_tail"] = text[-2500:]
        return out

    def stop(self):
        """End the build (its whole process group) if it is still running."""
        if self.running():
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.proc.pid, sig)
                    self.proc.wait(timeout=10)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue


# ------------------------------------------------------------------------------------------- dust3r
def section_dust3r(ctx: Context) -> dict:
    from reconx_core.dust3r import Dust3R, Dust3RConfig, infer_pairs, load_dust3r

    P = ctx.profile["dust3r"]
    H, W = P["height"], P["width"]
    cfg = Dust3RConfig() if ctx.real_models else Dust3RConfig(**TINY_DUST3R)
    overrides = {} if ctx.real_models else {"enc_num_heads": 4, "dec_num_heads": 4, "image_size": 224}
    torch.manual_seed(0)
    with torch.device(ctx.device):            # default (random) init, run on the device itself
        base = Dust3R(cfg)
    state = base.state_dict()
    out = {"architecture": "ViT-L 512-dpt (Dust3RConfig defaults)" if ctx.real_models else "tiny dpt",
           "parameters": sum(p.numel() for p in base.parameters()), "views": f"{W}x{H}",
           "what": "infer_pairs on 2 views: both directed edges, encoder + decoders + heads", "runs": {}}
    gen = torch.Generator().manual_seed(0)
    views = torch.rand(2, 3, H, W, generator=gen).to(ctx.device)
    for dtype_name in ("float32", "bfloat16"):
        if ctx.remaining() < 5:
            out["runs"][dtype_name] = {"status": "skipped", "reason": "time budget used"}
            continue
        try:
            before = ctx.allocated_mib()
            model = load_dust3r(state, device=ctx.device, dtype=None if dtype_name == "float32" else
                                getattr(torch, dtype_name), **overrides)
            weights = None if before is None else round(ctx.allocated_mib() - before, 1)
            with torch.inference_mode():
                infer_pairs(model, views, graph="complete", batch_size=2)          # warm-up (kernels, caches)
                ctx.reset_peak()
                times = []
                for _ in range(P["reps"]):
                    pairs, seconds = ctx.timed(lambda: infer_pairs(model, views, graph="complete", batch_size=2))
                    times.append(seconds)
            times.sort()
            out["runs"][dtype_name] = {"status": "ok", "pair_inference_s": times[len(times) // 2],
                                       "all_s": times, "peak_mib": ctx.peak_mib(), "weights_mib": weights,
                                       "edges": int(pairs.edges.shape[0]),
                                       "outputs_finite": finite(pairs.pts_i) and finite(pairs.conf_i)}
            del model, pairs
        except Exception as exc:
            out["runs"][dtype_name] = error_record(exc)
        free_memory(ctx)
        ctx.report.save()
    del base, state
    return out


# -------------------------------------------------------------------------------------------- video
def _time_interpolation(ctx, model, refs, steps, frames, label, **extra):
    """One `interpolate` run: total time, time per DDIM step (2 UNet passes with CFG), peak memory."""
    from reconx_core.video import interpolate

    stamps = []

    def progress(step, total):
        ctx.sync()
        stamps.append(time.perf_counter())
        if ctx.remaining() < 0:
            raise BudgetExceeded(f"{label}: stopped after {step}/{total} steps by the time budget")

    ctx.reset_peak()
    resident = ctx.allocated_mib()
    ctx.sync()
    t0 = time.perf_counter()
    frames_out = interpolate(model, refs, steps=steps, frames=frames, seed=0, callback=progress, **extra)
    ctx.sync()
    total = time.perf_counter() - t0
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
    return {"status": "ok", "total_s": round(total, 3),
            "ddim_step_s": None if per_step is None else round(per_step, 4),
            "outside_ddim_s": None if per_step is None else round(total - per_step * steps, 3),
            "peak_mib": ctx.peak_mib(), "resident_before_mib": resident,
            "frames_out": list(frames_out.shape), "finite": finite(frames_out)}


def section_video(ctx: Context) -> dict:
    from reconx_core.video import OFFICIAL_512_INTERP, build_video_model, tiny_config

    P = ctx.profile["video"]
    config = OFFICIAL_512_INTERP if ctx.real_models else tiny_config()
    # On CUDA the random init runs on the GPU (seconds instead of a minute on the CPU); fp32 first, cast per run.
    model = build_video_model(config, seed=0, device=ctx.device if ctx.cuda else "cpu")
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_children()
              if isinstance(m, torch.nn.Module)}
    gen = torch.Generator().manual_seed(0)
    refs = torch.rand(2, 3, P["height"], P["width"], generator=gen).to(ctx.device)
    out = {"model": "DynamiCrafter-512-interp (OFFICIAL_512_INTERP)" if ctx.real_models else "tiny_config()",
           "parameters": params, "frames": P["frames"], "size": f"{P['width']}x{P['height']}",
           "ddim_steps": P["steps"], "cfg": 7.5, "unet_passes_per_step": 2, "runs": {}}
    previous = None
    for dtype_name, offload in VIDEO_RUNS:
        label = f"{dtype_name}_offload_{'on' if offload else 'off'}"
        needed = 10 if previous is None else previous * 1.1
        if ctx.remaining() < needed:
            out["runs"][label] = {"status": "skipped", "reason": f"time budget: {ctx.remaining():.0f} s left, "
                                                                 f"a run takes ~{needed:.0f} s"}
            continue
        try:
            model.place(ctx.device, dtype=getattr(torch, dtype_name), offload=offload, offload_device="cpu")
            free_memory(ctx)
            run = _time_interpolation(ctx, model, refs, P["steps"], P["frames"], label)
            previous = run["total_s"]
            out["runs"][label] = run
        except BudgetExceeded as exc:
            out["runs"][label] = {"status": "skipped", "reason": str(exc)}
        except Exception as exc:
            out["runs"][label] = error_record(exc)
        free_memory(ctx)
        ctx.report.save()
    del model
    return out


# -------------------------------------------------------------------------------------------- align
def synthetic_pairs_on_device(n_views, height, width, device, seed=0, noise=0.005):
    """The ray-cast scene of tests/synthetic_pairs.py as DUSt3R-like pair predictions, built as its
    make_synthetic_pairs does (every ordered pair, a random scale in [0.5, 2] per edge, every coordinate times
    1 + 0.005 N(0, 1), confidences 1 + exp(N(1.5, 0.5)) and 1 + exp(N(1.2, 0.5))) but in float32 on `device`:
    its float64 NumPy noise takes ~30 s on a 2-core CPU at 8 views of 512x384. Depth is ray-cast by the same
    function. Returns (PairPredictions, ground truth dict as make_synthetic_pairs')."""
    from reconx_core.types import PairPredictions
    from tests.synthetic_pairs import arc_cameras, render_depth, scene_focal

    cam_to_world = arc_cameras(n_views)
    focal = scene_focal(width)
    depth = render_depth(cam_to_world, focal, height, width)
    gen = torch.Generator(device=device).manual_seed(seed)
    c2w = cam_to_world.to(device)
    d = depth.to(device)
    v, u = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float64),
                          torch.arange(width, device=device, dtype=torch.float64), indexing="ij")
    cam_pts = torch.stack(((u - width / 2) * d / focal, (v - height / 2) * d / focal, d), dim=-1)
    world = cam_pts @ c2w[:, None, :3, :3].transpose(-1, -2) + c2w[:, None, None, :3, 3]
    edges = [(i, j) for i in range(n_views) for j in range(i)]
    edges += [(j, i) for i, j in edges]
    scales = torch.rand(len(edges), generator=gen, device=device, dtype=torch.float64) * 1.5 + 0.5
    E, shape = len(edges), (height, width, 3)
    pts_i = torch.empty((E,) + shape, device=device)
    pts_j = torch.empty((E,) + shape, device=device)
    inv = torch.linalg.inv(c2w)
    for e, (i, j) in enumerate(edges):
        j_in_i = world[j] @ inv[i, :3, :3].T + inv[i, :3, 3]
        for out, pts in ((pts_i, cam_pts[i]), (pts_j, j_in_i)):
            jitter = 1 + noise * torch.randn(shape, generator=gen, device=device, dtype=torch.float64)
            out[e] = (pts * scales[e] * jitter).float()
    conf_i = 1 + torch.exp(1.5 + 0.5 * torch.randn((E, height, width), generator=gen, device=device))
    conf_j = 1 + torch.exp(1.2 + 0.5 * torch.randn((E, height, width), generator=gen, device=device))
    pairs = PairPredictions(torch.tensor(edges, device=device), pts_i, pts_j, conf_i, conf_j)
    gt = {"cam_to_world": cam_to_world.float(), "focal": torch.full((n_views,), focal, dtype=torch.float32),
          "depth": depth.float(), "pair_scale": scales.float().cpu()}
    return pairs, gt


def section_align(ctx: Context) -> dict:
    from reconx_core.align import align_views
    from tests.synthetic_pairs import errors_vs_gt

    P = ctx.profile["align"]
    t0 = time.perf_counter()
    pairs, gt = synthetic_pairs_on_device(P["views"], P["height"], P["width"], ctx.device)
    ctx.sync()
    make_s = time.perf_counter() - t0
    ctx.reset_peak()
    stamps = []
    begin = time.perf_counter()

    def progress(step, total):
        stamps.append((step, time.perf_counter()))
        if ctx.remaining() < 0:
            raise BudgetExceeded(step)

    try:
        scene, seconds = ctx.timed(lambda: align_views(pairs, niter=P["niter"], callback=progress))
    except BudgetExceeded as exc:
        ctx.sync()
        (first_step, first_t), (last_step, last_t) = stamps[0], stamps[-1]
        return {"status": "ok", "reason": f"stopped by the time budget after {exc.args[0]} of {P['niter']} steps",
                "views": P["views"], "size": f"{P['width']}x{P['height']}", "niter": P["niter"],
                "make_pairs_s": round(make_s, 2), "steps_done": last_step,
                "init_and_first_step_s": round(first_t - begin, 3),
                "steps_per_s": round((last_step - first_step) / (last_t - first_t), 2) if last_t > first_t else None,
                "peak_mib": ctx.peak_mib()}
    errors = errors_vs_gt(scene.cameras.cam_to_world.cpu(), scene.cameras.focals.cpu(), scene.depths.cpu(),
                          scene.pts3d.cpu(), gt["cam_to_world"], gt["focal"], gt["depth"])
    timings = scene.info.get("timings", {})
    return {"views": P["views"], "edges": int(pairs.edges.shape[0]), "size": f"{P['width']}x{P['height']}",
            "niter": P["niter"], "input": "ray-cast scene of tests/synthetic_pairs.py (0.5 % noise, random pair "
            "scales), pairs built on the device", "make_pairs_s": round(make_s, 2), "align_s": seconds,
            "init_s": round(timings.get("init_s", float("nan")), 3),
            "optimize_s": round(timings.get("optimize_s", float("nan")), 3), "peak_mib": ctx.peak_mib(),
            "loss": scene.info.get("loss"), "init_loss": scene.info.get("init_loss"),
            "vs_ground_truth": {"cam_rot_err_deg_max": max(errors["cam_rot_err_deg"]),
                                "cam_center_rmse": errors["cam_center_rmse"],
                                "depth_abs_rel_after_scale": errors["depth_abs_rel_after_scale"],
                                "focal_rel_err_max": max(errors["focal_rel_err"])}}


# ---------------------------------------------------------------------------------------- gaussians
@contextlib.contextmanager
def cpu_emulated_gsplat():
    """CPU simulation only: route backend="gsplat" through our adapter into tests/gsplat_emulation.py."""
    from reconx_core.gaussians import rasterize_gsplat
    from tests.gsplat_emulation import emulated_gsplat

    render_module = importlib.import_module("reconx_core.gaussians.render")
    saved_state, saved_resolve = dict(rasterize_gsplat._state), render_module.resolve_backend
    with emulated_gsplat() as module:
        rasterize_gsplat._state.update(checked=True, module=module, failed=False, worked=False)
        render_module.resolve_backend = (lambda backend, device: "gsplat" if backend == "gsplat"
                                         else saved_resolve(backend, device))
        try:
            yield
        finally:
            render_module.resolve_backend = saved_resolve
            rasterize_gsplat._state.clear()
            rasterize_gsplat._state.update(saved_state)


def _lpips_setting(ctx):
    """(lpips_random, description): the real alex backbone when its file is found, else a random backbone."""
    from reconx_core.errors import ResourceError
    from reconx_core.gaussians import load_lpips
    from reconx_core.gaussians.losses import lpips_search_dirs

    dirs = [str(Path(ctx.args.models_dir) / "reconx")]
    try:
        load_lpips("alex", dirs, "cpu")
        return False, dirs, "alex with its torchvision backbone (found on disk)"
    except ResourceError as exc:
        where = ", ".join(str(d) for d in lpips_search_dirs(dirs))
        return True, dirs, (f"RANDOM alex backbone: alexnet-owt-7be5be79.pth is in none of {where} "
                            f"({type(exc).__name__}); same cost, not a perceptual loss")


def _compare_backends(ctx, gaussians, cameras, label):
    """Render the same Gaussians with both backends (no grad) and compare the images."""
    from reconx_core.gaussians import rasterize_gsplat, render

    with torch.no_grad():
        a = [render(gaussians, cameras[i:i + 8], backend="gsplat") for i in range(0, len(cameras), 8)]
        if rasterize_gsplat._state["failed"]:
            # render() falls back to our rasterizer when gsplat fails at first use: that is no comparison
            raise RuntimeError("gsplat failed at its first use and render() fell back to the torch rasterizer")
        b = [render(gaussians, cameras[i:i + 8], backend="torch") for i in range(0, len(cameras), 8)]
    rgb_a, rgb_b = torch.cat([o.rgb for o in a]), torch.cat([o.rgb for o in b])
    al_a, al_b = torch.cat([o.alpha for o in a]), torch.cat([o.alpha for o in b])
    d_a, d_b = torch.cat([o.depth for o in a]) * al_a, torch.cat([o.depth for o in b]) * al_b
    diff = (rgb_a - rgb_b).abs()
    mse = float((diff ** 2).mean())
    opac = torch.sigmoid(gaussians.opacity_logits)
    return {"gaussians": len(gaussians), "views": len(cameras), "rgb_max_abs_diff": float(diff.max()),
            "rgb_mean_abs_diff": float(diff.mean()),
            "psnr_gsplat_vs_torch_db": float("inf") if mse == 0 else round(-10 * math.log10(mse), 2),
            "alpha_max_abs_diff": float((al_a - al_b).abs().max()),
            "accumulated_depth_max_abs_diff": float((d_a - d_b).abs().max()),
            "opacity_above_0.99_fraction": round(float((opac > 0.99).float().mean()), 5),
            "note": f"{label}. Both clamp alpha at 0.999 (gsplat 1.5.3's rule). Expected difference: Gaussians at "
                    "equal depth to float rounding (planar surfaces) may composite in either order (~1e-3 locally)"}


def _fit(ctx, images, cameras, init, steps, backend, lpips_random, lpips_dirs, budget_s):
    """One fit, stopped by its time budget if need be. Returns (record, fitted Gaussians or None)."""
    from reconx_core.gaussians import fit_gaussians, rasterize_gsplat

    synced = []                      # (step, time) after a device synchronisation: step 1, every 50th, the last
    stop_at = time.perf_counter() + budget_s
    done = [0]

    def progress(step, total):
        done[0] = step
        if step == 1 or step % 50 == 0 or step == total:
            ctx.sync()
            synced.append((step, time.perf_counter()))
        if time.perf_counter() > stop_at or ctx.remaining() < 0:
            ctx.sync()
            synced.append((step, time.perf_counter()))
            raise BudgetExceeded(step)

    ctx.reset_peak()
    ctx.sync()
    t0 = time.perf_counter()
    fitted, stopped = None, None
    try:
        fitted = fit_gaussians(images, cameras, init=init, steps=steps, weights=(0.8, 0.2, 0.5), callback=progress,
                               backend=backend, lpips_random=lpips_random, lpips_dirs=lpips_dirs, sh_degree=3, seed=0)
    except BudgetExceeded as exc:
        stopped = int(exc.args[0])
    ctx.sync()
    wall = time.perf_counter() - t0
    # steady-state rate: from the end of step 1 (LPIPS load and first-call set-up before it) to the last stamp
    (s0, t_first), (s1, t_last) = (synced[0], synced[-1]) if synced else ((0, t0), (0, t0))
    rate = (s1 - s0) / (t_last - t_first) if s1 > s0 and t_last > t_first else None
    rec = {"status": "ok", "steps_requested": steps, "steps_done": done[0], "wall_s": round(wall, 2),
           "first_step_s": round(t_first - t0, 3) if synced else None,
           "steps_per_s": None if rate is None else round(rate, 2),
           "est_1000_steps_s": None if rate is None else round(1000 / rate, 1), "peak_mib": ctx.peak_mib(),
           "gaussians": len(init)}
    if stopped is not None:
        rec["reason"] = f"stopped by the time budget after {stopped} of {steps} steps (the rate is measured)"
    if backend == "gsplat":
        rec["gsplat_used"] = bool(rasterize_gsplat.has_worked()) and not rasterize_gsplat._state["failed"]
        if not rec["gsplat_used"]:
            rec["status"] = "failed"
            rec["reason"] = "render() fell back to the torch rasterizer: gsplat failed at first use (see the log)"
    return rec, fitted


def section_gaussians(ctx: Context) -> dict:
    from reconx_core.gaussians import init_from_points
    from tests.synthetic_textured import make_scene

    P = ctx.profile["gaussians"]
    n = P["frames"]
    t0 = time.perf_counter()
    scene = make_scene([-0.5 + k / max(1, n - 1) for k in range(n)], P["width"], P["height"])
    make_s = time.perf_counter() - t0
    images, cameras = scene.images.to(ctx.device), scene.cameras.to(ctx.device)
    ends = [0, n - 1]
    pts = scene.pts3d[ends].reshape(-1, 3)
    cols = scene.images[ends].permute(0, 2, 3, 1).reshape(-1, 3)
    init = init_from_points(pts.to(ctx.device), cols.to(ctx.device), sh_degree=3, max_points=P["points"], seed=0)
    lpips_random, lpips_dirs, lpips_note = _lpips_setting(ctx)
    out = {"frames": n, "size": f"{P['width']}x{P['height']}", "steps": P["steps"], "gaussians_init": len(init),
           "input": "ray-cast textured scene of tests/synthetic_textured.py, init from the end frames' points",
           "make_scene_cpu_s": round(make_s, 2), "lpips": lpips_note, "lpips_random_backbone": lpips_random,
           "fits": {}, "parity": {}}
    fitted = {}
    # Seconds kept for the gsplat fit and the comparison while the torch fit and the build wait run.
    keep = 70.0 if ctx.real_models else 5.0

    # 1. our torch rasterizer (needs nothing built)
    try:
        budget = max(5.0, (ctx.remaining() - keep) * 0.6)
        rec, g = _fit(ctx, images, cameras, init, P["steps"], "torch", lpips_random, lpips_dirs, budget)
        out["fits"]["torch"] = rec
        if g is not None:
            fitted["torch"] = g
    except Exception as exc:
        out["fits"]["torch"] = error_record(exc)
    free_memory(ctx)
    ctx.report.save()

    # 2. gsplat: on CUDA the real one once its background build is done; in the CPU simulation the emulation
    gsplat_ready, gsplat_why = False, None
    emulate = contextlib.nullcontext()
    if ctx.cuda:
        if ctx.gsplat_build is None:
            gsplat_why = ctx.report.data["machine"].get("gsplat", {}).get("why", "gsplat is not installed")
        else:
            status = ctx.gsplat_build.wait(timeout=max(0.0, ctx.remaining() - keep))
            out["gsplat_build"] = status
            gsplat_ready = not status["running"] and status.get("ok", False)
            if not gsplat_ready:
                gsplat_why = (f"gsplat's first build still running after {status['elapsed_s']} s" if status["running"]
                              else "gsplat's build failed (gsplat_build.log_tail)")
    else:
        try:
            import gsplat  # noqa: F401
            emulate = cpu_emulated_gsplat()
            gsplat_ready = True
            out["gsplat_note"] = "CPU simulation: gsplat.rasterization emulated (tests/gsplat_emulation.py)"
        except Exception as exc:
            gsplat_why = f"gsplat not importable ({type(exc).__name__}); pip install gsplat==1.5.3"

    with emulate:
        if not gsplat_ready:
            out["fits"]["gsplat"] = {"status": "skipped", "reason": gsplat_why}
            out["parity"] = {"status": "skipped", "reason": gsplat_why}
        else:
            try:
                budget = max(5.0, ctx.remaining() - 25.0)
                rec, g = _fit(ctx, images, cameras, init, P["steps"], "gsplat", lpips_random, lpips_dirs, budget)
                out["fits"]["gsplat"] = rec
                if g is not None:
                    fitted["gsplat"] = g
            except Exception as exc:
                out["fits"]["gsplat"] = error_record(exc)
            free_memory(ctx)
            ctx.report.save()
            # the same Gaussians through both backends: the initial ones, the fitted ones, and the fitted ones with
            # opacities capped at 0.98 (below both clamps, so what remains is the adapter and rounding)
            cases = [("init", init)]
            g = fitted.get("torch") or fitted.get("gsplat")
            if g is not None:
                cases.append(("fitted", g))
                capped = type(g)(g.means, g.quats, g.log_scales, g.opacity_logits.clamp(max=math.log(0.98 / 0.02)),
                                 g.sh)
                cases.append(("fitted, opacity capped at 0.98", capped))
            for label, gaussians in cases:
                try:
                    out["parity"][label] = _compare_backends(ctx, gaussians, cameras, label)
                except Exception as exc:
                    out["parity"][label] = error_record(exc)
                ctx.report.save()
    failed = {b: r.get("reason") for b, r in out["fits"].items() if r.get("status") == "failed"}
    if failed:
        out["status"] = "failed"
        out["reason"] = "a fit failed: " + "; ".join(f"{b}: {why}" for b, why in failed.items())
    return out


# ------------------------------------------------------------------------------------------- train
def section_train(ctx: Context) -> dict:
    """A few optimizer steps of training stages 1 and 2 (reconx_core.training.run_steps, in this process, on random
    in-memory clips): configs/train/gpu_check.yaml on a GPU (the real architecture, 32 x 320 x 512, bf16, gradient
    checkpointing), configs/train/tiny.yaml in the CPU simulation."""
    try:
        from reconx_core.training import load_config, run_steps
    except ImportError as exc:
        return {"status": "skipped", "reason": f"not in this version: reconx_core.training ({exc})"}
    name = "gpu_check.yaml" if ctx.device.type == "cuda" else "tiny.yaml"
    config = load_config(REPO / "configs" / "train" / name)
    out = {"entry": "reconx_core.training.run_steps", "config": f"configs/train/{name}", "stages": {}}
    failed = []
    for stage in (1, 2):
        key = f"stage_{stage}"
        if ctx.remaining() < 5:
            out["stages"][key] = {"status": "skipped", "reason": "time budget used"}
            continue
        try:
            ctx.reset_peak()
            t0 = time.perf_counter()
            result = run_steps(config, steps=ctx.profile["train"]["steps"], device=str(ctx.device), stage=stage)
            ctx.sync()
            seconds = result["step_seconds"]
            out["stages"][key] = {"status": "ok", "wall_s": round(time.perf_counter() - t0, 2),
                                  "steps": result["steps"], "losses": [round(float(x), 5) for x in result["losses"]],
                                  "first_step_s": round(seconds[0], 3) if seconds else None,
                                  "later_step_s": round(sum(seconds[1:]) / max(1, len(seconds) - 1), 3)
                                  if len(seconds) > 1 else None,
                                  "peak_mib": ctx.peak_mib(), "parameters": result["parameters"]}
        except Exception as exc:
            out["stages"][key] = error_record(exc)
            failed.append(key)
        free_memory(ctx)
        ctx.report.save()
    if failed:
        out.update(status="failed", reason=f"failed: {', '.join(failed)}")
    return out


# ------------------------------------------------------------------------------------------ viewcrafter
VIEWCRAFTER_MODULES = ("reconx_core.video", "reconx_core.video.viewcrafter", "reconx_core.viewcrafter",
                       "reconx_core.video.configs", "reconx_core.video.registry")


def _import_if_present(module_name):
    """The module, or None when it (not something it imports) does not exist."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None
        raise


def find_viewcrafter(tiny: bool = False):
    """How this version of the pack defines ViewCrafter-512, looked up by name.

    1. A backbone registry (reconx_core.video.backbones: `backbone_names`, `get_backbone`, `configure_model`): a
       registered name with 'viewcrafter' and '512'; the network is DynamiCrafter-512-interp's architecture.
    2. Else a config dict accepted by build_video_model, named with 'viewcrafter' and '512' (e.g. VIEWCRAFTER_512),
       or such a key in a dict registry, in one of VIEWCRAFTER_MODULES. tiny=True asks for a 'tiny' one (the CPU
       simulation; with a backbone registry the tiny DynamiCrafter config is configured as the backbone instead).
    Returns (where, config, backbone or None), or (None, None, None) when the pack has none.
    """
    backbones = _import_if_present("reconx_core.video.backbones")
    if backbones is not None and hasattr(backbones, "backbone_names"):
        names = [n for n in backbones.backbone_names() if "viewcrafter" in n.lower() and "512" in n]
        if names:
            from reconx_core.video import OFFICIAL_512_INTERP, tiny_config

            return (f"reconx_core.video.backbones: {names[0]!r}", tiny_config() if tiny else OFFICIAL_512_INTERP,
                    backbones.get_backbone(names[0]))
    want = (lambda name: "viewcrafter" in name.lower() and ("tiny" in name.lower() if tiny else "512" in name))
    for module_name in VIEWCRAFTER_MODULES:
        module = _import_if_present(module_name)
        if module is None:
            continue
        for attr, value in vars(module).items():
            if callable(value) and want(attr) and attr.lower().endswith("config"):
                value = value()
            if isinstance(value, dict):
                if want(attr) and "unet" in value:
                    return f"{module_name}.{attr}", value, None
                for key, sub in value.items():
                    if isinstance(key, str) and want(key) and isinstance(sub, dict) and "unet" in sub:
                        return f"{module_name}.{attr}[{key!r}]", sub, None
    return None, None, None


def section_viewcrafter(ctx: Context) -> dict:
    import inspect

    from reconx_core.video import build_video_model, interpolate

    where, config, backbone = find_viewcrafter(tiny=not ctx.real_models)
    if config is None:
        kind = "ViewCrafter-512" if ctx.real_models else "tiny ViewCrafter config (CPU simulation)"
        return {"status": "skipped", "reason": f"not in this version: no {kind} in reconx_core.video.backbones "
                                               f"or {', '.join(VIEWCRAFTER_MODULES)}"}
    P = ctx.profile["viewcrafter"]
    model = build_video_model(config, seed=0, device=ctx.device if ctx.cuda else "cpu")
    if backbone is not None:
        from reconx_core.video.backbones import configure_model

        # the tiny model keeps its own size (a stored config with a resolution wins), the real one takes the backbone's
        configure_model(model, backbone, stored_config=None if ctx.real_models else model.config)
    height, width = model.config.get("resolution", [320, 512])
    frames = int(model.config.get("frames", 25))
    model.place(ctx.device, dtype=torch.bfloat16, offload=False)
    gen = torch.Generator().manual_seed(0)
    refs = torch.rand(2, 3, height, width, generator=gen).to(ctx.device)
    # the backbone's own prompt when the tokenizer has it without the CLIP vocabulary file (a download), else an
    # empty one: the text tower costs the same either way
    try:
        model.tokenizer([getattr(backbone, "prompt", "") or ""])          # what needs the vocabulary
        extra, prompt_note = {}, "the backbone's default"
    except Exception as exc:
        extra, prompt_note = {"prompt": ""}, f"empty (the default needs the CLIP vocabulary: {type(exc).__name__})"
    if "renders" in inspect.signature(interpolate).parameters:
        # random point-cloud renders along the path (S = frames for two views): the condition ViewCrafter takes
        extra["renders"] = torch.rand(frames, 3, height, width, generator=gen).to(ctx.device)
    out = {"found": where, "frames": frames, "size": f"{width}x{height}", "ddim_steps": P["steps"],
           "parameters": sum(p.numel() for p in model.parameters()), "renders_given": "renders" in extra,
           "prompt": prompt_note, "runs": {}}
    try:
        out["runs"]["bfloat16_offload_off"] = _time_interpolation(ctx, model, refs, P["steps"], frames, "viewcrafter",
                                                                  **extra)
    except BudgetExceeded as exc:
        out["runs"]["bfloat16_offload_off"] = {"status": "skipped", "reason": str(exc)}
    del model
    return out


SECTIONS = {"dust3r": section_dust3r, "video": section_video, "align": section_align,
            "gaussians": section_gaussians, "train": section_train, "viewcrafter": section_viewcrafter}


# ------------------------------------------------------------------------------------- memory estimates
class _LiveBytes:
    """A dispatch mode that counts the bytes of live tensors created while it is active (meta tensors: no memory
    is used). Storage shared by views is counted once; a storage is freed when its last tensor dies."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                counter.track(out)
                return out

        self.mode = Mode()
        self.live, self.current, self.peak = {}, 0, 0

    def track(self, out):
        import weakref

        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            entry = self.live.get(key)
            if entry is None:
                entry = self.live[key] = [storage.nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self._release, key)

    def _release(self, key):
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[key]

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@contextlib.contextmanager
def _flash_attention_shapes():
    """Attention as the fused GPU kernels allocate it (output only, no L x L matrix) while tracing on meta."""
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, *a, **kw: q.new_empty(q.shape[:-1] + (v.shape[-1],))
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def _peak_activation_bytes(fn) -> int:
    with torch.no_grad(), _flash_attention_shapes(), _LiveBytes() as counter:
        result = fn()
        del result
    return counter.peak


def _manifest_check(fixtures: Path, video_model, dust3r_params: int) -> dict:
    """Our meta models' parameter counts against the official key/shape manifests (shared/fixtures)."""
    from reconx_core.video.checkpoint import is_unused_key

    out = {}
    dm = fixtures / "dust3r_manifest_DUSt3R_ViTLarge_BaseDecoder_512_dpt.json"
    if dm.is_file():
        official = json.loads(dm.read_text())["total_params_parameters"]
        out["dust3r_512_dpt"] = {"official_parameters": official, "ours": dust3r_params, "equal": official == dust3r_params}
    vm = fixtures / "dynamicrafter512_interp_manifest.json"
    if vm.is_file():
        state = json.loads(vm.read_text())["state_dict"]
        prefixes = {"model.diffusion_model.": "unet", "first_stage_model.": "vae", "cond_stage_model.": "text_encoder",
                    "embedder.": "image_encoder", "image_proj_model.": "image_proj"}
        for prefix, name in prefixes.items():
            used = sum(math.prod(shape) for key, (shape, _) in state.items()
                       if key.startswith(prefix) and not is_unused_key(key))
            unused = sum(math.prod(shape) for key, (shape, _) in state.items()
                         if key.startswith(prefix) and is_unused_key(key))
            ours = sum(p.numel() for n, p in getattr(video_model, name).named_parameters() if "struct" not in n)
            out[name] = {"official_in_checkpoint": used + unused, "official_read": used, "ours": ours,
                         "equal": ours == used}
    return out


def estimate_memory(fixtures_dir=None) -> dict:
    """Weights and peak activations of every stage, traced on the meta device (no memory, no GPU), in the
    sizes the pipeline runs: DUSt3R on one 512x384 pair, DynamiCrafter at 16 x 320 x 512. ESTIMATES: the CUDA
    context (~0.5 GiB), allocator rounding and workspaces come on top."""
    from reconx_core.dust3r import Dust3R, Dust3RConfig
    from reconx_core.video import OFFICIAL_512_INTERP, build_video_model

    with torch.device("meta"):
        dust3r = Dust3R(Dust3RConfig()).eval()
    # RoPE reads the largest patch position with .item(), which meta tensors cannot answer: tables of the same
    # shape and dtype (B, 1, N, head_dim) stand in for the cos/sin ones
    dust3r.rope.tables = lambda pos, head_dim, dtype: tuple(
        torch.empty(pos.shape[0], 1, pos.shape[1], head_dim, device="meta", dtype=dtype) for _ in range(2))
    video = build_video_model(OFFICIAL_512_INTERP, device="meta")
    dust3r_params = sum(p.numel() for p in dust3r.parameters())
    result = {"note": "estimates from meta-device models: weights = parameters x bytes; activations = peak bytes of "
                      "live tensors in one forward traced on the meta device with fused attention (no L x L "
                      "matrices). Add the CUDA context (~0.5 GiB) and ~15 % allocator slack.",
              "parameters": {"dust3r_512_dpt": dust3r_params,
                             **{name: sum(p.numel() for n, p in getattr(video, name).named_parameters()
                                          if "struct" not in n)
                                for name in ("unet", "vae", "text_encoder", "image_encoder", "image_proj")},
                             "unet_structure_branch": sum(p.numel() for n, p in video.unet.named_parameters()
                                                          if "struct" in n)}}
    fixtures = [Path(fixtures_dir)] if fixtures_dir else [REPO / "shared" / "fixtures", REPO.parent / "shared" /
                                                            "fixtures"]
    found = next((f for f in fixtures if f.is_dir()), None)
    result["manifest_check"] = _manifest_check(found, video, dust3r_params) if found else "no fixtures folder found"

    stages = {}
    for dtype_name, nbytes in (("float32", 4), ("bfloat16", 2)):
        dt = getattr(torch, dtype_name)
        # DUSt3R: encode 2 views, decode one directed pair (batch 1), two heads in float32
        H, W = 384, 512
        enc_dt = dt
        dust3r.to(enc_dt)
        for head in (dust3r.downstream_head1, dust3r.downstream_head2):
            head.float()

        def dust3r_pair():
            img = torch.empty(2, 3, H, W, device="meta", dtype=enc_dt)
            feat, pos = dust3r.encode(img)
            same = pos[:1]                     # both views have the same size: one position table, as `is` tells
            dec1, dec2 = dust3r.decode(feat[:1], same, feat[1:], same)
            # the heads directly (Dust3R.heads wraps them in an autocast that the meta device does not have)
            return (dust3r.downstream_head1([d.float() for d in dec1], (H, W)),
                    dust3r.downstream_head2([d.float() for d in dec2], (H, W)))

        stages[f"dust3r_pair_{dtype_name}"] = {     # heads stay float32 (load_dust3r)
            "weights_bytes": sum(p.numel() * p.element_size() for p in dust3r.parameters()),
            "activation_bytes": _peak_activation_bytes(dust3r_pair)}
        # DynamiCrafter stages (batch 1, as `interpolate` runs them; CFG runs the UNet twice, one after the other)
        video.to(dt)
        frames, h, w = 16, 320 // 8, 512 // 8
        ctx_len = 77 + OFFICIAL_512_INTERP["resampler"]["num_queries"] * OFFICIAL_512_INTERP["resampler"]["video_length"]
        calls = {
            "text_encoder": lambda: video.text_encoder(torch.zeros(1, 77, dtype=torch.long, device="meta")),
            "image_encoder": lambda: video.image_encoder(torch.empty(1, 3, 320, 512, device="meta", dtype=dt)),
            "image_proj": lambda: video.image_proj(torch.empty(1, 257, 1280, device="meta", dtype=dt)),
            "vae_encode": lambda: video.vae.encode(torch.empty(1, 3, 320, 512, device="meta", dtype=dt)),
            "unet": lambda: video.unet(torch.empty(1, 8, frames, h, w, device="meta", dtype=dt),
                                       torch.zeros(1, dtype=torch.long, device="meta"),
                                       torch.empty(1, ctx_len, 1024, device="meta", dtype=dt),
                                       fs=torch.zeros(1, dtype=torch.long, device="meta")),
            "vae_decode": lambda: video.vae.decode(torch.empty(1, 4, h, w, device="meta", dtype=dt)),
        }
        owner = {"vae_encode": "vae", "vae_decode": "vae"}
        for name, call in calls.items():
            module = getattr(video, owner.get(name, name))
            params = sum(p.numel() for n, p in module.named_parameters() if "struct" not in n)
            try:
                act = _peak_activation_bytes(call)
            except Exception as exc:  # a stage that cannot trace on meta: say so, keep the others
                act = f"not traced ({type(exc).__name__}: {str(exc)[:120]})"
            stages[f"video_{name}_{dtype_name}"] = {"weights_bytes": params * nbytes, "activation_bytes": act}
    result["stages_mib"] = {k: {kk.replace("_bytes", ""): (round(v / MIB, 1) if isinstance(v, int) else v)
                                for kk, v in s.items()} for k, s in stages.items()}

    def video_peaks(dtype_name):
        rows = {k[len("video_"):-len(dtype_name) - 1]: v for k, v in stages.items()
                if k.startswith("video_") and k.endswith(dtype_name)}
        weights = {"unet": rows["unet"]["weights_bytes"], "vae": rows["vae_encode"]["weights_bytes"],
                   "text_encoder": rows["text_encoder"]["weights_bytes"],
                   "image_encoder": rows["image_encoder"]["weights_bytes"],
                   "image_proj": rows["image_proj"]["weights_bytes"]}
        acts = {k: (v["activation_bytes"] if isinstance(v["activation_bytes"], int) else 0) for k, v in rows.items()}
        owner_of = {"vae_encode": "vae", "vae_decode": "vae"}
        # latents, conditions and the decoded frames that stay on the device between stages (small)
        resident = 4 * (16 * 3 * 320 * 512 + 4 * 4 * 16 * 40 * 64)
        off = sum(weights.values()) + max(acts.values()) + resident
        on = max(weights[owner_of.get(k, k)] + a for k, a in acts.items()) + resident
        return {"offload_off_mib": round(off / MIB), "offload_on_mib": round(on / MIB)}

    result["video_peak_estimate"] = {d: video_peaks(d) for d in ("float32", "bfloat16")}
    result["dust3r_peak_estimate"] = {d: round((stages[f"dust3r_pair_{d}"]["weights_bytes"]
                                                + stages[f"dust3r_pair_{d}"]["activation_bytes"]) / MIB)
                                      for d in ("float32", "bfloat16")}
    return result


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", help="write the JSON here too (updated after every section and sub-run)")
    p.add_argument("--dry-run", action="store_true", help="run nothing; print the plan with every section skipped")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (the CPU simulation: tiny models)")
    p.add_argument("--quick", action="store_true", help="fewer steps/views/frames (same sizes on a GPU)")
    p.add_argument("--sections", help=f"comma-separated subset of {','.join(SECTION_ORDER)}")
    p.add_argument("--time-limit", type=float, default=440.0,
                   help="seconds for the whole run (default 440); sections that do not fit are skipped")
    p.add_argument("--models-dir", default=str(REPO / "models"),
                   help="folder whose reconx/ may hold alexnet-owt-7be5be79.pth for LPIPS")
    p.add_argument("--estimate-memory", action="store_true",
                   help="print parameter counts and memory estimates from meta-device models, and exit")
    p.add_argument("--fixtures", help="shared/fixtures folder for --estimate-memory's manifest check")
    p.add_argument("--strict", action="store_true", help="exit 1 when a section failed")
    return p.parse_args(argv)


def _fold_sub_failures(record: dict) -> None:
    """A section whose sub-runs (runs, fits, parity, stages) failed is "failed", naming them; figures stay."""
    failed = []
    for group in ("runs", "fits", "parity", "stages"):
        sub = record.get(group)
        if isinstance(sub, dict):
            failed += [f"{group}.{k}: {v.get('reason')}" for k, v in sub.items()
                       if isinstance(v, dict) and v.get("status") == "failed"]
    if failed and record.get("status") != "failed":
        record["status"] = "failed"
        record["reason"] = "; ".join(failed)[:1500]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.estimate_memory:
        print(json.dumps(estimate_memory(args.fixtures), indent=1))
        return 0
    sections = SECTION_ORDER if not args.sections else [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        print(f"error: unknown section(s) {unknown}; choose from {SECTION_ORDER}", file=sys.stderr)
        return 2
    sections = [s for s in SECTION_ORDER if s in sections]
    device = torch.device(args.device)
    cuda_missing = device.type == "cuda" and not torch.cuda.is_available()
    profile = "tiny" if device.type == "cpu" else ("quick" if args.quick else "full")
    mode = ("dry-run" if args.dry_run else "no-cuda" if cuda_missing else
            "cpu-simulation" if device.type == "cpu" else "gpu")
    report = Report(args.output, args, mode)
    report.data["profile"] = {"name": profile, "sizes": {s: PROFILES[profile][s] for s in sections}}
    report.data["section_order"] = sections
    scale = 1.0 if profile == "full" else 0.6          # the smaller profiles get smaller budgets
    report.data["budgets_s"] = {s: round(BUDGETS[s] * scale) for s in sections}
    if mode == "cpu-simulation":
        report.data["note"] = ("CPU simulation: tiny random models on tiny inputs through the GPU check's code paths "
                               "(gsplat emulated); the figures test the script, not a GPU")
    report.data["machine"] = machine_facts(cuda=device.type == "cuda" and not cuda_missing and not args.dry_run)
    if args.dry_run or cuda_missing:
        why = ("dry run: nothing was executed (the plan is in profile/budgets_s)" if args.dry_run
               else "no CUDA device (torch.cuda.is_available() is False); use --device cpu for the CPU simulation")
        for s in sections:
            report.data["sections"][s] = {"status": "skipped", "reason": why, "would_measure": PLANS[s]}
        report.data["sections"].get("train", {}).update(
            availability="reconx_core.training present" if (REPO / "reconx_core/training").is_dir()
            else "would be skipped: reconx_core.training is absent in this version")
        if "viewcrafter" in report.data["sections"]:
            try:
                where, _, _ = find_viewcrafter()
                note = f"found: {where}" if where else "would be skipped: no ViewCrafter-512 config in this version"
            except Exception as exc:
                note = f"lookup failed: {type(exc).__name__}: {exc}"[:300]
            report.data["sections"]["viewcrafter"]["availability"] = note
        report.data["finished"] = True
        report.save()
        print(report.text())
        return 0

    ctx = Context(args, report, profile)
    interrupted = {"signal": None}

    def on_signal(signum, frame):
        interrupted["signal"] = signum
        raise KeyboardInterrupt(f"signal {signum}")

    previous_handler = signal.signal(signal.SIGTERM, on_signal)
    log_dir = Path(args.output).resolve().parent if args.output else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    if ctx.cuda and "gaussians" in sections and report.data["machine"]["gsplat"]["importable"]:
        ctx.gsplat_build = GsplatBuild(log_dir)
        report.data["machine"]["gsplat_build"] = {"started_in_background": True, "log": str(ctx.gsplat_build.log_path),
                                                  "env": ctx.gsplat_build.env_used}
    report.save()
    try:
        for name in sections:
            record = {"status": "skipped", "budget_s": round(BUDGETS[name] * scale)}
            report.data["sections"][name] = record
            left = ctx.deadline - time.perf_counter()
            if left < 5:
                record["reason"] = f"the run's time limit ({args.time_limit:.0f} s) is used up"
                report.save()
                continue
            ctx.section_deadline = time.perf_counter() + record["budget_s"]
            record["status"] = "running"
            if ctx.gsplat_build is not None:
                record["gsplat_build_running_at_start"] = ctx.gsplat_build.running()
            report.save()
            t0 = time.perf_counter()
            try:
                result = SECTIONS[name](ctx)
                record.update(result)
                if record["status"] == "running":
                    record["status"] = "ok"
                _fold_sub_failures(record)
            except BudgetExceeded as exc:
                record.update(status="skipped", reason=f"time budget: {exc}")
            except KeyboardInterrupt:
                record.update(status="failed", reason=f"interrupted ({interrupted['signal'] or 'Ctrl-C'})")
                raise
            except Exception as exc:
                record.update(error_record(exc))
            finally:
                record["wall_s"] = round(time.perf_counter() - t0, 2)
                free_memory(ctx)
                report.save()
    except KeyboardInterrupt:
        report.data["interrupted"] = True
        for name in sections:
            report.data["sections"].setdefault(name, {"status": "skipped", "reason": "the run was interrupted"})
    finally:
        if ctx.gsplat_build is not None:
            report.data["machine"]["gsplat_build"].update(ctx.gsplat_build.status())
            ctx.gsplat_build.stop()
        report.data["finished"] = not report.data.get("interrupted", False)
        report.save()
        print(report.text())
        signal.signal(signal.SIGTERM, previous_handler)
    failed = [n for n, r in report.data["sections"].items() if r.get("status") == "failed"]
    return 1 if (args.strict and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
