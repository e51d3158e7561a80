"""How far float32 rounding alone moves the alignment fixture's errors against the ground truth, for the official
DUSt3R aligner and for ours, on the same perturbed inputs.

Usage: .venv/bin/python bench/align_rounding_spread.py --official DIR [--runs 30] [--noise 2e-7]
(DIR: a folder holding the `dust3r` package of a naver/dust3r checkout, as for bench_align.py --official.)

The fixture (dust3r_globalalign) records one official run's errors. Each run here multiplies the fixture's
point maps by (1 + noise * N(0, 1)), i.e. changes them at the level of float32 rounding, and runs both aligners
(MST init + 300 cosine Adam steps) on those same inputs. It prints, per metric, each aligner's mean and range of
error / recorded official error, and the mean of ours / official's over the paired runs. A metric whose official
range is wide is decided by rounding, not by the aligner.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_align import run_official  # noqa: E402
from reconx_core.align import align_views  # noqa: E402
from reconx_core.types import PairPredictions  # noqa: E402
from tests.fixtures import load_json, load_tensors  # noqa: E402
from tests.synthetic_pairs import ratios_to_official  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="folder holding naver/dust3r's `dust3r` package")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--noise", type=float, default=2e-7, help="relative noise on the input point maps")
    args = parser.parse_args()
    sys.path.insert(0, str(args.official.resolve()))
    torch.set_num_threads(1)  # the fixture's official run was single-threaded (bitwise reproducible)
    fixture, fixture_json = load_tensors("dust3r_globalalign.safetensors"), load_json("dust3r_globalalign.json")
    base = PairPredictions(fixture["in_edges"], fixture["in_pred1_pts3d"], fixture["in_pred2_pts3d_in_other_view"],
                           fixture["in_pred1_conf"], fixture["in_pred2_conf"])

    def official_ratios(pairs):
        scene, _, _ = run_official(pairs)
        with torch.no_grad():
            c2w = scene.get_im_poses().detach()
            return ratios_to_official(fixture, fixture_json, c2w[:, :3, :3], c2w[:, :3, 3],
                                      scene.get_focals().detach().view(-1), torch.stack(scene.get_depthmaps()).detach())

    def our_ratios(pairs):
        scene = align_views(pairs, niter=300, lr=0.01, schedule="cosine", init="mst", min_conf_thr=3.0)
        c2w = scene.cameras.cam_to_world
        return ratios_to_official(fixture, fixture_json, c2w[:, :3, :3], c2w[:, :3, 3], scene.cameras.focals,
                                  scene.depths)

    print("unperturbed inputs, error / recorded official error:")
    for name, fn in (("official rerun", official_ratios), ("ours", our_ratios)):
        print(f"  {name:<15}" + "  ".join(f"{k} {v:.4f}" for k, v in fn(base).items()))
    official, ours = [], []
    for seed in range(args.runs):
        gen = torch.Generator().manual_seed(seed)
        noisy = [t * (1 + args.noise * torch.randn(t.shape, generator=gen)) for t in (base.pts_i, base.pts_j_in_i)]
        pairs = PairPredictions(base.edges, noisy[0], noisy[1], base.conf_i, base.conf_j)
        official.append(official_ratios(pairs))
        ours.append(our_ratios(pairs))
    print(f"{args.runs} runs with inputs x (1 + {args.noise:g} N(0,1)), error / recorded official error:")
    print(f"{'metric':<32}{'official mean [range]':>26}{'ours mean [range]':>26}{'paired ours/official':>22}")
    for key in official[0]:
        o, u = [r[key] for r in official], [r[key] for r in ours]
        paired = statistics.mean(a / b for a, b in zip(u, o))
        print(f"{key:<32}{statistics.mean(o):>9.4f} [{min(o):.3f}, {max(o):.3f}]"
              f"{statistics.mean(u):>9.4f} [{min(u):.3f}, {max(u):.3f}]{paired:>22.4f}")


if __name__ == "__main__":
    main()
