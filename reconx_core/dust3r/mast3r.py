"""MASt3R's prediction head ("catmlp+dpt"): DUSt3R's DPT for points and confidence, plus a local-feature MLP.

MASt3R (naver/mast3r, `AsymmetricMASt3R`) is DUSt3R's network with this head in place of the DPT head; the encoder
and decoders are the same, so `Dust3R` runs it with `config.head_type == "catmlp+dpt"`.

Per view, the head returns
- `pts3d` (B, H, W, 3) and `conf` (B, H, W): from the DPT, post-processed exactly as DUSt3R's (depth_mode /
  conf_mode; the public metric model uses ('exp', -inf, inf) and ('exp', 1, inf), so conf >= 1);
- `desc` (B, H, W, D): unit-length local descriptors (D = 24 in the public model);
- `desc_conf` (B, H, W): the descriptors' confidence, from its own channel through desc_conf_mode when two_confs
  (public model: ('exp', 0, inf), so >= 0), else a copy of `conf`.

ReconX's alignment and confidence mapping read only the point maps and `conf`; the descriptors are computed by
`Dust3R.forward` for completeness (and parity with the official model) but `infer_pairs` skips them.
Parameter names follow the official checkpoints: `dpt.*` as in DUSt3R, `head_local_features.fc1/fc2`.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .heads import _DPT, _dense_conf, postprocess


class LocalFeatureMLP(nn.Module):
    """fc1 -> GELU -> fc2, applied to each token (CroCo's Mlp; its dropouts are 0 in MASt3R)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Mast3RHead(nn.Module):
    """DPT over four token maps for (x, y, z, conf) + an MLP over [encoder tokens, last decoder tokens] for the
    descriptors, one (desc_dim + two_confs) x p x p block per token, unfolded with pixel_shuffle.

    enc_dim, dec_dim: token widths; mlp_hidden: the MLP's hidden width (4 * (enc_dim + dec_dim) in the public
    model); desc_dim: descriptor channels; two_confs: whether a descriptor-confidence channel follows them.
    """

    def __init__(self, enc_dim: int, dec_dim: int, hooks: Sequence[int], layer_dims: Sequence[int],
                 feature_dim: int, last_dim: int, has_conf: bool, patch_size: int, mlp_hidden: int, desc_dim: int,
                 two_confs: bool, depth_mode: Tuple, conf_mode: Tuple, desc_conf_mode: Tuple):
        super().__init__()
        self.patch_size = patch_size
        self.desc_dim, self.two_confs = int(desc_dim), bool(two_confs)
        self.depth_mode, self.conf_mode, self.desc_conf_mode = depth_mode, conf_mode, desc_conf_mode
        self.dpt = _DPT((enc_dim, dec_dim, dec_dim, dec_dim), hooks, layer_dims, feature_dim, last_dim,
                        3 + int(has_conf), patch_size)
        self.head_local_features = LocalFeatureMLP(enc_dim + dec_dim, mlp_hidden,
                                                   (self.desc_dim + int(self.two_confs)) * patch_size ** 2)

    def forward(self, tokens: List[torch.Tensor], hw: Tuple[int, int], descriptors: bool = True
                ) -> Dict[str, torch.Tensor]:
        """tokens: the dec_depth + 1 token maps (B, N, C_k) from `Dust3R.decode` (tokens[0] = encoder output,
        tokens[-1] = last decoder layer after dec_norm); hw: image (H, W).

        Returns {'pts3d' (B, H, W, 3), 'conf' (B, H, W)} and, with descriptors=True, 'desc' (B, H, W, desc_dim)
        of unit length and 'desc_conf' (B, H, W). descriptors=False skips the MLP (used by infer_pairs).
        """
        res = postprocess(self.dpt(tokens, hw), self.depth_mode, self.conf_mode)
        if not descriptors:
            return res
        H, W = hw
        p = self.patch_size
        cat = torch.cat((tokens[0], tokens[-1]), dim=-1)
        B = cat.shape[0]
        feat = self.head_local_features(cat).transpose(-1, -2).reshape(B, -1, H // p, W // p)
        feat = F.pixel_shuffle(feat, p).permute(0, 2, 3, 1)  # (B, H, W, desc_dim + two_confs)
        desc = feat[..., :self.desc_dim]
        # no epsilon, as in the official reg_desc: a zero descriptor is as undefined there as here
        res["desc"] = desc / desc.norm(dim=-1, keepdim=True)
        if self.two_confs:
            res["desc_conf"] = _dense_conf(feat[..., self.desc_dim], self.desc_conf_mode)
        else:
            res["desc_conf"] = res["conf"].clone()
        return res
