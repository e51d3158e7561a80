"""Point-cloud encoder: token count, deterministic FPS, normalisation invariance, chunking, scene filtering."""

import math

import pytest
import torch

from reconx_core.errors import InputError
from reconx_core.structure import PointCloudEncoder, farthest_point_sample, scene_points
from reconx_core.types import Cameras, Scene

pytestmark = pytest.mark.numeric  # float32 tolerances: CI runs it again on a second numeric path (test-numeric)


EPS32 = torch.finfo(torch.float32).eps


def _cloud(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, 3, generator=g) * torch.tensor([2.0, 1.0, 0.5]) + 3.0


@pytest.mark.parametrize("n", [1, 17, 100, 803])
def test_token_count_is_ceil_n_over_8(n):
    enc = PointCloudEncoder(dim=32, heads=4).eval()
    with torch.no_grad():
        out = enc(_cloud(n))
    assert out.shape == (1, math.ceil(n / 8), 32)
    assert torch.isfinite(out).all()


def test_farthest_point_sampling_is_deterministic_and_covers_the_cloud():
    line = torch.arange(64.0)[None, :, None].expand(1, 64, 3).contiguous()  # 64 points on a line
    idx = farthest_point_sample(line, 8)
    assert torch.equal(idx, farthest_point_sample(line, 8))
    assert idx.unique().numel() == 8
    assert idx[0, 0] in (31, 32)  # starts next to the centroid, not at a random point
    picked = line[0, idx[0]]
    cover = torch.cdist(line[0], picked).amin(dim=1).max()
    # k-center optimum for 64 points and 8 centres is ~4 steps (x sqrt(3) along the diagonal); FPS is a 2-approx
    assert cover <= 2 * 4 * math.sqrt(3) + 1e-4
    # and it beats the first-8 subset by far
    assert cover < torch.cdist(line[0], line[0, :8]).amin(dim=1).max() / 3


def test_encoder_is_invariant_to_scene_scale_and_translation():
    torch.manual_seed(0)
    enc = PointCloudEncoder(dim=32, heads=4).eval()
    pts = _cloud(200)
    with torch.no_grad():
        a = enc(pts)
        b = enc(pts * 7.5 - 4.0)
    # Float32 rounding of the moved points (a few eps of the normalised coordinates) is multiplied by the top Fourier
    # band, 2^7 pi = 402: bound 402 * 8 eps of the tokens' magnitude (3.8e-4 relative, 1.2e-3 here). Measured
    # 1.7e-5 to 3.8e-5 (the last with ATEN_CPU_CAPABILITY=default, 2.7x under the old absolute 1e-4).
    torch.testing.assert_close(b, a, rtol=0, atol=2 ** 7 * math.pi * 8 * EPS32 * float(a.abs().max()))
    with torch.no_grad():
        c = enc(pts * torch.tensor([1.0, 1.0, 3.0]))  # a real shape change does change the tokens
    assert (a - c).abs().max() > 1.0  # measured 4.27


def test_chunked_attention_equals_one_shot():
    torch.manual_seed(0)
    enc = PointCloudEncoder(dim=32, heads=4, chunk=4096).eval()
    pts = _cloud(300)
    with torch.no_grad():
        full = enc(pts)
        enc.chunk = 5
        chunked = enc(pts)
    # the same sums in other blocks: 16 eps of the tokens' magnitude; measured <= 2.1 eps on five numeric paths
    torch.testing.assert_close(chunked, full, rtol=0, atol=16 * EPS32 * float(full.abs().max()))


def test_encoder_trains_and_rejects_bad_points():
    enc = PointCloudEncoder(dim=16, heads=2)
    enc(_cloud(40)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    with pytest.raises(InputError, match="NaN"):
        enc(torch.full((1, 4, 3), float("nan")))
    with pytest.raises(InputError, match=r"\(B, N, 3\)"):
        enc(torch.zeros(4, 3))


def test_callback_reports_fps_progress():
    calls = []
    farthest_point_sample(_cloud(4096), 512, callback=lambda s, t: calls.append((s, t)))
    assert calls[-1] == (512, 512) and calls[0] == (256, 512)


def _scene(conf, min_conf=3.0):
    n, h, w = conf.shape
    g = torch.Generator().manual_seed(1)
    pts = torch.randn(n, h, w, 3, generator=g)
    cams = Cameras(torch.eye(4).expand(n, 4, 4).clone(), torch.eye(3).expand(n, 3, 3).clone(), w, h)
    return Scene(cams, pts[..., 2].abs(), pts, conf, torch.rand(n, 3, h, w, generator=g), min_conf=min_conf)


def test_scene_points_filters_by_confidence_and_caps_the_budget():
    conf = torch.ones(2, 4, 5)
    conf[0, :2] = 5.0  # 10 confident pixels in view 0
    conf[1, 3, :3] = 3.5  # 3 in view 1
    conf[1, 0, 0] = 3.0  # exactly at the threshold: not confident (conf > min_conf, as DUSt3R's get_masks)
    scene = _scene(conf)
    pts = scene_points(scene, max_points=100)
    assert pts.shape == (1, 13, 3)
    expected = torch.cat([scene.pts3d[0, :2].reshape(-1, 3), scene.pts3d[1, 3, :3]])
    assert torch.equal(pts[0], expected)
    capped = scene_points(scene, max_points=4)
    assert capped.shape == (1, 4, 3)
    assert torch.equal(capped[0, 0], expected[0]) and torch.equal(capped[0, -1], expected[-1])
    with pytest.raises(InputError, match="lower the minimum confidence"):
        scene_points(_scene(conf, min_conf=10.0))


def test_half_precision_encoder_keeps_the_positional_features_exact():
    """bf16 weights must not mean bf16 Fourier angles (the top bands would be noise)."""
    from reconx_core.structure import FourierEmbedding

    torch.manual_seed(0)
    emb = FourierEmbedding(32, num_freqs=8)
    xyz = torch.rand(1, 500, 3) * 2 - 1
    reference = emb(xyz)
    half = FourierEmbedding(32, num_freqs=8)
    half.load_state_dict(emb.state_dict())
    half = half.to(torch.bfloat16)
    out = half(xyz).float()  # coordinates arrive in float32, as PointCloudEncoder passes them
    # only the final projection runs in bf16: its rounding (~1e-2 relative), not angle noise of order 1
    assert (out - reference).abs().max() < 0.05 * reference.abs().max()
