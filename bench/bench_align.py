"""Time reconx_core.align.align_views on the synthetic sizes of dust3r_ga_timing.json and compare with the
official DUSt3R timings recorded there (MST init + 300 cosine Adam steps, complete symmetric graph).

Usage: .venv/bin/python bench/bench_align.py [--threads 1] [--small-only]
Prints one row per case: our time, the official time, the ratio, and both final losses. The official numbers
were measured on the same kind of 2-core CPU (1 thread at 32x48, 2 threads at 384x512); note the machine load
printed at the top, other processes share the cores.
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
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as recorded: 1 small, 2 large)")
    parser.add_argument("--small-only", action="store_true", help="skip the 384x512 cases")
    args = parser.parse_args()
    timing = load_json("dust3r_ga_timing.json")["results"]
    print(f"load average before: {os.getloadavg()}, cpu count {os.cpu_count()}, torch {torch.__version__}")
    cases = [(n, 32, 48, 1) for n in (3, 4, 8)]
    if not args.small_only:
        cases += [(n, 384, 512, 2) for n in (3, 4, 8)]
    print(f"{'case':<28}{'ours s':>9}{'official s':>12}{'ratio':>8}{'our loss':>12}{'official loss':>15}  load")
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
    off_s = ref["seconds_compute_global_alignment_mst_300iter"]
    print(f"{'fixture N=4 32x48 threads=1':<28}{ours:>9.2f}{off_s:>12.2f}{off_s / ours:>7.1f}x"
          f"{scene.info['loss']:>12.6f}{ref['final_loss']:>15.6f}  {os.getloadavg()[0]:.2f}", flush=True)
    for n, h, w, threads in cases:
        threads = args.threads or threads
        torch.set_num_threads(threads)
        pairs, _ = make_synthetic_pairs(n, h, w)
        start = time.perf_counter()
        scene = align_views(pairs, niter=300, lr=0.01, schedule="cosine", init="mst")
        ours = time.perf_counter() - start
        key = f"N={n} HxW={h}x{w} threads={threads}"
        ref = timing.get(key) or timing.get(f"N={n} HxW={h}x{w} threads=2") or {}
        off_s = ref.get("seconds_compute_global_alignment_mst_300iter")
        off_loss = ref.get("final_loss")
        ratio = f"{off_s / ours:.1f}x" if off_s else "-"
        print(f"{key:<28}{ours:>9.2f}{off_s if off_s else float('nan'):>12.2f}{ratio:>8}{scene.info['loss']:>12.6f}"
              f"{off_loss if off_loss else float('nan'):>15.6f}  {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
