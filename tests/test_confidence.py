"""reconx_core.confidence on synthetic ground truth: a camera path between two reference views through the
synthetic scene of tests/synthetic_pairs.py (ray-cast depth), DUSt3R-like pair predictions on the video graph."""

import math

import numpy as np
import pytest
import roma
import torch

import reconx_core.dust3r as dust3r_pkg
from reconx_core.confidence import (geometric_consistency, map_confidence, map_confidence_from_pairs,
                                    network_size, reference_similarity, video_pair_graph)
from reconx_core.errors import InputError
from reconx_core.testing import tiny_dust3r
from reconx_core.types import Cameras, PairPredictions, Views
from tests.synthetic_pairs import render_depth

# Tolerances after the similarity fit onto the two known reference cameras (noise 0.5 % per coordinate).
# Measured: rotation <= 0.015 deg (clean) / 0.04 deg (corrupted frames), centre <= 0.04 % / 0.14 %, focal <= 0.12 %.
ROT_TOL_DEG = 0.1
CENTRE_TOL = 0.005  # relative to the distance between the two reference camera centres
FOCAL_TOL = 0.005


pytestmark = [pytest.mark.usefixtures("one_thread"),  # see tests/conftest.py
              pytest.mark.numeric]  # float32 alignment: CI runs it again on a second numeric path (test-numeric)


def _path_cameras(n: int) -> torch.Tensor:
    """(n, 4, 4) float64 poses on a smooth arc from -30 to +30 degrees (height varies), looking at the spheres."""
    target = np.array((0.0, 0.3, 0.8))
    poses = []
    for t in np.linspace(0, 1, n):
        angle = math.radians(-30 + 60 * t)
        centre = np.array((3.2 * math.sin(angle), -0.45 - 0.25 * math.sin(math.pi * t), 0.5 - 3.2 * math.cos(angle)))
        z = (target - centre) / np.linalg.norm(target - centre)
        x = np.cross(z, (0.0, 1.0, 0.0))
        x /= np.linalg.norm(x)
        pose = np.eye(4)
        pose[:3, :3] = np.stack((x, np.cross(z, x), z), axis=1)
        pose[:3, 3] = centre
        poses.append(pose)
    return torch.from_numpy(np.stack(poses))


def _stage1_similarity():
    """The first stage's world frame: an arbitrary similarity of the ray-casting frame (scale 1.7)."""
    rot = roma.rotvec_to_rotmat(torch.tensor((0.3, -0.5, 0.2), dtype=torch.float64))
    return 1.7, rot, torch.tensor((0.3, -0.2, 1.0), dtype=torch.float64)


def make_video(n_frames=12, height=32, width=48, refs=(0, 11), window=3, corrupt=None, seed=0, noise=0.005):
    """Pair predictions of frames along `_path_cameras` on `video_pair_graph`, plus ground truth.

    corrupt: {frame: depth factor}: inside the box rows [H/4, 3H/4), cols [W/3, 2W/3) that frame's depth is
    multiplied by the factor in every prediction that involves it, with a HIGH confidence (1 + e^3.5) there.
    Returns pairs, gt {"cam_to_world" (S, 4, 4) in the stage-1 world, "focal", "box" (H, W) bool}.
    """
    c2w = _path_cameras(n_frames)
    focal = 1.1 * width / (2 * math.tan(math.radians(30)))
    depth = render_depth(c2w, focal, height, width)
    box = torch.zeros(height, width, dtype=torch.bool)
    box[height // 4: 3 * height // 4, width // 3: 2 * width // 3] = True
    for frame, factor in (corrupt or {}).items():
        depth[frame][box] *= factor
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                          indexing="ij")
    cam = torch.stack(((u - width / 2) * depth / focal, (v - height / 2) * depth / focal, depth), dim=-1)
    world = cam @ c2w[:, None, :3, :3].transpose(-1, -2) + c2w[:, None, None, :3, 3]
    edges = video_pair_graph(n_frames, torch.tensor(refs), window)
    rng = np.random.default_rng(seed)
    pts_i, pts_j, conf_i, conf_j = [], [], [], []
    for i, j in edges.tolist():
        s = rng.uniform(0.5, 2.0)
        w2i = torch.linalg.inv(c2w[i])
        for out, pts in ((pts_i, cam[i]), (pts_j, world[j] @ w2i[:3, :3].T + w2i[:3, 3])):
            out.append(pts * s * (1 + noise * torch.from_numpy(rng.standard_normal(pts.shape))))
        for out, view, mu in ((conf_i, i, 1.5), (conf_j, j, 1.2)):
            c = torch.from_numpy(1 + np.exp(rng.normal(mu, 0.5, (height, width))))
            if view in (corrupt or {}):
                c[box] = 1 + math.exp(3.5)
            out.append(c)
    pairs = PairPredictions(edges, torch.stack(pts_i).float(), torch.stack(pts_j).float(),
                            torch.stack(conf_i).float(), torch.stack(conf_j).float())
    s0, r0, t0 = _stage1_similarity()
    gt = c2w.clone()
    gt[:, :3, :3] = r0 @ c2w[:, :3, :3]
    gt[:, :3, 3] = s0 * c2w[:, :3, 3] @ r0.T + t0
    return pairs, {"cam_to_world": gt.float(), "focal": focal, "box": box}


def _camera_errors(c2w, gt, refs):
    rot = torch.rad2deg(roma.rotmat_to_rotvec(gt[:, :3, :3].transpose(1, 2) @ c2w[:, :3, :3]).norm(dim=-1))
    baseline = float((gt[refs[0], :3, 3] - gt[refs[-1], :3, 3]).norm())
    centre = (c2w[:, :3, 3] - gt[:, :3, 3]).norm(dim=-1) / baseline
    return rot, centre


@pytest.fixture(scope="module")
def clean_run():
    pairs, gt = make_video()
    refs = [0, 11]
    return map_confidence_from_pairs(pairs, refs, gt["cam_to_world"][refs], niter=300), gt, refs


def test_video_pair_graph_edges():
    edges = video_pair_graph(8, torch.tensor([0, 7]), window=2)
    listed = [tuple(e) for e in edges.tolist()]
    expected = {(f, f + d) for f in range(8) for d in (1, 2) if f + d < 8}
    expected |= {(0, f) for f in range(1, 8)} | {(f, 7) for f in range(7)}
    assert set(listed[:len(listed) // 2]) == expected
    assert listed[len(listed) // 2:] == [(j, i) for i, j in listed[:len(listed) // 2]]
    assert len(set(listed)) == len(listed) and all(i != j for i, j in listed)
    # three references, nearest links: frame 2 reaches its segment's ends 0 and 4 but not 8
    edges3 = {tuple(e) for e in video_pair_graph(9, [0, 4, 8], window=1).tolist()}
    assert {(2, 0), (2, 4), (0, 4), (4, 8)} <= edges3 and (2, 8) not in edges3 and (0, 8) not in edges3
    every = {tuple(e) for e in video_pair_graph(9, [0, 4, 8], window=1, reference_links="all").tolist()}
    assert (2, 8) in every and (0, 8) in every
    # far fewer pairs than the complete graph for a long video
    assert video_pair_graph(48, [0, 47]).shape[0] < 48 * 47 / 3


def test_reference_similarity_recovers_a_known_similarity_from_two_cameras():
    c2w = _path_cameras(2)
    s0, r0, t0 = 0.37, roma.rotvec_to_rotmat(torch.tensor((1.0, 0.4, -2.0), dtype=torch.float64)), \
        torch.tensor((5.0, -1.0, 2.0), dtype=torch.float64)
    known = c2w.clone()
    known[:, :3, :3] = r0 @ c2w[:, :3, :3]
    known[:, :3, 3] = s0 * c2w[:, :3, 3] @ r0.T + t0
    scale, rot, trans = reference_similarity(c2w, known)
    assert abs(scale - s0) < 1e-9 and torch.allclose(rot, r0, atol=1e-9) and torch.allclose(trans, t0, atol=1e-9)


def test_cameras_match_ground_truth_in_reference_frame(clean_run):
    scene, gt, refs = clean_run
    rot, centre = _camera_errors(scene.cameras.cam_to_world, gt["cam_to_world"], refs)
    print(f"max rotation error {rot.max():.3f} deg, max centre error {100 * centre.max():.2f} % of the baseline")
    assert float(rot.max()) < ROT_TOL_DEG and float(centre.max()) < CENTRE_TOL
    focal_err = (scene.cameras.focals / gt["focal"] - 1).abs()
    assert float(focal_err.max()) < FOCAL_TOL
    # points and depths follow the cameras: each frame's points re-project onto its own pixel grid at its depth
    w2c = torch.linalg.inv(scene.cameras.cam_to_world)
    cam = scene.pts3d @ w2c[:, None, :3, :3].transpose(-1, -2) + w2c[:, None, None, :3, 3]
    assert torch.allclose(cam[..., 2], scene.depths, rtol=1e-4, atol=1e-5)
    # on clean data almost every pixel passes the consistency test and the confidence is a proper weight
    assert 0 <= float(scene.conf.min()) and float(scene.conf.max()) <= 1
    assert float((scene.info["geometric_term"] > 0.8).float().mean()) > 0.9
    assert float(scene.info["reference_rot_err_deg"].max()) < ROT_TOL_DEG


def test_corrupted_regions_get_low_confidence_despite_high_dust3r_confidence():
    corrupt = {4: 1.3, 8: 0.75}  # one region pushed back, one pulled forward
    pairs, gt = make_video(corrupt=corrupt, seed=1)
    refs = [0, 11]
    scene = map_confidence_from_pairs(pairs, refs, gt["cam_to_world"][refs], niter=300)
    box = gt["box"]
    bad = torch.stack([scene.conf[f][box] for f in corrupt])
    clean_frames = [f for f in range(len(scene)) if f not in corrupt]
    clean_same_box = scene.conf[clean_frames][:, box]
    clean_elsewhere = torch.stack([scene.conf[f][~box] for f in corrupt])
    print(f"confidence: corrupted {bad.mean():.3f}, same region in clean frames {clean_same_box.mean():.3f}, "
          f"rest of the corrupted frames {clean_elsewhere.mean():.3f}")
    # DUSt3R itself was sure of the corrupted regions ...
    assert float(torch.stack([scene.info["dust3r_term"][f][box] for f in corrupt]).min()) > 0.99
    # ... yet the mapped confidence is low there, and neither the neighbours nor the rest of the frame get blamed
    assert float(bad.mean()) < 0.25 * float(clean_same_box.mean())
    assert float(bad.mean()) < 0.25 * float(clean_elsewhere.mean())
    assert float(clean_same_box.mean()) > 0.6
    # the cameras of the corrupted frames are still close to the truth
    rot, centre = _camera_errors(scene.cameras.cam_to_world, gt["cam_to_world"], refs)
    assert float(rot.max()) < 2 * ROT_TOL_DEG and float(centre.max()) < 2 * CENTRE_TOL


def test_geometric_consistency_occlusion_is_not_an_error():
    """Frames on both sides of a middle frame (5 degrees apart): what one neighbour cannot see (occluded or out of
    view) the other confirms (max over neighbours); a point seen by no neighbour takes `unseen`."""
    c2w = _path_cameras(12)[4:7].float()
    focal = 1.1 * 48 / (2 * math.tan(math.radians(30)))
    depth = render_depth(c2w.double(), focal, 32, 48).float()
    K = torch.tensor([[focal, 0, 24], [0, focal, 16], [0, 0, 1]]).expand(3, 3, 3)

    def passing(edges):
        g = geometric_consistency(depth, c2w, K, torch.tensor(edges), depth_tol=0.02, unseen=0.25)[1]
        return float((g > 0.9).float().mean())

    left, right, both = passing([[1, 0]]), passing([[1, 2]]), passing([[1, 0], [1, 2]])
    assert both > 0.97 and both > max(left, right) + 0.05
    lonely = geometric_consistency(depth, c2w, K, torch.tensor([[0, 1]]), unseen=0.25)[2]
    assert torch.equal(lonely, torch.full_like(lonely, 0.25))
    turned = c2w.clone()  # a neighbour looking the other way sees none of the middle frame's points
    turned[0, :3, :3] = turned[0, :3, :3] @ torch.diag(torch.tensor([-1.0, 1.0, -1.0]))
    behind = geometric_consistency(depth, turned, K, torch.tensor([[1, 0]]), unseen=0.25)[1]
    assert torch.equal(behind, torch.full_like(behind, 0.25))
    # a middle frame whose depth is 10 % off everywhere fails against both neighbours (except at a few depth edges,
    # where the 4-pixel depth interval is lenient)
    for factor in (0.9, 1.1):
        wrong = depth.clone()
        wrong[1] *= factor
        g = geometric_consistency(wrong, c2w, K, torch.tensor([[1, 0], [1, 2]]), depth_tol=0.02)[1]
        assert float((g < 0.1).float().mean()) > 0.85


def test_map_confidence_brings_cameras_back_to_the_frame_size(monkeypatch):
    """A stand-in for DUSt3R returns ground-truth predictions at the network size 64x96; the frames are 96x144."""
    pairs, gt = make_video(n_frames=6, height=64, width=96, refs=(0, 5), window=2, seed=2)
    s = 64 / 96
    monkeypatch.setattr(dust3r_pkg, "infer_pairs", lambda model, images, graph, batch_size, callback: pairs)
    ref_cams = Cameras(gt["cam_to_world"][[0, 5]], torch.eye(3).expand(2, 3, 3).clone(), 144, 96)
    views = Views(frames=torch.rand(6, 3, 96, 144), reference_index=torch.tensor([0, 5]), reference_cameras=ref_cams)
    out = map_confidence(torch.nn.Linear(1, 1), views, window=2, niter=200, network_hw=(64, 96))
    assert out.conf.shape == (6, 96, 144) and out.pts3d.shape == (6, 96, 144, 3)
    assert (out.cameras.width, out.cameras.height) == (144, 96)
    K = out.cameras.intrinsics
    assert float((K[:, 0, 0] * s / gt["focal"] - 1).abs().max()) < FOCAL_TOL
    assert torch.allclose(K[:, 0, 2], torch.full((6,), (48 + 0.5) / s - 0.5), atol=1e-4)
    rot, centre = _camera_errors(out.cameras.cam_to_world, gt["cam_to_world"], [0, 5])
    assert float(rot.max()) < ROT_TOL_DEG and float(centre.max()) < CENTRE_TOL
    # frame-size points project through the frame-size cameras onto their own pixels
    w2c = torch.linalg.inv(out.cameras.cam_to_world)
    cam = out.pts3d @ w2c[:, None, :3, :3].transpose(-1, -2) + w2c[:, None, None, :3, 3]
    uv = (cam @ K[:, None].transpose(-1, -2))[..., :2] / cam[..., 2:3]
    assert abs(float(uv[:, 10, 30, 0].max()) - 30) < 1e-2 and abs(float(uv[:, 10, 30, 1].min()) - 10) < 1e-2
    assert abs(float(uv[:, 10, 30, 0].min()) - 30) < 1e-2 and abs(float(uv[:, 10, 30, 1].max()) - 10) < 1e-2


def test_bad_inputs_raise_input_error():
    pairs, gt = make_video(n_frames=4, refs=(0, 3), window=1)
    with pytest.raises(InputError):
        video_pair_graph(1, [0])
    with pytest.raises(InputError):
        video_pair_graph(5, [0, 5])
    with pytest.raises(InputError):
        map_confidence_from_pairs(pairs, [0, 4], gt["cam_to_world"][[0, 3]], niter=1)
    with pytest.raises(InputError):
        map_confidence_from_pairs(pairs, [0], gt["cam_to_world"][[0]], niter=1)
    with pytest.raises(InputError):
        map_confidence_from_pairs(pairs, [0, 3], gt["cam_to_world"][[0, 1, 3]], niter=1)
    with pytest.raises(InputError):
        map_confidence_from_pairs(pairs, [0, 3], gt["cam_to_world"][[0, 0]], niter=1)  # one centre: no scale
    one = Cameras(torch.eye(4)[None], torch.eye(3)[None], 64, 64)
    with pytest.raises(InputError):
        map_confidence(tiny_dust3r(), Views(torch.rand(1, 3, 64, 64), torch.tensor([0]), one))
    with pytest.raises(InputError):  # reference cameras of another size than the frames
        Views(torch.rand(3, 3, 64, 64), torch.tensor([0, 2]),
              Cameras(torch.eye(4).expand(2, 4, 4), torch.eye(3).expand(2, 3, 3), 32, 64))
    two = Cameras(gt["cam_to_world"][[0, 3]], torch.eye(3).expand(2, 3, 3), 64, 64)
    with pytest.raises(InputError):
        map_confidence(tiny_dust3r(), Views(torch.rand(3, 3, 64, 64), torch.tensor([0, 2]), two),
                       network_hw=(60, 64))


def test_network_size():
    assert network_size(320, 512, 512) == (320, 512)
    assert network_size(576, 1024, 512) == (288, 512)
    assert network_size(320, 512, 224) == (224, 352)


def test_map_confidence_smoke_with_tiny_dust3r():
    """Random weights: shapes, devices, ranges and progress only (no reconstruction quality); the network sees the
    64x48 frames at 80x64 and the results come back at 64x48."""
    torch.manual_seed(0)
    S, H, W = 4, 48, 64
    cams = Cameras(_path_cameras(2).float(), torch.tensor([[50.0, 0, 32], [0, 50, 24], [0, 0, 1]]).expand(2, 3, 3),
                   W, H)
    views = Views(torch.rand(S, 3, H, W), torch.tensor([0, S - 1]), cams, info={"seed": 0})
    steps = []
    out = map_confidence(tiny_dust3r(), views, window=1, niter=10, network_hw=(64, 80),
                         callback=lambda step, total: steps.append((step, total)))
    assert out.frames is views.frames and out.info["seed"] == 0
    assert out.info["confidence"]["network_hw"] == (64, 80)
    assert len(out.cameras) == S and (out.cameras.width, out.cameras.height) == (W, H)
    assert out.conf.shape == (S, H, W) and out.pts3d.shape == (S, H, W, 3)
    assert float(out.conf.min()) >= 0 and float(out.conf.max()) <= 1
    assert bool(torch.isfinite(out.pts3d).all()) and bool(torch.isfinite(out.cameras.cam_to_world).all())
    assert {t.device for t in (out.conf, out.pts3d, out.cameras.cam_to_world)} == {views.device}
    totals = {t for _, t in steps}
    assert len(totals) == 1 and [s for s, _ in steps] == sorted(s for s, _ in steps)
    assert min(s for s, _ in steps) >= 1 and max(s for s, _ in steps) == totals.pop()


def test_coinciding_reference_centres_take_the_scale_from_depths():
    """A camera turning on the spot: centres carry no scale; the references' depths do."""
    from reconx_core.confidence import reference_similarity

    rot = roma.rotvec_to_rotmat(torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.4, 0.0]], dtype=torch.float64))
    known = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    known[:, :3, :3] = rot
    known[:, :3, 3] = torch.tensor([1.0, 2.0, 3.0])
    aligned = known.clone()
    aligned[:, :3, 3] = 0.0
    with pytest.raises(InputError, match="one camera centre"):
        reference_similarity(aligned, known)
    scale, R, t = reference_similarity(aligned, known, depth_scale=2.5)
    assert scale == 2.5 and torch.allclose(R, torch.eye(3, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(t, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
