"""reconx_core.align against the official DUSt3R global alignment (fixture dust3r_globalalign, README A3)."""

import dataclasses

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
# Float32 rounding alone moves the fixture's ground-truth errors after 300 steps. From our init, 30 runs whose inits
# differ by 2e-7 relative noise span 0.93-1.02x of the official value on every metric; a single run is held to
# that, and `test_ground_truth_errors_no_worse_than_official_over_rounding_noise` holds the mean to <= 1. (The
# official aligner itself, on inputs perturbed by 2e-7, spans 0.89-1.35x of its recorded worst relative rotation
# and 0.92-1.18x of its camera-centre RMSE, with ours within 1.5 % of it run for run: bench/align_rounding_spread.py.)
ROUNDING_SPREAD = 1.02


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


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


def test_mst_init_matches_official(ga, ga_json):
    """Same PnP cost as OpenCV's SQPnP and per-edge registration: the official init to float32 rounding."""
    p = _pairs(ga)
    im_conf = image_confidence(p.edges, p.conf_i, p.conf_j, 4)
    params = init_mst(p.edges.tolist(), p.pts_i, p.pts_j_in_i, p.conf_i, p.conf_j, im_conf, 3.0)
    rot, trans = camera_poses(params)
    assert (rot - ga["init_poses"][:, :3, :3]).abs().max() < 1e-6
    assert (trans - ga["init_poses"][:, :3, 3]).abs().max() < 1e-6
    official = _official_init(ga)
    for name in ("pw_quat", "pw_log_trans", "pw_log_scale", "im_quat", "im_log_trans", "im_focal"):
        assert (getattr(params, name) - getattr(official, name)).abs().max() < 2e-7, name
    assert torch.allclose(params.im_log_depth, official.im_log_depth, rtol=0, atol=1e-6)
    assert torch.allclose(focals_of(params), ga["init_focals"][:, 0], rtol=1e-6)
    assert torch.allclose(params.im_log_depth.exp().view(4, 32, 48), ga["init_depth"], rtol=2e-6, atol=0)
    assert torch.allclose(pw_scales(params.pw_log_scale), ga["init_pw_scale"], rtol=1e-6)
    data = prepare_edges(p.edges, p.pts_i, p.pts_j_in_i, p.conf_i, p.conf_j, 4)
    assert float(objective(params, data)) == pytest.approx(ga_json["init_loss_after_mst"], rel=1e-6)


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


def test_adam_loop_from_official_init_is_as_accurate_as_official(ga, ga_json):
    p = _pairs(ga)
    data = prepare_edges(p.edges, p.pts_i, p.pts_j_in_i, p.conf_i, p.conf_j, 4)
    params, info = run_adam(_official_init(ga), data, niter=300, lr=0.01, schedule="cosine")
    curve, official = info["loss_curve"], ga["loss_curve"]
    assert (curve[:20] - official[:20]).abs().max() < 1e-5  # same steps until float noise grows
    assert (curve - official).abs().max() < 1e-2  # the transient stays close ...
    assert (curve[-50:] - official[-50:]).abs().max() < 1e-4  # ... and both settle at the same minimum
    assert float(objective(params, data)) == pytest.approx(ga_json["loss_after_optimisation"], rel=1e-4)
    rot, trans = camera_poses(params)
    assert (rot - ga["out_cam2world"][:, :3, :3]).abs().max() < 5e-4
    assert (trans - ga["out_cam2world"][:, :3, 3]).abs().max() < 5e-4
    # as accurate as the official run against the ground truth, on every metric
    ratios = ratios_to_official(ga, ga_json, rot, trans, focals_of(params), params.im_log_depth.exp().view(4, 32, 48))
    assert max(ratios.values()) <= ROUNDING_SPREAD, ratios


def test_align_views_matches_official_loss_and_ground_truth(ga, ga_json):
    scene = align_views(_pairs(ga), niter=300, lr=0.01, schedule="cosine", init="mst", min_conf_thr=3.0)
    assert scene.info["mode"] == "optimizer" and scene.info["iterations"] == 300
    assert scene.info["loss"] <= 1.01 * OFFICIAL_FINAL_LOSS
    assert scene.info["loss"] == pytest.approx(ga_json["final_loss_returned"], rel=1e-5)
    curve = scene.info["loss_curve"]
    assert curve.shape == (300,)
    assert abs(float(curve[0]) - float(ga["loss_curve"][0])) < 1e-6  # same init loss
    assert (curve[-50:] - ga["loss_curve"][-50:]).abs().max() < 1e-4
    assert torch.equal(scene.conf, ga["out_im_conf"])
    # the fixture README expects ~1e-4 after 300 float32 steps; measured 9.7e-5 (poses), 1.2e-4 (depths)
    assert (scene.cameras.cam_to_world - ga["out_cam2world"]).abs().max() < 2e-4
    assert (scene.depths - ga["out_depth"]).abs().max() < 3e-4
    # measured: loss 0.0240842 (official 0.0240842); error ratios to the official 0.96 (camera centres) to 1.008
    # (worst relative rotation, 0.00755 vs 0.00749 deg), inside the rounding spread
    ratios = ratios_to_official(ga, ga_json, scene.cameras.cam_to_world[:, :3, :3],
                                 scene.cameras.cam_to_world[:, :3, 3], scene.cameras.focals, scene.depths)
    assert max(ratios.values()) <= ROUNDING_SPREAD, ratios
    # the scene is self-consistent: world points are the depths back-projected through the cameras
    K, c2w = scene.cameras.intrinsics, scene.cameras.cam_to_world
    cam = (scene.pts3d - c2w[:, None, None, :3, 3]) @ c2w[:, None, :3, :3]
    assert torch.allclose(cam[..., 2], scene.depths, atol=1e-5)
    assert torch.allclose(cam[..., 0] / cam[..., 2] * K[:, 0, 0, None, None] + 24,
                          torch.arange(48.).expand(4, 32, 48), atol=1e-3)


def test_ground_truth_errors_no_worse_than_official_over_rounding_noise(ga, ga_json):
    """The issue's criterion, made robust to float32 rounding: over 30 runs whose inits differ by 2e-7 relative
    noise, our mean error ratio to the official run is <= 1 on every metric.

    Measured means: point 0.99994, camera centres 0.961, rotations 0.984, worst relative rotation 0.992,
    focal 0.954, depth 0.997. The PnP of the object-space cost this replaced gave 1.11 (camera centres) and
    1.31 (relative rotation) here, far outside the rounding spread."""
    p = _pairs(ga)
    im_conf = image_confidence(p.edges, p.conf_i, p.conf_j, 4)
    init = init_mst(p.edges.tolist(), p.pts_i, p.pts_j_in_i, p.conf_i, p.conf_j, im_conf, 3.0)
    data = prepare_edges(p.edges, p.pts_i, p.pts_j_in_i, p.conf_i, p.conf_j, 4)
    runs = []
    for seed in range(30):
        gen = torch.Generator().manual_seed(seed)
        noisy = RawParams(*[t * (1 + 2e-7 * torch.randn(t.shape, generator=gen)) for t in init.tensors()])
        params, _ = run_adam(noisy, data, niter=300, lr=0.01, schedule="cosine")
        rot, trans = camera_poses(params)
        runs.append(ratios_to_official(ga, ga_json, rot, trans, focals_of(params),
                                        params.im_log_depth.exp().view(4, 32, 48)))
    means = {key: sum(run[key] for run in runs) / len(runs) for key in runs[0]}
    assert len(means) == 6 and max(means.values()) <= 1.0, means


def test_pairviewer_two_view_path(ga):
    edges = ga["in_edges"].tolist()
    select = [edges.index([1, 0]), edges.index([0, 1])]
    scene = align_views(_pairs(ga, select))
    assert scene.info["mode"] == "pairviewer"
    assert torch.allclose(scene.cameras.focals, ga["pairviewer_focal"], rtol=1e-6)
    assert torch.equal(scene.cameras.intrinsics[:, :2, 2], ga["pairviewer_pp"])
    assert (scene.cameras.cam_to_world - ga["pairviewer_cam2world"]).abs().max() < 1e-6
    assert (scene.depths - ga["pairviewer_depth"]).abs().max() < 1e-6
    assert (scene.pts3d - ga["pairviewer_pts3d"]).abs().max() < 1e-6
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
