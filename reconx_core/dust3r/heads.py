"""DUSt3R's prediction heads (linear and DPT) and the point/confidence post-processing.

Module and parameter names follow the official checkpoints (`proj`, `dpt.act_postprocess.K.M`, `dpt.scratch.*`,
`dpt.head.{0,2,4}`). The DPT widths are constructor arguments because checkpoints differ in them (the public
512_dpt model uses feature_dim 256, last_dim 128, layer_dims 96/192/384/768; small test models use others).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def postprocess(out: torch.Tensor, depth_mode: Tuple, conf_mode: Tuple) -> Dict[str, torch.Tensor]:
    """Head output (B, 3 or 4, H, W) -> {'pts3d': (B, H, W, 3), 'conf': (B, H, W)} (conf when 4 channels).

    depth_mode ('exp', -inf, inf): the raw vector's direction is kept and its length d becomes expm1(d), so the
    network regresses log-distances. conf_mode ('exp', vmin, vmax): conf = vmin + exp(x), capped at vmax.
    """
    fmap = out.permute(0, 2, 3, 1)
    res = {"pts3d": _dense_points(fmap[..., 0:3], depth_mode)}
    if fmap.shape[-1] > 3:
        res["conf"] = _dense_conf(fmap[..., 3], conf_mode)
    return res


def _dense_points(xyz: torch.Tensor, mode: Tuple) -> torch.Tensor:
    kind = mode[0]
    if kind == "linear":
        return xyz
    d = xyz.norm(dim=-1, keepdim=True)
    direction = xyz / d.clip(min=1e-8)
    if kind == "square":
        return direction * d.square()
    if kind == "exp":
        return direction * torch.expm1(d)
    raise ValueError(f"unknown depth mode {kind!r}")


def _dense_conf(x: torch.Tensor, mode: Tuple) -> torch.Tensor:
    kind, vmin, vmax = mode[0], float(mode[1]), float(mode[2])
    if kind == "exp":
        return vmin + x.exp().clip(max=vmax - vmin)
    if kind == "sigmoid":
        return (vmax - vmin) * torch.sigmoid(x) + vmin
    raise ValueError(f"unknown confidence mode {kind!r}")


class LinearHead(nn.Module):
    """One linear map per token to a p x p patch of (x, y, z[, conf]), unfolded with pixel_shuffle."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, depth_mode: Tuple, conf_mode: Tuple):
        super().__init__()
        self.patch_size = patch_size
        self.depth_mode, self.conf_mode = depth_mode, conf_mode
        self.proj = nn.Linear(dim, out_channels * patch_size ** 2)

    def forward(self, tokens: List[torch.Tensor], hw: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        """tokens: decoder outputs, the last (B, N, C) is used; hw: image (H, W) -> postprocess() dict."""
        H, W = hw
        x = tokens[-1]
        B = x.shape[0]
        p = self.patch_size
        feat = self.proj(x).transpose(-1, -2).reshape(B, -1, H // p, W // p)
        return postprocess(F.pixel_shuffle(feat, p), self.depth_mode, self.conf_mode)


class _ResidualConvUnit(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class _FusionBlock(nn.Module):
    """Adds a skip input (after a residual unit), refines, upsamples x2 (bilinear, align_corners) and mixes."""

    def __init__(self, ch: int):
        super().__init__()
        self.out_conv = nn.Conv2d(ch, ch, 1)
        self.resConfUnit1 = _ResidualConvUnit(ch)
        self.resConfUnit2 = _ResidualConvUnit(ch)

    def forward(self, x, skip=None):
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class _Scratch(nn.Module):
    """Holds the four 3x3 projections under both official names: layerN_rn and layer_rn[N-1] (same modules)."""

    def __init__(self, layer_dims: Sequence[int], feature_dim: int):
        super().__init__()
        convs = [nn.Conv2d(c, feature_dim, 3, padding=1, bias=False) for c in layer_dims]
        for i, conv in enumerate(convs):
            setattr(self, f"layer{i + 1}_rn", conv)
        self.layer_rn = nn.ModuleList(convs)
        for i in range(4):
            setattr(self, f"refinenet{i + 1}", _FusionBlock(feature_dim))


class _DPT(nn.Module):
    def __init__(self, dim_tokens, hooks, layer_dims, feature_dim, last_dim, out_channels, patch_size):
        super().__init__()
        self.hooks = tuple(hooks)
        self.patch_size = patch_size
        ld = list(layer_dims)
        # token maps at 1/p are brought to 1/(p/4), 1/(p/2), 1/p and 1/(2p) of the image
        self.act_postprocess = nn.ModuleList([
            nn.Sequential(nn.Conv2d(dim_tokens[0], ld[0], 1), nn.ConvTranspose2d(ld[0], ld[0], 4, stride=4)),
            nn.Sequential(nn.Conv2d(dim_tokens[1], ld[1], 1), nn.ConvTranspose2d(ld[1], ld[1], 2, stride=2)),
            nn.Sequential(nn.Conv2d(dim_tokens[2], ld[2], 1)),
            nn.Sequential(nn.Conv2d(dim_tokens[3], ld[3], 1), nn.Conv2d(ld[3], ld[3], 3, stride=2, padding=1)),
        ])
        self.scratch = _Scratch(ld, feature_dim)
        self.head = nn.Sequential(
            nn.Conv2d(feature_dim, feature_dim // 2, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(feature_dim // 2, last_dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(last_dim, out_channels, 1),
        )

    def forward(self, tokens: List[torch.Tensor], hw: Tuple[int, int]) -> torch.Tensor:
        H, W = hw
        gh, gw = H // self.patch_size, W // self.patch_size
        maps = []
        for k, hook in enumerate(self.hooks):
            t = tokens[hook]
            grid = t.transpose(1, 2).reshape(t.shape[0], t.shape[2], gh, gw)
            maps.append(self.scratch.layer_rn[k](self.act_postprocess[k](grid)))
        s = self.scratch
        # the stride-2 level can be one cell larger than half the 1/p grid (odd sizes): crop before fusing
        path = s.refinenet4(maps[3])[:, :, :maps[2].shape[2], :maps[2].shape[3]]
        path = s.refinenet3(path, maps[2])
        path = s.refinenet2(path, maps[1])
        path = s.refinenet1(path, maps[0])
        return self.head(path)


class DPTHead(nn.Module):
    """DPT head over four token maps (the encoder output and three decoder layers, picked by `hooks`)."""

    def __init__(self, dim_tokens: Sequence[int], hooks: Sequence[int], layer_dims: Sequence[int],
                 feature_dim: int, last_dim: int, out_channels: int, patch_size: int,
                 depth_mode: Tuple, conf_mode: Tuple):
        super().__init__()
        self.depth_mode, self.conf_mode = depth_mode, conf_mode
        self.dpt = _DPT(dim_tokens, hooks, layer_dims, feature_dim, last_dim, out_channels, patch_size)

    def forward(self, tokens: List[torch.Tensor], hw: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        """tokens: the dec_depth + 1 token maps (B, N, C_k) from `Dust3R.decode`; hw: image (H, W)."""
        return postprocess(self.dpt(tokens, hw), self.depth_mode, self.conf_mode)
