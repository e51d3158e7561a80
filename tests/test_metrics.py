"""reconx_core.metrics against the implementations the papers call: scikit-image's structural_similarity and
peak_signal_noise_ratio, and the lpips package itself (with a shared random backbone: the torchvision backbone
files cannot be downloaded here)."""

import numpy as np
import pytest
import torch

from reconx_core.errors import InputError, ResourceError
from reconx_core.metrics import load_lpips_metric, lpips, psnr, ssim

skimage_metrics = pytest.importorskip("skimage.metrics")
pytestmark = pytest.mark.numeric  # float parity: CI runs it again on a second numeric path (Makefile test-numeric)


def _image_pair(seed=0, n=3, size=(48, 40)):
    """Smooth-ish images plus noise (like a render and its target), pred straying slightly outside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.avg_pool2d(torch.rand(n, 3, size[0] + 4, size[1] + 4, generator=g), 5, 1)
    target = base.clamp(0, 1)
    pred = target + 0.08 * torch.randn(n, 3, *size, generator=g)
    return pred, target


def test_psnr_matches_skimage_and_clips(one_thread):
    pred, target = _image_pair()
    ours = psnr(pred, target)
    assert ours.shape == (3,)
    for k in range(3):
        ref = skimage_metrics.peak_signal_noise_ratio(target[k].double().numpy(),
                                                      pred[k].double().clamp(0, 1).numpy(), data_range=1.0)
        # ours is float64 inside, rounded to float32 at the end: relative error ~ 6e-8 of ~20 dB
        assert abs(float(ours[k]) - ref) < 1e-5 * abs(ref)
    # MVSplat's own float32 formula: clip both, mean square over c, h, w
    mse32 = ((target.clip(0, 1) - pred.clip(0, 1)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(ours, -10 * mse32.log10(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ssim_matches_skimage_gaussian_weights(one_thread, dtype):
    """MVSplat's call: structural_similarity(gt, pred, win_size=11, gaussian_weights=True, channel_axis=0,
    data_range=1.0), on float32 images as MVSplat passes them, and on float64."""
    pred, target = _image_pair(seed=1)
    ours = ssim(pred, target)
    for k in range(3):
        ref = skimage_metrics.structural_similarity(target[k].numpy().astype(dtype), pred[k].numpy().astype(dtype),
                                                    win_size=11, gaussian_weights=True, channel_axis=0,
                                                    data_range=1.0)
        # float64: both filter with the same 11 taps, the only difference is summation order (~1e-15); our result
        # is rounded to float32 (~6e-8 relative). float32: skimage itself rounds the filtered moments to float32,
        # whose variance differences lose ~3 digits: 2e-5 on values ~0.5
        tol = 1e-6 if dtype == np.float64 else 2e-5
        assert abs(float(ours[k]) - float(ref)) < tol, (k, float(ours[k]), float(ref))


def test_ssim_identical_images_is_one_and_small_images_rejected():
    _, target = _image_pair(seed=2, n=1)
    assert abs(float(ssim(target, target)[0]) - 1.0) < 1e-6
    with pytest.raises(InputError, match="window"):
        ssim(torch.rand(1, 3, 10, 30), torch.rand(1, 3, 10, 30))
    with pytest.raises(InputError, match="shape|\\(N, 3, H, W\\)"):
        psnr(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 17))


@pytest.mark.parametrize("net", ["vgg", "alex"])
def test_lpips_matches_the_lpips_package(one_thread, net):
    """Same random backbone in both (the real backbones cannot be downloaded here), the package's shipped
    calibration layers in both: our path through load_lpips must give lpips.LPIPS(net)'s numbers."""
    lpips_pkg = pytest.importorskip("lpips")
    torch.manual_seed(0)
    reference = lpips_pkg.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
    ours = load_lpips_metric(net, random_backbone=True)
    ours.model.net.load_state_dict(reference.net.state_dict())
    pred, target = _image_pair(seed=3, n=2, size=(64, 64))
    pred = pred.clamp(0, 1)
    with torch.no_grad():
        ref = reference(target, pred, normalize=True).reshape(-1)
    got = lpips(pred, target, model=ours)
    assert got.shape == (2,)
    # same modules, same weights, same inputs: identical up to float32 summation order (relative 1e-5)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    # the spatial map the fit uses is a different reduction; the metric must not be it
    assert ours.model.spatial is False


def test_lpips_calibration_layers_are_the_shipped_ones():
    lpips_pkg = pytest.importorskip("lpips")
    from pathlib import Path

    shipped = torch.load(Path(lpips_pkg.__file__).parent / "weights" / "v0.1" / "vgg.pth", map_location="cpu",
                         weights_only=True)
    ours = load_lpips_metric("vgg", random_backbone=True)
    state = ours.model.state_dict()
    lin_keys = [k for k in shipped if k.startswith("lin")]
    assert len(lin_keys) == 5
    for key in lin_keys:
        assert torch.equal(state[key], shipped[key]), key


def test_missing_vgg_backbone_names_file_folder_and_url(tmp_path, monkeypatch):
    pytest.importorskip("lpips")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    extra = tmp_path / "models_reconx"
    extra.mkdir()
    with pytest.raises(ResourceError) as info:
        load_lpips_metric("vgg", extra_dirs=[extra])
    message = str(info.value)
    assert "vgg16-397923af.pth" in message
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in message and str(extra) in message
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message
