"""reconx_core.align against the official DUSt3R global alignment (fixture dust3r_globalalign, README A3)."""

import dataclasses
import json
import statistics
from pathlib import Path

import pytest
import roma
import torch

from reconx_core.align import align_views, clean_pointcloud, clean_scene, confidence_masks, image_confidence
from reconx_core.align.init import RawParams, init_mst
from reconx_core.align.optimize import (camera_poses, focals_of, loss_and_grads, objective, prepare_edges,
                                        pw_scales, reference_objective, run_adam)
from reconx_core.errors import InputError
from reconx_core.types import PairPredictions
from tests.fixtures import load_json, load_tensors
from tests.synthetic_pairs import errors_vs_gt, make_synthetic_pairs, ratios_to_official, render_depth

OFFICIAL_FINAL_LOSS = 0.0240842  # fixture JSON final_loss_returned

# The fixture's official run was recorded on another CPU, and float32 results differ from CPU to CPU
# (../shared/ENV.md). Every bound below on a comparison with it is the OFFICIAL aligner's own spread, measured by
# bench/align_rounding_spread.py: the official code run here on the fixture's inputs, its Adam loop alone from the
# recorded init, and 30 runs on inputs x (1 + noise N(0, 1)), under five numeric paths (default, MKL_CBWR=COMPATIBLE,
# MKL/oneDNN AVX2, those + ATEN avx2, ATEN default). tests/data/official_align_spread.json keeps those numbers.
# What it showed: run here, the official code misses its own recording by as much as our code does (init 3.4e-7 in
# pw_quat, poses 8.2e-4 after 300 steps, worst relative rotation 1.32x the recorded error), because 2e-7 input
# noise (1.7 eps) moves the init as far as another CPU does, and 300 Adam steps amplify that.
# Ours under the same five paths: at most 0.42 of each init bound below, 0.44 of each pose/depth/loss bound, 0.25 of
# the loop-from-the-recorded-init bounds. Defects injected into reconx_core.align (monkeypatched, scratch script) and
# caught: confidence weights not log'd, one edge missing from the loss, one view's depth gradient with the wrong
# sign, unweighted init Procrustes (pw_quat 1.7e-4 against a bound of 8.3e-7), a linear instead of cosine schedule
# and a focal never optimised (both only by the loop tests: neither makes the result less accurate here).
SPREAD_FILE = json.loads((Path(__file__).parent / "data" / "official_align_spread.json").read_text())
SPREAD = SPREAD_FILE["all_paths"]
ROUNDING = SPREAD["perturbed"]["2e-07"]  # float32-rounding-level noise (per quantity: min/max over paths and runs)
BASINS = SPREAD["perturbed"]["2e-05"]  # noise that also samples both end states (see the ground-truth test)
GT_NOISE, GT_RUNS = 2e-5, SPREAD_FILE["perturbation"]["runs"]


def official_spread(quantity: str) -> float:
    """The largest deviation of the official aligner from its own recording: on the unperturbed inputs and over
    the rounding-level perturbations, under every numeric path measured."""
    return max(SPREAD["unperturbed"][quantity]["max"], ROUNDING[quantity]["max"])


# A single run of ours is one more draw from (nearly) the official distribution, on a CPU not measured: it may
# deviate up to twice the official aligner's largest measured deviation from the recording.
SPREAD_FACTOR = 2.0
METRICS = ("point_err_mean", "cam_center_rmse", "cam_rot_err_deg", "rel_rot_err_deg_pairs_i_lt_j", "focal_rel_err",
           "depth_abs_rel_after_scale")


def official_worst_ratio(metric: str) -> float:
    """Worst ground-truth error of the official aligner over all its measured runs, over its recorded error."""
    key = f"ratio_{metric}"
    return max(SPREAD["unperturbed"][key]["max"], SPREAD["loop_from_fixture_init"][key]["max"], ROUNDING[key]["max"],
               BASINS[key]["max"])


# One run's ground-truth errors lie anywhere in the official distribution (see the 30-run test for the mean); 10 %
# above its worst still fails a real defect (a 2x error) while no draw from it should.
SINGLE_RUN_RATIO_FACTOR = 1.1


def within(what: str, value: float, bound: float) -> None:
    assert value <= bound, f"{what}: {value:.4g} > bound {bound:.4g}"


def perturbed(pairs: PairPredictions, seed: int, noise: float) -> PairPredictions:
    """Point maps x (1 + noise N(0, 1)), drawn exactly as bench/align_rounding_spread.py draws them."""
    gen = torch.Generator().manual_seed(seed)
    noisy = [t * (1 + noise * torch.randn(t.shape, generator=gen)) for t in (pairs.pts_i, pairs.pts_j_in_i)]
    return PairPredictions(pairs.edges, noisy[0], noisy[1], pairs.conf_i, pairs.conf_j)


EPS32 = torch.finfo(torch.float32).eps


def assert_rel(actual, expected, rel):
    """|actual - expected| <= rel * max|expected| everywhere: a tolerance relative to the values' magnitude."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * float(expected.abs().max()))


pytestmark = [pytest.mark.usefixtures("one_thread"),  # see tests/conftest.py
              pytest.mark.numeric]  # float32-sensitive: CI runs it again on a second numeric path (test-numeric)


@pytest.fixture(scope="module")
def ga():
    return load_tensors("dust3r_globalalign.safetensors")


@pytest.fixture(scope="module")
def ga_json():
    return load_json("dust3r_globalalign.json")


def _pairs(ga, select=None):
    keys = ("in_edges", "in_pred1_pts3d", "in_pred2_pts3d_in_other_view", "in_pred1_conf", "in_pred2_conf")
    tensors = [ga[k] if select is None else ga[k][select] for k in keys]
    return PairPredictions(*[t.clone() for t in tensors])


def _official_init(ga):
    pw, im = ga["init_raw_pw_poses"], ga["init_raw_im_poses"]
    return RawParams(pw[:, :4].clone(), pw[:, 4:7].clone(), pw[:, 7].clone(), im[:, :4].clone(), im[:, 4:7].clone(),
                     ga["init_raw_im_depthmaps"].clone(), ga["init_raw_im_focals"][:, 0].clone())


def _rot_angle_deg(a, b):
    return torch.rad2deg(roma.rotmat_to_rotvec(a.transpose(-1, -2) @ b).norm(dim=-1))


def test_image_confidence_is_official_im_conf(ga):
    p = _pairs(ga)
    assert torch.equal(image_confidence(p.edges, p.conf_i, p.conf_j, 4), ga["out_im_conf"])


def _max_rel(a, b):
    return float(((a - b).abs() / b.abs()).max())


def test_mst_init_matches_official(ga, ga_json):
    """Same PnP cost as OpenCV's SQPnP and per-edge registration: the official init, within twice the official
    code's own float32 spread (run here, it misses its recording by 3.4e-7 in pw_quat, 5.2e-6 in pw_log_trans, as
    our init does; bounds 8.3e-7 and 1.6e-5: official_align_spread.json, quantities init_*)."""
    p = _pairs(ga)
    im_conf = image_confidence(p.edges, p.conf_i, p.conf_j, 4)
    params = init_mst(p.edges.tolist(), p.pts_i, p.pts_j_in_i, p.conf_i, p.conf_j, im_conf, 3.0)
    official = _official_init(ga)
    for name in ("pw_quat", "pw_log_trans", "pw_log_scale", "im_quat", "im_log_trans", "im_log_depth", "im_focal"):
        within(name, float((getattr(params, name) - getattr(official, name)).abs().max()),
               SPREAD_FACTOR * official_spread(f"init_max_abs_dev_{name}"))
    rot, trans = camera_poses(params)
    within("init poses", max(float((rot - ga["init_poses"][:, :3, :3]).abs().max()),
                             float((trans - ga["init_poses"][:, :3, 3]).abs().max())),
           SPREAD_FACTOR * official_spread("init_cam2world_max_abs_dev"))
    within("init focals", _max_rel(focals_of(params), ga["init_focals"][:, 0]),
           SPREAD_FACTOR * official_spread("init_focal_max_rel_dev"))
    within("init depths", _max_rel(params.im_log_depth.exp().view(4, 32, 48), ga["init_depth"]),
           SPREAD_FACTOR * official_spread("init_depth_max_rel_dev"))
    within("init edge scales", _max_rel(pw_scales(params.pw_log_scale), ga["init_pw_scale"]),
           SPREAD_FACTOR * official_spread("init_pw_scale_max_rel_dev"))
    data = prepare_edges(p.edges, p.pts_i, p.pts_j_in_i, p.conf_i, p.conf_j, 4)
    within("init loss", abs(float(objective(params, data)) / ga_json["init_loss_after_mst"] - 1),
           SPREAD_FACTOR * official_spread("init_loss_rel_dev"))


def test_hand_written_gradient_equals_autograd(ga):
    p = _pairs(ga)
    data = prepare_edges(p.edges, p.pts_i, p.pts_j_in_i, p.conf_i, p.conf_j, 4)
    data64 = dataclasses.replace(data, points_h=data.points_h.double(), weights=data.weights.double(),
                                 grid=data.grid.double(), pp=data.pp.double())
    # a perturbed official init, so that no gradient is special (the reference camera's zero translation is kept)
    gen = torch.Generator().manual_seed(0)
    params = RawParams(*[(t.double() + 0.01 * torch.randn(t.shape, generator=gen, dtype=torch.float64))
                         for t in _official_init(ga).tensors()])
    leaves = RawParams(*[t.clone().requires_grad_() for t in params.tensors()])
    loss_ref = reference_objective(leaves, data64)
    grads_ref = torch.autograd.grad(loss_ref, leaves.tensors())
    loss, grads = loss_and_grads(params, data64)
    assert float(loss) == pytest.approx(float(loss_ref.detach()), rel=1e-12)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.allclose(g, g_ref, rtol=1e-9, atol=1e-15 + 1e-9 * float(g_ref.abs().max()))


LOOP_FACTOR = 4.0


def _official_final_loss_rel_dev(*stats) -> float:
    """Largest relative deviation of the official final loss from the recorded one (`final_loss_returned`, the loss
    before the last step, as the bench records it) in the given {"min", "max"} entries of the spread file."""
    recorded = load_json("dust3r_globalalign.json")["final_loss_returned"]
    return max(max(abs(st["max"] / recorded - 1), abs(st["min"] / recorded - 1)) for st in stats)


def test_adam_loop_from_official_init_is_as_accurate_as_official(ga, ga_json):
    p = _pairs(ga)
    data = prepare_edges(p.edges, p.pts_i, p.pts_j_in_i, p.conf_i, p.conf_j, 4)
    params, info = run_adam(_official_init(ga), data, niter=300, lr=0.01, schedule="cosine")
    curve, official = info["loss_curve"], ga["loss_curve"]
    # From the same init the reference is the official loop run here from it (one run per numeric path, so 4x
    # its largest deviation from the recording rather than 2x).
    loop = SPREAD["loop_from_fixture_init"]
    within("first 20 losses", float((curve[:20] - official[:20]).abs().max()),  # same steps until noise grows
           LOOP_FACTOR * loop["loss_curve_first20_max_abs_dev"]["max"])
    within("all losses", float((curve - official).abs().max()),  # the transient stays close ...
           LOOP_FACTOR * loop["loss_curve_max_abs_dev"]["max"])
    within("last 50 losses", float((curve[-50:] - official[-50:]).abs().max()),  # ... both settle at one minimum
           LOOP_FACTOR * loop["loss_curve_last50_max_abs_dev"]["max"])
    within("final loss", abs(float(objective(params, data)) / ga_json["loss_after_optimisation"] - 1),
           LOOP_FACTOR * _official_final_loss_rel_dev(loop["final_loss"]))
    rot, trans = camera_poses(params)
    within("poses", max(float((rot - ga["out_cam2world"][:, :3, :3]).abs().max()),
                        float((trans - ga["out_cam2world"][:, :3, 3]).abs().max())),
           LOOP_FACTOR * loop["cam2world_max_abs_dev"]["max"])
    # as accurate as the official aligner against the ground truth, on every metric
    ratios = ratios_to_official(ga, ga_json, rot, trans, focals_of(params), params.im_log_depth.exp().view(4, 32, 48))
    for metric in METRICS:
        within(metric, ratios[metric], SINGLE_RUN_RATIO_FACTOR * official_worst_ratio(metric))


def test_align_views_matches_official_loss_and_ground_truth(ga, ga_json):
    scene = align_views(_pairs(ga), niter=300, lr=0.01, schedule="cosine", init="mst", min_conf_thr=3.0)
    assert scene.info["mode"] == "optimizer" and scene.info["iterations"] == 300
    assert scene.info["loss"] <= 1.01 * OFFICIAL_FINAL_LOSS
    # Against the recording, within twice the official aligner's own deviation from it (official_spread).
    within("final loss", abs(scene.info["loss"] / ga_json["final_loss_returned"] - 1),
           SPREAD_FACTOR * _official_final_loss_rel_dev(SPREAD["unperturbed"]["final_loss"], ROUNDING["final_loss"]))
    curve = scene.info["loss_curve"]
    assert curve.shape == (300,)
    within("init loss", abs(float(curve[0]) / ga_json["init_loss_after_mst"] - 1),
           SPREAD_FACTOR * official_spread("init_loss_rel_dev"))
    within("last 50 losses", float((curve[-50:] - ga["loss_curve"][-50:]).abs().max()),
           SPREAD_FACTOR * official_spread("loss_curve_last50_max_abs_dev"))
    assert torch.equal(scene.conf, ga["out_im_conf"])  # a max over edges: no arithmetic, bitwise by construction
    within("poses", float((scene.cameras.cam_to_world - ga["out_cam2world"]).abs().max()),
           SPREAD_FACTOR * official_spread("cam2world_max_abs_dev"))
    within("depths", float((scene.depths - ga["out_depth"]).abs().max()),
           SPREAD_FACTOR * official_spread("depth_max_abs_dev"))
    # ground-truth errors of this one run: anywhere in the official distribution (the mean: next test)
    ratios = ratios_to_official(ga, ga_json, scene.cameras.cam_to_world[:, :3, :3],
                                 scene.cameras.cam_to_world[:, :3, 3], scene.cameras.focals, scene.depths)
    for metric in METRICS:
        within(metric, ratios[metric], SINGLE_RUN_RATIO_FACTOR * official_worst_ratio(metric))
    # the scene is self-consistent: world points are the depths back-projected through the cameras (a few float32
    # operations on values of magnitude |depth|: 16 eps of it)
    K, c2w = scene.cameras.intrinsics, scene.cameras.cam_to_world
    cam = (scene.pts3d - c2w[:, None, None, :3, 3]) @ c2w[:, None, :3, :3]
    assert_rel(cam[..., 2], scene.depths, 16 * EPS32 * float(scene.pts3d.abs().max() / scene.depths.abs().max()))
    torch.testing.assert_close(cam[..., 0] / cam[..., 2] * K[:, 0, 0, None, None] + 24,
                               torch.arange(48.).expand(4, 32, 48), rtol=0, atol=1e-3)  # pixels


def test_ground_truth_errors_no_worse_than_official_over_the_same_perturbations(ga, ga_json):
    """The issue's criterion ("as accurate as the official aligner"), made robust to float32 rounding.

    After 300 steps the fixture's problem ends in one of two equally good states (same loss to 1e-5; worst relative
    rotation 0.0067 or 0.0099 deg, camera-centre RMSE 0.93x or 1.12x of the recording), and float32 rounding
    decides which: the official code lands on the first on the CPU that recorded the fixture, on the second on this
    one (all 30 of its runs at 2e-7 input noise stay there). Inputs x (1 + 2e-5 N(0, 1)), still 250x below the
    fixture's own 0.5 % noise, sample both, as different CPUs do. Over the very same 30 perturbed inputs as the
    official runs in official_align_spread.json, our MEAN error on every metric must not exceed the official
    aligner's WORST (over 5 numeric paths x 30 runs), and our mean final loss must lie in its range.

    Measured under five numeric paths, our mean / the official worst: point 1.00008-1.00015 / 1.00049, centres
    1.043-1.086 / 1.194, rotations 0.980-0.989 / 1.023, worst relative rotation 1.174-1.269 / 1.364, focal
    0.958-0.968 / 1.025, depth 1.007-1.013 / 1.026. A 30-run mean moves by ~sd/5.5 (e.g. 0.002 for depth), 6-30x
    less than those margins; and even if all 30 runs land on the worse end state (as all official 2e-7 runs on the
    default path did: means 1.0002, 1.109, 0.983, 1.309, 0.972, 1.016) every mean stays under its bound. Confidence weights not log'd (point error 1.063x), one edge missing from the loss
    (1.041x) and a wrong-sign depth gradient (272x) fail here."""
    base = _pairs(ga)
    runs, losses = [], []
    for seed in range(GT_RUNS):
        scene = align_views(perturbed(base, seed, GT_NOISE), niter=300, lr=0.01, schedule="cosine", init="mst",
                            min_conf_thr=3.0)
        c2w = scene.cameras.cam_to_world
        runs.append(ratios_to_official(ga, ga_json, c2w[:, :3, :3], c2w[:, :3, 3], scene.cameras.focals,
                                       scene.depths))
        losses.append(scene.info["loss"])
    for metric in METRICS:
        within(f"mean {metric} / recorded", statistics.mean(run[metric] for run in runs),
               BASINS[f"ratio_{metric}"]["max"])
    assert BASINS["final_loss"]["min"] <= statistics.mean(losses) <= BASINS["final_loss"]["max"]


PAIRVIEWER_REL = 16 * EPS32


def test_pairviewer_two_view_path(ga):
    edges = ga["in_edges"].tolist()
    select = [edges.index([1, 0]), edges.index([0, 1])]
    scene = align_views(_pairs(ga, select))
    assert scene.info["mode"] == "pairviewer"
    # No optimisation: a short float32 chain (Weiszfeld focal, PnP, a 4x4 inverse, 3-term sums), so 16 eps of each
    # tensor's magnitude. Measured under five numeric paths: focal and poses exact, depths <= 0.62 eps, points
    # <= 1.25 eps (9.5e-7 on points of magnitude 6.4, which an absolute 1e-6 missed by 5 %).
    torch.testing.assert_close(scene.cameras.focals, ga["pairviewer_focal"], rtol=PAIRVIEWER_REL, atol=0)
    assert torch.equal(scene.cameras.intrinsics[:, :2, 2], ga["pairviewer_pp"])  # (W/2, H/2): exact by construction
    assert_rel(scene.cameras.cam_to_world, ga["pairviewer_cam2world"], PAIRVIEWER_REL)
    assert_rel(scene.depths, ga["pairviewer_depth"], PAIRVIEWER_REL)
    assert_rel(scene.pts3d, ga["pairviewer_pts3d"], PAIRVIEWER_REL)
    optimised = align_views(_pairs(ga, select), niter=20, two_view_fast_path=False)
    assert optimised.info["mode"] == "optimizer" and len(optimised.info["loss_curve"]) == 20


def test_callback_once_per_step_and_interrupt_stops():
    pairs, _ = make_synthetic_pairs(3, 12, 16)
    steps = []
    align_views(pairs, niter=7, callback=lambda step, total: steps.append((step, total)))
    assert steps == [(k, 7) for k in range(1, 8)]

    class Interrupted(Exception):
        pass

    def interrupt(step, total):
        steps.append(step)
        if step == 3:
            raise Interrupted()

    steps.clear()
    with pytest.raises(Interrupted):
        align_views(pairs, niter=50, callback=interrupt)
    assert steps == [1, 2, 3]


def test_inputs_from_inference_mode_are_accepted_and_untouched():
    pairs, _ = make_synthetic_pairs(3, 12, 16)
    with torch.inference_mode():
        frozen = pairs.to("cpu", torch.float32)
        frozen = PairPredictions(*(t.clone() for t in (frozen.edges, frozen.pts_i, frozen.pts_j_in_i,
                                                        frozen.conf_i, frozen.conf_j)))
        scene = align_views(frozen, niter=5)
    assert torch.isfinite(scene.pts3d).all()
    assert torch.equal(frozen.pts_i, pairs.pts_i)


def test_bad_inputs_raise_input_error():
    pairs, _ = make_synthetic_pairs(4, 12, 16)
    keep = [e for e, (i, j) in enumerate(pairs.edges.tolist()) if {i, j} in ({0, 1}, {2, 3})]
    split = PairPredictions(pairs.edges[keep], pairs.pts_i[keep], pairs.pts_j_in_i[keep], pairs.conf_i[keep],
                            pairs.conf_j[keep])
    with pytest.raises(InputError, match="does not connect"):
        align_views(split, niter=1)
    nan = pairs.pts_j_in_i.clone()
    nan[0, 3, 4, 1] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        align_views(dataclasses.replace(pairs, pts_j_in_i=nan), niter=1)
    missing = pairs.edges.clone()
    missing[missing == 3] = 4  # view 3 never appears
    with pytest.raises(InputError, match="not covered"):
        align_views(dataclasses.replace(pairs, edges=missing), niter=1)
    self_pair = pairs.edges.clone()
    self_pair[0] = torch.tensor([2, 2])
    with pytest.raises(InputError, match="self-pair"):
        align_views(dataclasses.replace(pairs, edges=self_pair), niter=1)
    with pytest.raises(InputError, match="schedule"):
        align_views(pairs, niter=1, schedule="step")
    with pytest.raises(InputError, match="positive"):
        align_views(dataclasses.replace(pairs, conf_i=pairs.conf_i * 0), niter=1)


def test_clean_pointcloud_lowers_occluded_less_confident_points():
    H, W = 6, 8
    K = torch.tensor([[10.0, 0, W / 2], [0, 10.0, H / 2], [0, 0, 1]]).expand(2, 3, 3)
    c2w = torch.eye(4).expand(2, 4, 4)
    depths = torch.stack((torch.full((H, W), 1.0), torch.full((H, W), 2.0)))
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    pts = torch.stack([torch.stack(((u - W / 2) * d / 10, (v - H / 2) * d / 10, d), -1) for d in depths])
    conf = torch.stack((torch.full((H, W), 2.0), torch.full((H, W), 5.0)))
    conf[0, 0, 0] = 9.0  # more confident than view 1 there: kept
    new = clean_pointcloud(conf, c2w, K, depths, pts)
    expected = torch.zeros(H, W)
    expected[0, 0] = 9.0
    assert torch.equal(new[0], expected)  # view 0 floats in front of view 1's more confident surface
    assert torch.equal(new[1], conf[1])  # view 1 lies behind view 0's surface: untouched
    assert torch.equal(conf[0, 1], torch.full((W,), 2.0))  # input not modified
    assert torch.equal(confidence_masks(new, 3.0), new > 3.0)


def test_clean_scene_on_fixture_only_lowers_confidence(ga):
    scene = align_views(_pairs(ga), niter=30)
    cleaned = clean_scene(scene)
    assert (cleaned.conf <= scene.conf).all()
    lowered = cleaned.conf < scene.conf
    assert lowered.any() and (cleaned.conf[lowered] == 0).all()


def test_synthetic_generator_reproduces_fixture_geometry(ga):
    depth = render_depth(ga["gt_cam2world"].double(), float(ga["gt_focal"][0]), 32, 48)
    assert (depth - ga["gt_depth"]).abs().max() < 1e-4


def test_synthetic_scene_aligns_at_other_sizes():
    pairs, gt = make_synthetic_pairs(n_views=5, height=16, width=24, seed=3)
    scene = align_views(pairs, niter=200)
    err = errors_vs_gt(scene.cameras.cam_to_world, scene.cameras.focals, scene.depths, scene.pts3d,
                       gt["cam_to_world"], gt["focal"], gt["depth"])
    assert err["point_err_mean"] < 0.02  # scene scale ~1.9
    assert max(err["cam_rot_err_deg"]) < 0.1
    assert max(err["focal_rel_err"]) < 0.01
