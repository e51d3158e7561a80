"""Ground-truth tests of the fit on synthetic ray-cast scenes (tests/synthetic_textured.py), plus the LPIPS plumbing.

No LPIPS backbone weights exist offline, so the quality tests fit with weights (0.8, 0.2, 0): LPIPS weight 0.
The LPIPS path itself is tested with a random backbone (pnet_rand) and with a backbone file we write ourselves.

The fits run single-threaded (restored afterwards): they are thousands of small ops, and on the shared 2-core
build machines every multi-threaded op waits at an OpenMP barrier for a thread another job has descheduled.
Measured there under load: this file took 487 s with 2 threads and 40 s with 1; on an idle machine 1 thread
costs ~20% on these sizes.
"""


from pathlib import Path

import pytest
import torch

from reconx_core.errors import InputError, ResourceError
from reconx_core.gaussians import FitConfig, fit_gaussians, init_from_scene, load_lpips, optimize_gaussians, render, ssim_map
from tests.synthetic_textured import arc_cameras, make_scene, psnr, render_exact

H, W = 48, 72
TRAIN_ANGLES = [-0.35 + 0.7 * k / 5 for k in range(6)]
TEST_ANGLES = [-0.21, 0.07, 0.21]   # between training views
# Measured: 23.9 dB without densification, 28.9 dB with it (+5.0 dB); half of that gain is required.
DENSIFY_GAIN_DB = 2.5


pytestmark = [pytest.mark.usefixtures("one_thread"),  # see tests/conftest.py
              pytest.mark.numeric]  # float32 fit: CI runs it again on a second numeric path (test-numeric)


@pytest.fixture(scope="module")
def data():
    train = make_scene(TRAIN_ANGLES, W, H)
    test_cams = arc_cameras(TEST_ANGLES, W, H)
    test_images, _, _ = render_exact(test_cams)
    return train, test_cams, test_images


def heldout_psnr(g, test_cams, test_images):
    with torch.no_grad():
        return psnr(render(g, test_cams, backend="torch").rgb.permute(0, 3, 1, 2), test_images)


def test_default_fit_reaches_30db_on_heldout_views(data):
    train, test_cams, test_images = data
    init = init_from_scene(train, max_points=2500)
    before = heldout_psnr(init, test_cams, test_images)
    calls = []
    g = fit_gaussians(train.images, train.cameras, init=train, max_points=2500, weights=(0.8, 0.2, 0.0),
                      callback=lambda s, t: calls.append((s, t)))
    after = heldout_psnr(g, test_cams, test_images)
    print(f"held-out PSNR: init {before:.2f} dB -> fit {after:.2f} dB")
    assert calls[0] == (1, 1000) and calls[-1] == (1000, 1000) and len(calls) == 1000
    assert after >= 30.0
    assert after > before + 10


def test_confidence_ignores_wrong_regions(data):
    train, test_cams, test_images = data
    images, conf = train.images.clone(), torch.ones(len(train), H, W)
    # A third of the frames (the two leftmost views) carry wrong content, colour-inverted and shifted, over the
    # left half, where few other views see the scene; the confidence there is low.
    for i in (0, 1):
        images[i, :, :, :40] = (1.0 - images[i, :, :, :40]).roll(7, dims=-1)
        conf[i, :, :40] = 0.05
    kwargs = dict(init=train, max_points=2500, weights=(0.8, 0.2, 0.0), steps=300)
    weighted = heldout_psnr(fit_gaussians(images, train.cameras, conf=conf, **kwargs), test_cams, test_images)
    unweighted = heldout_psnr(fit_gaussians(images, train.cameras, **kwargs), test_cams, test_images)
    print(f"held-out PSNR with confidence {weighted:.2f} dB, without {unweighted:.2f} dB")
    assert weighted >= unweighted + 3.0


def test_lpips_plumbing_with_random_backbone(data):
    train, test_cams, test_images = data
    lp = load_lpips("alex", pnet_rand=True)
    a = train.images[:2]
    d_same, d_other = lp(a, a), lp(a, a.flip(-1))
    assert d_same.shape == (2, H, W) and d_same.abs().max() < 1e-6 and d_other.mean() > 1e-3
    init = init_from_scene(train, max_points=1500)
    g = fit_gaussians(train.images, train.cameras, init=init, steps=40, weights=(0.8, 0.2, 0.5), lpips_random=True)
    assert heldout_psnr(g, test_cams, test_images) > heldout_psnr(init, test_cams, test_images) + 3


def test_ssim_map_matches_kornia():
    kornia = pytest.importorskip("kornia")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        a = torch.rand(2, 3, 30, 44, generator=g).to(dtype)
        b = 0.5 * a + 0.5 * torch.rand(2, 3, 30, 44, generator=g).to(dtype)
        a.requires_grad_(True)
        ours = ssim_map(a, b)
        ref = kornia.metrics.ssim(a, b, 11, max_val=1.0).mean(1)
        assert ours.shape == (2, 30, 44) and 0.2 < ref.mean() < 0.95
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
        (g_ours,), (g_ref,) = torch.autograd.grad(ours.sum(), a), torch.autograd.grad(ref.sum(), a)
        torch.testing.assert_close(g_ours, g_ref, atol=1e-5 * g_ref.abs().max().item(), rtol=1e-4)


def test_lpips_missing_backbone_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(ResourceError) as err:
        load_lpips("alex", extra_dirs=[tmp_path / "models_reconx"])
    msg = str(err.value)
    for part in ("alexnet-owt-7be5be79.pth", str(tmp_path / "torch_home" / "hub" / "checkpoints"),
                 str(tmp_path / "models_reconx"), "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
                 "lpips_weight", "0"):
        assert part in msg, part
    with pytest.raises(ResourceError, match="vgg16-397923af.pth"):
        load_lpips("vgg", extra_dirs=[tmp_path])


def test_lpips_backbone_loads_from_extra_folder(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    torch.manual_seed(0)
    state = torchvision.models.alexnet().state_dict()
    torch.save(state, tmp_path / "alexnet-owt-7be5be79.pth")
    lp = load_lpips("alex", extra_dirs=[tmp_path])
    torch.testing.assert_close(lp.model.net.slice1[0].weight, state["features.0.weight"])
    torch.testing.assert_close(getattr(lp.model.net.slice5, "10").bias, state["features.10.bias"])
    # the calibration layers are the ones lpips ships, read by us with weights_only=True
    import lpips

    shipped = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth", map_location="cpu",
                         weights_only=True)
    assert len(shipped) == 5
    for name, value in shipped.items():
        torch.testing.assert_close(lp.model.state_dict()[name], value)


def test_fit_input_errors(data):
    train, _, _ = data
    with pytest.raises(InputError, match="conf must be"):
        fit_gaussians(train.images, train.cameras, conf=torch.ones(2, H, W), init=train, steps=1, weights=(1, 0, 0))
    with pytest.raises(InputError, match="cameras"):
        fit_gaussians(train.images[:3], train.cameras, init=train, steps=1, weights=(1, 0, 0))
    with pytest.raises(InputError, match="init"):
        fit_gaussians(train.images, train.cameras, init=None, steps=1, weights=(1, 0, 0))


def test_densification_beats_the_same_fit_without_it(data):
    """From a sparse init (300 points), clone/split must add Gaussians where the images need them: against the
    same fit (same init, seed, steps) without densification, the held-out PSNR must rise by a stated margin."""
    train, test_cams, test_images = data
    init = init_from_scene(train, max_points=300)
    common = dict(steps=200, weights=(0.8, 0.2, 0.0), seed=0)
    plain = optimize_gaussians(train.images, train.cameras, init, config=FitConfig(**common))
    dense = optimize_gaussians(train.images, train.cameras, init, config=FitConfig(densify=True, **common))
    p_plain, p_dense = heldout_psnr(plain.gaussians, test_cams, test_images), \
        heldout_psnr(dense.gaussians, test_cams, test_images)
    print(f"held-out PSNR without densification {p_plain:.2f} dB ({len(plain.gaussians)} Gaussians), with "
          f"{p_dense:.2f} dB ({len(dense.gaussians)} Gaussians, {dense.densify_events} densification steps)")
    assert dense.densify_events > 0 and len(dense.gaussians) > len(plain.gaussians)
    assert p_dense >= p_plain + DENSIFY_GAIN_DB


def test_pose_refinement_moves_perturbed_cameras_back_towards_the_truth(data):
    """Cameras perturbed by a known small se(3) error (0.01 rad, 0.01 units): refining them with the fit must
    shrink that error. The fit may also move the whole reconstruction (cameras and Gaussians together: a gauge
    freedom), so the error is measured after the best similarity onto the true cameras."""
    from reconx_core.geometry import camera_similarity, refine_cameras, transform_cameras

    train, _, _ = data

    def error(cams):
        s, R, t = camera_similarity(cams.cam_to_world, train.cameras.cam_to_world)
        aligned = transform_cameras(cams, s, R.float(), t.float())
        return float((aligned.cam_to_world - train.cameras.cam_to_world)[:, :3].abs().mean())

    g = torch.Generator().manual_seed(3)
    noise = torch.cat([0.01 * torch.randn(len(train), 3, generator=g), 0.01 * torch.randn(len(train), 3, generator=g)],
                      1)
    noisy = refine_cameras(train.cameras, noise)
    init = init_from_scene(train, max_points=2500)
    result = optimize_gaussians(train.images, noisy, init, config=FitConfig(
        steps=300, weights=(0.8, 0.2, 0.0), refine_poses=True, pose_lr=1e-3))
    before, after = error(noisy), error(result.cameras)
    print(f"mean camera-matrix error after a similarity: perturbed {before:.5f}, refined {after:.5f}")
    assert result.losses.shape == (300,) and torch.isfinite(result.losses).all()
    # Measured: 0.00523 -> 0.0040 (ratio 0.77; fit seeds 0-3 give 0.00397-0.00404, a 1 % spread).
    assert after < 0.85 * before
