"""Image metrics exactly as the sparse-view papers compute them (MVSplat's src/evaluation/metrics.py, which
pixelSplat and ReconX's comparisons share).

- `psnr`: both images clipped to [0, 1], MSE over channels and pixels, -10 log10(MSE).
- `ssim`: scikit-image's `structural_similarity(gt, pred, win_size=11, gaussian_weights=True, channel_axis=0,
  data_range=1.0)`: an 11-tap Gaussian window (sigma 1.5, truncated at 3.5 sigma), the sample-covariance
  factor 121/120, C1 = 0.01^2, C2 = 0.03^2, the SSIM map averaged over the pixels at least 5 px from the border
  (skimage crops them away), then over channels. Re-implemented in torch (float64); scikit-image is only needed
  by the parity test.
- `lpips`: `lpips.LPIPS(net="vgg")` (MVSplat; AlexNet optional) in its default, non-spatial form, called with
  normalize=True on images in [0, 1]. The backbone goes through the pack's safe loader
  (reconx_core.gaussians.losses.load_lpips): the torchvision file is found in $TORCH_HOME/hub/checkpoints or the
  given folders and read with weights_only=True, never downloaded.

Each takes pred and target (N, 3, H, W) in [0, 1] (any device) and returns (N,) float32, one value per image.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from .errors import InputError

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5

_LPIPS_CACHE: dict = {}


def _check_pair(pred: torch.Tensor, target: torch.Tensor, min_side: int = 1) -> None:
    if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise InputError("pred and target must be torch tensors (N, 3, H, W) in [0, 1]")
    if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] != 3:
        raise InputError(f"pred and target must both be (N, 3, H, W), got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    if min(pred.shape[-2:]) < min_side:
        raise InputError(f"images of {pred.shape[-1]}x{pred.shape[-2]} are smaller than the metric's {min_side}-px "
                         "window")


@torch.no_grad()
def psnr(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) PSNR in dB of images clipped to [0, 1] (inf where they are equal)."""
    _check_pair(pred, target)
    diff = pred.double().clamp(0, 1) - target.double().clamp(0, 1)
    mse = (diff * diff).mean(dim=(1, 2, 3))
    return (-10 * torch.log10(mse)).float()


def _skimage_gaussian(dtype, device) -> torch.Tensor:
    """scipy.ndimage's Gaussian kernel: radius int(truncate sigma + 0.5) = 5, exp(-x^2 / (2 sigma^2)) / sum."""
    radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    g = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return g / g.sum()


@torch.no_grad()
def ssim(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) SSIM as scikit-image's structural_similarity with Gaussian weights (see the module docstring).

    The window's radius is 5 px and skimage averages only pixels whose window lies inside the image, so the
    filtering is a valid convolution: the border mode never matters. Images need at least 11 px a side.
    """
    _check_pair(pred, target, SSIM_WINDOW)
    x, y = pred.double(), target.double()
    N, C, H, W = x.shape
    g = _skimage_gaussian(x.dtype, x.device)
    stack = torch.cat([x, y, x * x, y * y, x * y], 1)                        # (N, 5C, H, W)
    stack = F.conv2d(stack, g.reshape(1, 1, 1, -1).expand(5 * C, 1, 1, -1), groups=5 * C)
    stack = F.conv2d(stack, g.reshape(1, 1, -1, 1).expand(5 * C, 1, -1, 1), groups=5 * C)
    ux, uy, uxx, uyy, uxy = stack.split(C, 1)
    cov_norm = SSIM_WINDOW ** 2 / (SSIM_WINDOW ** 2 - 1)                     # skimage's sample covariance
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).float()


class LpipsMetric(torch.nn.Module):
    """LPIPS as the papers report it: lpips.LPIPS(net) non-spatial, inputs in [0, 1] (normalize=True).

    forward(pred (N, 3, H, W), target) -> (N,) distances. `net` is "vgg" or "alex"; `random_backbone` marks a
    module built on random backbone weights (tests and --tiny smoke runs: not a perceptual metric).
    """

    def __init__(self, model, net: str, random_backbone: bool):
        super().__init__()
        self.model = model
        self.net = net
        self.random_backbone = random_backbone

    @torch.no_grad()
    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_pair(pred, target)
        device = next(self.model.parameters()).device
        out = self.model(target.to(device, torch.float32), pred.to(device, torch.float32), normalize=True)
        return out.reshape(-1).float()


def load_lpips_metric(net: str = "vgg", extra_dirs: Iterable = (), device="cpu",
                      random_backbone: bool = False) -> LpipsMetric:
    """An LpipsMetric with the lpips package's calibration layers and torchvision's `net` backbone.

    extra_dirs: folders searched after $TORCH_HOME/hub/checkpoints for the backbone file (vgg16-397923af.pth or
    alexnet-owt-7be5be79.pth). A missing file raises ResourceError naming the file, the folders and the URL.
    random_backbone: torchvision's random initialisation instead of the file (seed torch first for a repeatable
    one): tests and smoke runs only, never a perceptual metric.
    """
    from .gaussians.losses import load_lpips

    wrapper = load_lpips(net, extra_dirs, device, pnet_rand=random_backbone)
    model = wrapper.model
    # load_lpips builds lpips.LPIPS(spatial=True) for the fit's per-pixel map; the papers' metric is the
    # spatially averaged form. `spatial` is only read inside LPIPS.forward, so this is the same module as
    # lpips.LPIPS(spatial=False) with the same weights.
    model.spatial = False
    return LpipsMetric(model, net, random_backbone)


def lpips(pred: torch.Tensor, target: torch.Tensor, net: str = "vgg", model: Optional[LpipsMetric] = None,
          extra_dirs: Iterable = ()) -> torch.Tensor:
    """(N,) LPIPS distances (lower is better). `model` (from load_lpips_metric) is used when given; otherwise
    one is loaded for `net` on pred's device and cached."""
    _check_pair(pred, target)
    if model is None:
        key = (net, str(pred.device), tuple(str(d) for d in extra_dirs))
        if key not in _LPIPS_CACHE:
            _LPIPS_CACHE[key] = load_lpips_metric(net, extra_dirs, pred.device)
        model = _LPIPS_CACHE[key]
    return model(pred, target)


def image_metrics(pred: torch.Tensor, target: torch.Tensor, lpips_model: Optional[LpipsMetric] = None) -> dict:
    """{"psnr": (N,), "ssim": (N,), "lpips": (N,)} (lpips left out when lpips_model is None)."""
    out = {"psnr": psnr(pred, target), "ssim": ssim(pred, target)}
    if lpips_model is not None:
        out["lpips"] = lpips(pred, target, model=lpips_model)
    return out
