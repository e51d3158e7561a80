"""Time reconx_core.align.align_views on the synthetic sizes of dust3r_ga_timing.json and compare with the
official DUSt3R aligner (MST init + 300 cosine Adam steps, complete symmetric graph).

Usage: .venv/bin/python bench/bench_align.py [--threads 1] [--small-only] [--official DIR]
Prints one row per case: our time, the official time, the ratio, and both final losses.

Without --official the official numbers are the ones recorded in dust3r_ga_timing.json (same kind of 2-core CPU,
1 thread at 32x48, 2 threads at 384x512); only the fixture row has the official's exact inputs there, the
synthetic rows are our re-creation of its generator, so their losses are not comparable.
With --official DIR (a folder holding the `dust3r` package of a naver/dust3r checkout; it is CC BY-NC-SA and never
part of this repository; it needs opencv, scipy and tqdm, all in the test venv) the official aligner runs side
by side on the very same inputs, so every row compares times and losses directly. The official 384x512 N=8
case (about 15 min) runs only with --all.
Note the machine load printed on each row: other processes share the cores.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reconx_core.align import align_views  # noqa: E402
from tests.fixtures import load_json  # noqa: E402
from tests.synthetic_pairs import make_synthetic_pairs  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: as recorded: 1 small, 2 large)")
    parser.add_argument("--small-only", action="store_true", help="skip the 384x512 cases")
    parser.add_argument("--official", type=Path, default=None,
                        help="folder holding naver/dust3r's `dust3r` package: run the official aligner side by side")
    parser.add_argument("--all", action="store_true", help="with --official, also run its 384x512 N=8 case (~15 min)")
    args = parser.parse_args()
    if args.official is not None:
        sys.path.insert(0, str(args.official.resolve()))
    timing = load_json("dust3r_ga_timing.json")["results"]
    print(f"load average before: {os.getloadavg()}, cpu count {os.cpu_count()}, torch {torch.__version__}")
    cases = [(n, 32, 48, 1) for n in (3, 4, 8)]
    if not args.small_only:
        cases += [(n, 384, 512, 2) for n in (3, 4, 8)]
    print(f"{'case':<28}{'ours s':>9}{'official s':>12}{'ratio':>8}{'our loss':>12}{'official loss':>15}"
          f"{'loss ratio':>12}  load")
    # the exact official inputs of the N=4 32x48 case (fixture dust3r_globalalign): the loss compares exactly
    from reconx_core.types import PairPredictions
    from tests.fixtures import load_tensors
    torch.set_num_threads(1)
    ga = load_tensors("dust3r_globalalign.safetensors")
    fixture = PairPredictions(ga["in_edges"], ga["in_pred1_pts3d"], ga["in_pred2_pts3d_in_other_view"],
                              ga["in_pred1_conf"], ga["in_pred2_conf"])
    start = time.perf_counter()
    scene = align_views(fixture, niter=300)
    ours = time.perf_counter() - start
    ref = timing["N=4 HxW=32x48 threads=1"]
    if args.official is not None:
        ref = official_align(fixture)
    _print_row("fixture N=4 32x48 threads=1", ours, scene.info["loss"], ref)
    for n, h, w, threads in cases:
        threads = args.threads or threads
        torch.set_num_threads(threads)
        pairs, _ = make_synthetic_pairs(n, h, w)
        start = time.perf_counter()
        scene = align_views(pairs, niter=300, lr=0.01, schedule="cosine", init="mst")
        ours = time.perf_counter() - start
        key = f"N={n} HxW={h}x{w} threads={threads}"
        if args.official is not None:
            ref = official_align(pairs) if (h * w < 384 * 512 or n < 8 or args.all) else {}
        else:
            ref = timing.get(key) or timing.get(f"N={n} HxW={h}x{w} threads=2") or {}
        _print_row(key, ours, scene.info["loss"], ref)


def _print_row(case, ours_s, ours_loss, ref):
    off_s = ref.get("seconds_compute_global_alignment_mst_300iter")
    off_loss = ref.get("final_loss")
    ratio = f"{off_s / ours_s:.1f}x" if off_s else "-"
    loss_ratio = f"{ours_loss / off_loss:.6f}" if off_loss else "-"
    print(f"{case:<28}{ours_s:>9.2f}{off_s if off_s else float('nan'):>12.2f}{ratio:>8}{ours_loss:>12.7f}"
          f"{off_loss if off_loss else float('nan'):>15.7f}{loss_ratio:>12}  {os.getloadavg()[0]:.2f}", flush=True)


def run_official(pairs):
    """The official PointCloudOptimizer on our pair predictions, called as the fixture's JSON records it.

    Needs naver/dust3r's `dust3r` package on sys.path. Returns (its optimiser object, final loss, seconds)."""
    import warnings

    warnings.filterwarnings("ignore", module="dust3r")  # its deprecated-autocast and tensor-to-float warnings
    from dust3r.cloud_opt import GlobalAlignerMode, global_aligner

    edges = pairs.edges.tolist()
    output = {"view1": {"idx": [i for i, _ in edges]}, "view2": {"idx": [j for _, j in edges]},
              "pred1": {"pts3d": pairs.pts_i.clone(), "conf": pairs.conf_i.clone()},
              "pred2": {"pts3d_in_other_view": pairs.pts_j_in_i.clone(), "conf": pairs.conf_j.clone()}}
    torch.manual_seed(0)
    start = time.perf_counter()
    scene = global_aligner(output, device="cpu", mode=GlobalAlignerMode.PointCloudOptimizer, verbose=False)
    loss = scene.compute_global_alignment(init="mst", niter=300, schedule="cosine", lr=0.01)
    return scene, float(loss), time.perf_counter() - start


def official_align(pairs):
    """{"seconds_compute_global_alignment_mst_300iter", "final_loss"} of `run_official`, like dust3r_ga_timing.json."""
    _, loss, seconds = run_official(pairs)
    return {"seconds_compute_global_alignment_mst_300iter": seconds, "final_loss": loss}

if __name__ == "__main__":
    main()
