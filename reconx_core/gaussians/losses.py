"""Photometric losses of the fit: per-pixel L1 and SSIM maps, a spatial LPIPS map, and the LPIPS loader.

SSIM is kornia's `kornia.metrics.ssim` (11x11 Gaussian window, sigma 1.5, the 3DGS setting) re-written with all
five local moments in one pair of separable depthwise convolutions (tested against kornia); it returns the
per-pixel map that the confidence weights.
LPIPS comes from the `lpips` package with spatial=True (a per-pixel map, upsampled to the image size), so the
confidence weights it per pixel like the other two terms. Its torchvision backbone is never downloaded: we look
for the exact file in the torch hub cache and the caller's folders and load it with weights_only=True.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F

from ..errors import ResourceError

log = logging.getLogger(__name__)

LPIPS_BACKBONES = {
    "alex": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
}


def _gaussian_window(size: int, sigma: float, dtype, device) -> torch.Tensor:
    """(size,) sampled Gaussian, centred, summing to 1 (kornia's get_gaussian_kernel1d)."""
    x = torch.arange(size, dtype=dtype, device=device) - size // 2
    g = torch.exp(-x * x / (2.0 * sigma * sigma))
    return g / g.sum()


def ssim_map(pred: torch.Tensor, target: torch.Tensor, window_size: int = 11, max_val: float = 1.0,
             eps: float = 1e-12) -> torch.Tensor:
    """Per-pixel SSIM, as `kornia.metrics.ssim(pred, target, window_size, max_val)` then the mean over channels.

    pred, target: (N, C, H, W) float in [0, max_val], H and W > window_size // 2. Returns (N, H, W).
    Gaussian window (sigma 1.5), reflect padding, C1 = (0.01 max_val)^2, C2 = (0.03 max_val)^2, eps added to the
    denominator. The five local moments are filtered together: one reflect pad and one horizontal and one
    vertical depthwise convolution over the 5C stacked maps (kornia filters each moment separately).
    """
    C = pred.shape[1]
    g = _gaussian_window(window_size, 1.5, pred.dtype, pred.device)
    x = torch.cat([pred, target, pred * pred, target * target, pred * target], 1)      # (N, 5C, H, W)
    p = window_size // 2
    x = F.pad(x, (p, p, p, p), mode="reflect")
    x = F.conv2d(x, g.reshape(1, 1, 1, -1).expand(5 * C, 1, 1, window_size), groups=5 * C)
    x = F.conv2d(x, g.reshape(1, 1, -1, 1).expand(5 * C, 1, window_size, 1), groups=5 * C)
    mu1, mu2, e11, e22, e12 = x.split(C, 1)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    num = (2.0 * mu12 + c1) * (2.0 * (e12 - mu12) + c2)
    den = (mu1_sq + mu2_sq + c1) * ((e11 - mu1_sq) + (e22 - mu2_sq) + c2)
    return (num / (den + eps)).mean(1)


def lpips_search_dirs(extra_dirs: Iterable = ()) -> list:
    """Folders searched for the LPIPS backbone: $TORCH_HOME/hub/checkpoints first, then `extra_dirs`."""
    return [Path(torch.hub.get_dir()) / "checkpoints"] + [Path(d) for d in extra_dirs]


def find_lpips_backbone(net: str = "alex", extra_dirs: Iterable = ()) -> Path:
    """The torchvision backbone file LPIPS `net` needs, found without reading it (a cheap check before a fit).

    Raises ResourceError naming the file, the folders searched, the download address and the lpips_weight=0
    escape when it is in none of `lpips_search_dirs(extra_dirs)`.
    """
    if net not in LPIPS_BACKBONES:
        raise ResourceError(f"unknown LPIPS network {net!r}; use 'alex' or 'vgg'")
    fname, url = LPIPS_BACKBONES[net]
    dirs = lpips_search_dirs(extra_dirs)
    found = next((d / fname for d in dirs if (d / fname).is_file()), None)
    if found is None:
        raise ResourceError(
            f"LPIPS needs the torchvision backbone {fname}, which is in none of: "
            f"{', '.join(str(d) for d in dirs)}. Download {url} into one of them, or set the LPIPS weight "
            "(lpips_weight, the third loss weight) to 0 to fit without LPIPS.")
    return found


def load_lpips(net: str = "alex", extra_dirs: Iterable = (), device="cpu", pnet_rand: bool = False):
    """An LPIPS module that returns a per-pixel map: module(pred (N,3,H,W), target) -> (N, H, W), inputs in [0, 1].

    net: "alex" (fast, the default) or "vgg".
    extra_dirs: more folders holding the torchvision backbone file (the node passes ComfyUI's models/reconx).
    pnet_rand: random backbone, no file needed. Not a perceptual metric: for tests of the plumbing only.
    Raises ResourceError naming the file, the folders and the URL when the backbone is not found.
    """
    if net not in LPIPS_BACKBONES:
        raise ResourceError(f"unknown LPIPS network {net!r}; use 'alex' or 'vgg'")
    try:
        import lpips
    except Exception as exc:
        raise ResourceError(f"the lpips package is unavailable ({exc}); pip install lpips, or set the LPIPS "
                            "weight to 0") from None
    fname, url = LPIPS_BACKBONES[net]
    state = None
    if not pnet_rand:
        found = find_lpips_backbone(net, extra_dirs)
        state = torch.load(found, map_location="cpu", weights_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation notices from inside lpips
        # pretrained=False: lpips would load its linear layers with a bare torch.load (arbitrary unpickling on
        # torch < 2.6); we load the same file it ships, weights only
        model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, spatial=True, verbose=False)
    lin_file = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    try:
        lin_state = torch.load(lin_file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ResourceError(f"the lpips package's calibration weights {lin_file} cannot be read ({exc}); "
                            "reinstall lpips, or set the LPIPS weight to 0") from None
    missing, _ = model.load_state_dict(lin_state, strict=False)
    # the file holds lin0..linK; `lins.K` are the same modules under a second name
    missing = [name for name in missing if name.startswith("lin") and not name.startswith("lins.")]
    if missing:
        raise ResourceError(f"{lin_file} lacks LPIPS layers {missing}; reinstall lpips, or set the LPIPS weight to 0")
    if state is not None:
        # lpips splits torchvision's `features` into slices but keeps the layer indices: sliceK.<i>.w -> features.<i>.w
        own = {}
        for name, _ in model.net.named_parameters():
            key = "features." + name.split(".", 1)[1]
            if key not in state:
                raise ResourceError(f"{fname} does not look like torchvision's {net} weights (no {key}); "
                                    f"download it again from {url}")
            own[name] = state[key]
        model.net.load_state_dict(own, strict=True)
        log.info("LPIPS %s backbone loaded from %s", net, found)
    model = model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return _LpipsMap(model)


class _LpipsMap(torch.nn.Module):
    """Wraps lpips.LPIPS(spatial=True): inputs (N, 3, H, W) in [0, 1] -> (N, H, W) distance map."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.model(pred, target, normalize=True)[:, 0]
