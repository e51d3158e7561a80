"""How far float32 rounding alone moves the official DUSt3R aligner on the alignment fixture, and ours beside it.

Usage: .venv/bin/python bench/align_rounding_spread.py --official DIR [--runs 30] [--noise 2e-7 2e-5] [--ours]
                                  [--verbose] [--json tests/data/official_align_spread.json --path-name NAME]
(DIR: a folder holding the `dust3r` package of a naver/dust3r checkout, as for bench_align.py --official.)

The fixture (dust3r_globalalign, made on another CPU) records one official run. On this machine, with the numeric
path chosen by the environment (MKL_CBWR, MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY), this
runs the official aligner (MST init + 300 cosine Adam steps, exactly as the fixture's JSON records):
  1. on the fixture's inputs as they are;
  2. its Adam loop alone, from the fixture's recorded init;
  3. on `--runs` copies of the inputs whose point maps are multiplied by (1 + noise * N(0, 1)) (seeds 0..runs-1,
     torch.Generator, pts_i drawn first, then pts_j_in_i), for each noise level. 2e-7 is float32 rounding (1.7 eps);
     it moves the init as much as another CPU does. 2e-5, still 250x below the fixture's own 0.5 % input noise,
     also samples the two equally good end states (same loss) between which float32 rounding decides after 300
     steps: on one CPU the 2e-7 runs mostly stay near one of them, while other CPUs land on either.
For each run it measures the deviation from the fixture's recorded init and outputs (max |difference|), the final
loss, and every ground-truth error metric as a ratio to the fixture's recorded error (tests/synthetic_pairs.py
`ratios_to_official`). With --ours it runs our aligner on the same inputs and prints both side by side.
With --json it adds this numeric path's official numbers (min / mean / max over the runs) to that file, which
tests/test_align.py reads: the bounds there are the official aligner's own spread, never tighter.
"""

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reconx_core.align import align_views, image_confidence  # noqa: E402
from reconx_core.align.init import init_mst  # noqa: E402
from reconx_core.align.optimize import camera_poses, focals_of, pw_scales  # noqa: E402
from reconx_core.types import PairPredictions  # noqa: E402
from tests.fixtures import load_json, load_tensors  # noqa: E402
from tests.synthetic_pairs import ratios_to_official  # noqa: E402

NUMERIC_ENV = ("MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
# raw parameter -> (fixture key, column slice): the official layout (fixture README A3)
INIT_PARTS = {"pw_quat": ("init_raw_pw_poses", slice(0, 4)), "pw_log_trans": ("init_raw_pw_poses", slice(4, 7)),
              "pw_log_scale": ("init_raw_pw_poses", slice(7, 8)), "im_quat": ("init_raw_im_poses", slice(0, 4)),
              "im_log_trans": ("init_raw_im_poses", slice(4, 7)), "im_log_depth": ("init_raw_im_depthmaps", slice(None)),
              "im_focal": ("init_raw_im_focals", slice(None))}


def perturbed(base, seed, noise):
    """The fixture's inputs with both point maps multiplied by (1 + noise * N(0, 1)); the tests draw the same."""
    gen = torch.Generator().manual_seed(seed)
    noisy = [t * (1 + noise * torch.randn(t.shape, generator=gen)) for t in (base.pts_i, base.pts_j_in_i)]
    return PairPredictions(base.edges, noisy[0], noisy[1], base.conf_i, base.conf_j)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help="folder holding naver/dust3r's `dust3r` package")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--noise", type=float, nargs="+", default=[2e-7, 2e-5],
                        help="relative noise levels on the input point maps")
    parser.add_argument("--ours", action="store_true", help="also run our aligner on the same inputs")
    parser.add_argument("--json", type=Path, default=None, help="add this numeric path's official numbers here")
    parser.add_argument("--path-name", default=None, help="key for this numeric path in --json (default: its env)")
    parser.add_argument("--verbose", action="store_true", help="print every run's error ratios")
    args = parser.parse_args()
    sys.path.insert(0, str(args.official.resolve()))
    import warnings
    warnings.filterwarnings("ignore", module="dust3r")  # its deprecated-autocast and tensor-to-float warnings
    from dust3r.cloud_opt import GlobalAlignerMode, global_aligner
    from dust3r.cloud_opt.base_opt import global_alignment_iter
    from dust3r.cloud_opt.init_im_poses import init_minimum_spanning_tree

    torch.set_num_threads(1)  # the fixture's official run was single-threaded (bitwise reproducible)
    fixture, fixture_json = load_tensors("dust3r_globalalign.safetensors"), load_json("dust3r_globalalign.json")
    base = PairPredictions(fixture["in_edges"], fixture["in_pred1_pts3d"], fixture["in_pred2_pts3d_in_other_view"],
                           fixture["in_pred1_conf"], fixture["in_pred2_conf"])
    n, height, width = fixture["gt_depth"].shape

    def measure(c2w, focals, depth, loss, curve, init=None, init_derived=None):
        out = {"final_loss": loss,
               "cam2world_max_abs_dev": float((c2w - fixture["out_cam2world"]).abs().max()),
               "depth_max_abs_dev": float((depth - fixture["out_depth"]).abs().max()),
               "loss_curve_first20_max_abs_dev": float((curve[:20] - fixture["loss_curve"][:20]).abs().max()),
               "loss_curve_max_abs_dev": float((curve - fixture["loss_curve"]).abs().max()),
               "loss_curve_last50_max_abs_dev": float((curve[-50:] - fixture["loss_curve"][-50:]).abs().max())}
        for key, value in ratios_to_official(fixture, fixture_json, c2w[:, :3, :3], c2w[:, :3, 3], focals,
                                             depth).items():
            out["ratio_" + key] = value
        for name, value in (init or {}).items():
            key, cols = INIT_PARTS[name]
            ref = fixture[key].reshape(value.shape[0], -1)[:, cols]
            out["init_max_abs_dev_" + name] = float((value.reshape(ref.shape) - ref).abs().max())
        if init_derived is not None:  # what the init's raw parameters mean: cameras, focals, depths, edge scales
            init_c2w, init_focals, init_depth, init_pw_scale = init_derived
            rel = lambda a, b: float(((a.reshape(b.shape) - b).abs() / b.abs()).max())  # noqa: E731
            out["init_cam2world_max_abs_dev"] = float((init_c2w - fixture["init_poses"]).abs().max())
            out["init_focal_max_rel_dev"] = rel(init_focals, fixture["init_focals"])
            out["init_depth_max_rel_dev"] = rel(init_depth, fixture["init_depth"])
            out["init_pw_scale_max_rel_dev"] = rel(init_pw_scale, fixture["init_pw_scale"])
            out["init_loss_rel_dev"] = abs(float(curve[0]) / fixture_json["init_loss_after_mst"] - 1)
        return out

    def official(pairs, from_fixture_init=False):
        edges = pairs.edges.tolist()
        output = {"view1": {"idx": [i for i, _ in edges]}, "view2": {"idx": [j for _, j in edges]},
                  "pred1": {"pts3d": pairs.pts_i.clone(), "conf": pairs.conf_i.clone()},
                  "pred2": {"pts3d_in_other_view": pairs.pts_j_in_i.clone(), "conf": pairs.conf_j.clone()}}
        torch.manual_seed(0)
        scene = global_aligner(output, device="cpu", mode=GlobalAlignerMode.PointCloudOptimizer, verbose=False)
        # compute_global_alignment(init='mst', niter=300, schedule='cosine', lr=0.01), split as the fixture's run
        init_minimum_spanning_tree(scene, niter_PnP=10)
        with torch.no_grad():
            if from_fixture_init:
                scene.pw_poses.copy_(fixture["init_raw_pw_poses"])
                scene.im_poses.copy_(fixture["init_raw_im_poses"])
                scene.im_depthmaps.copy_(fixture["init_raw_im_depthmaps"])
                scene.im_focals.copy_(fixture["init_raw_im_focals"])
            init = {"pw_quat": scene.pw_poses[:, :4], "pw_log_trans": scene.pw_poses[:, 4:7],
                    "pw_log_scale": scene.pw_poses[:, 7:8], "im_quat": scene.im_poses[:, :4],
                    "im_log_trans": scene.im_poses[:, 4:7], "im_log_depth": scene.im_depthmaps,
                    "im_focal": scene.im_focals}
            init = {k: v.detach().clone() for k, v in init.items()}
            derived = (scene.get_im_poses().detach().clone(), scene.get_focals().detach().clone(),
                       torch.stack(scene.get_depthmaps()).detach().clone(), scene.get_pw_scale().detach().clone())
        params = [p for p in scene.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=0.01, betas=(0.9, 0.9))
        curve = [global_alignment_iter(scene, it, 300, 0.01, 1e-6, optimizer, "cosine")[0] for it in range(300)]
        with torch.no_grad():
            c2w = scene.get_im_poses().detach()
            depth = torch.stack(scene.get_depthmaps()).detach().view(n, height, width)
            if from_fixture_init:
                return measure(c2w, scene.get_focals().detach().view(-1), depth, curve[-1], torch.tensor(curve))
            return measure(c2w, scene.get_focals().detach().view(-1), depth, curve[-1], torch.tensor(curve), init,
                           derived)

    def ours(pairs):
        im_conf = image_confidence(pairs.edges, pairs.conf_i, pairs.conf_j, n)
        params = init_mst(pairs.edges.tolist(), pairs.pts_i, pairs.pts_j_in_i, pairs.conf_i, pairs.conf_j, im_conf,
                          3.0)
        rot, trans = camera_poses(params)
        init_c2w = torch.eye(4).repeat(n, 1, 1)
        init_c2w[:, :3, :3], init_c2w[:, :3, 3] = rot, trans
        derived = (init_c2w, focals_of(params), params.im_log_depth.exp(), pw_scales(params.pw_log_scale))
        scene = align_views(pairs, niter=300, lr=0.01, schedule="cosine", init="mst", min_conf_thr=3.0)
        return measure(scene.cameras.cam_to_world, scene.cameras.focals, scene.depths, scene.info["loss"],
                       scene.info["loss_curve"], {k: getattr(params, k) for k in INIT_PARTS}, derived)

    env = {k: os.environ.get(k, "") for k in NUMERIC_ENV}
    path_name = args.path_name or (" ".join(f"{k}={v}" for k, v in env.items() if v) or "default")
    print(f"numeric path: {path_name}; torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}")
    results = {"unperturbed": official(base), "loop_from_fixture_init": official(base, from_fixture_init=True)}
    for title, row in (("official, unperturbed", results["unperturbed"]),
                       ("official, loop from the fixture's init", results["loop_from_fixture_init"])):
        print(f"{title}:\n  " + "  ".join(f"{k} {v:.7g}" for k, v in row.items()))
    if args.ours:
        print("ours, unperturbed:\n  " + "  ".join(f"{k} {v:.7g}" for k, v in ours(base).items()))
    results["perturbed"] = {}
    for noise in args.noise:
        runs = [official(perturbed(base, seed, noise)) for seed in range(args.runs)]
        mine = [ours(perturbed(base, seed, noise)) for seed in range(args.runs)] if args.ours else None
        if args.verbose:
            for seed, run in enumerate(runs):
                print(f"official seed {seed:3d}: " + " ".join(f"{k[6:]} {v:.3f}" for k, v in run.items()
                                                              if k.startswith("ratio_")))
                if mine:
                    print(f"ours     seed {seed:3d}: " + " ".join(f"{k[6:]} {v:.3f}" for k, v in mine[seed].items()
                                                                  if k.startswith("ratio_")))
        print(f"{args.runs} runs with inputs x (1 + {noise:g} N(0,1)):")
        print(f"{'quantity':<40}{'official mean [range]':>40}" + (f"{'ours mean [range]':>40}" if mine else ""))
        summary = {}
        for key in runs[0]:
            values = [r[key] for r in runs]
            summary[key] = {"min": min(values), "mean": statistics.mean(values), "max": max(values)}
            line = f"{key:<40}{statistics.mean(values):>14.7g} [{min(values):.7g}, {max(values):.7g}]"
            if mine and key in mine[0]:
                u = [r[key] for r in mine]
                line += f"{statistics.mean(u):>14.7g} [{min(u):.7g}, {max(u):.7g}]"
            print(line)
        results["perturbed"][f"{noise:g}"] = summary
    if args.json:
        store(args, path_name, env, results)


def cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def store(args, path_name, env, results):
    """Add this numeric path to the JSON file and refresh the union over all stored paths."""
    data = json.loads(args.json.read_text()) if args.json.exists() else {}
    data["what"] = ("The official DUSt3R aligner's own float32 spread on the dust3r_globalalign fixture, made by "
                    "bench/align_rounding_spread.py: deviations from the fixture's recorded init and outputs (max "
                    "|difference|), final loss, and ground-truth errors as ratios to the fixture's recorded errors "
                    "(tests/synthetic_pairs.py ratios_to_official), on the fixture's inputs, its Adam loop alone from "
                    "the recorded init, and over `runs` rounding-level perturbations of the inputs (min/mean/max).")
    data["made_with"] = {"dust3r": "naver/dust3r@4c24a6ebf04809f2cfe59915e51779c8984aaa40",
                         "croco": "naver/croco@d7de0705845239092414480bd829228723bf20de",
                         "torch": torch.__version__, "python": platform.python_version(),
                         "cpu": f"{cpu_model()}, {os.cpu_count()} cores",
                         "torch_threads": 1,
                         "official_calls": "global_aligner(PointCloudOptimizer) after torch.manual_seed(0); "
                                           "init_minimum_spanning_tree(niter_PnP=10); 300 x global_alignment_iter("
                                           "lr 0.01, lr_min 1e-6, cosine), Adam betas (0.9, 0.9)"}
    data["perturbation"] = {"runs": args.runs, "seeds": f"0..{args.runs - 1}", "noise_rel": args.noise,
                            "how": "pts_i and pts_j_in_i each x (1 + noise * torch.randn(shape, generator="
                                   "torch.Generator().manual_seed(seed))), pts_i drawn first"}
    paths = data.setdefault("numeric_paths", {})
    paths[path_name] = dict(results, env={k: v for k, v in env.items() if v},
                            torch_cpu_capability=torch.backends.cpu.get_cpu_capability())
    union = {}
    for result in paths.values():
        for section in ("unperturbed", "loop_from_fixture_init"):
            for key, value in result[section].items():
                entry = union.setdefault(section, {}).setdefault(key, {"min": value, "max": value})
                entry["min"], entry["max"] = min(entry["min"], value), max(entry["max"], value)
        for noise, summary in result["perturbed"].items():
            for key, stats in summary.items():
                entry = union.setdefault("perturbed", {}).setdefault(noise, {}).setdefault(
                    key, {"min": stats["min"], "max": stats["max"], "mean_min": stats["mean"],
                          "mean_max": stats["mean"]})
                entry["min"], entry["max"] = min(entry["min"], stats["min"]), max(entry["max"], stats["max"])
                entry["mean_min"] = min(entry["mean_min"], stats["mean"])
                entry["mean_max"] = max(entry["mean_max"], stats["mean"])
    data["all_paths"] = union
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    print(f"wrote {args.json} ({len(paths)} numeric paths)")


if __name__ == "__main__":
    main()
