"""The INRIA 3DGS PLY layout (what the original code, gsplat's exporters and most viewers read).

One binary little-endian `vertex` element with float32 properties, raw (pre-activation) values:
x y z, nx ny nz (zeros), f_dc_0..2, f_rest_0..(3(K-1)-1) channel-major (all of red's higher bands, then green's,
then blue's), opacity (logit), scale_0..2 (log), rot_0..3 (wxyz, not normalised). Saving float32 Gaussians and
loading them back gives identical tensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from plyfile import PlyData, PlyElement

from ..errors import InputError
from ..types import Gaussians


def _property_names(K: int) -> list:
    rest = [f"f_rest_{i}" for i in range(3 * (K - 1))]
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + rest + ["opacity"]
            + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)])


def save_ply(gaussians: Gaussians, path) -> Path:
    """Write Gaussians (float32) to `path` in the INRIA layout; returns the path."""
    g = gaussians.detach().to("cpu", torch.float32)
    N, K = g.sh.shape[:2]
    rest = g.sh[:, 1:].transpose(1, 2).reshape(N, -1)                      # (N, 3 (K-1)), channel-major
    cols = torch.cat([g.means, torch.zeros(N, 3), g.sh[:, 0], rest, g.opacity_logits[:, None], g.log_scales,
                      g.quats], 1).numpy()
    names = _property_names(K)
    vertex = np.empty(N, dtype=[(n, "f4") for n in names])
    for i, n in enumerate(names):
        vertex[n] = cols[:, i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    PlyData([PlyElement.describe(vertex, "vertex")], byte_order="<").write(str(path))
    return path


def load_ply(path) -> Gaussians:
    """Read an INRIA-layout PLY into raw-parameter Gaussians (float32, CPU)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"PLY file {path} not found")
    try:
        vertex = PlyData.read(str(path))["vertex"]
    except Exception as exc:
        raise InputError(f"{path} is not a readable PLY file ({exc})") from None
    names = set(vertex.data.dtype.names)
    n_rest = sum(1 for n in names if n.startswith("f_rest_"))
    K = n_rest // 3 + 1
    need = _property_names(K)
    missing = [n for n in need if n not in names and n not in ("nx", "ny", "nz")]
    if missing or n_rest % 3:
        raise InputError(f"{path} is not an INRIA 3DGS PLY: missing {missing[:6]}; expected properties {need[:10]}...")

    def col(*keys):
        return torch.from_numpy(np.stack([np.asarray(vertex[k], dtype=np.float32) for k in keys], 1))

    N = len(vertex.data)
    dc = col("f_dc_0", "f_dc_1", "f_dc_2")
    rest = col(*[f"f_rest_{i}" for i in range(n_rest)]) if n_rest else torch.zeros(N, 0)
    sh = torch.cat([dc[:, None], rest.reshape(N, 3, K - 1).transpose(1, 2)], 1).contiguous()
    return Gaussians(col("x", "y", "z"), col("rot_0", "rot_1", "rot_2", "rot_3"),
                     col("scale_0", "scale_1", "scale_2"), col("opacity")[:, 0].contiguous(), sh)
