"""INRIA 3DGS PLY: exact round trip, the property layout viewers expect, and activated values."""

import numpy as np
import pytest
import torch
from plyfile import PlyData

from reconx_core.errors import InputError
from reconx_core.gaussians import load_ply, save_ply, to_activated
from reconx_core.types import Gaussians


def random_gaussians(n, degree, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Gaussians(torch.randn(n, 3, generator=g), torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g),
                     torch.randn(n, generator=g), torch.randn(n, (degree + 1) ** 2, 3, generator=g))


@pytest.mark.parametrize("degree", [0, 1, 3])
def test_round_trip_is_exact(tmp_path, degree):
    g = random_gaussians(57, degree)
    back = load_ply(save_ply(g, tmp_path / "g.ply"))
    for name in ("means", "quats", "log_scales", "opacity_logits", "sh"):
        assert torch.equal(getattr(back, name), getattr(g, name)), name


def test_inria_layout(tmp_path):
    g = random_gaussians(5, 3)
    ply = PlyData.read(str(save_ply(g, tmp_path / "g.ply")))
    v = ply["vertex"]
    names = [p.name for p in v.properties]
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert names[9:54] == [f"f_rest_{i}" for i in range(45)]
    assert names[54:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert all(p.val_dtype in ("f4", "float32", "float") for p in v.properties)
    assert ply.byte_order == "<" and not ply.text
    # f_rest is channel-major (INRIA stores features_rest as (N, 3, K-1)): f_rest_0..14 are red's bands 1..15.
    np.testing.assert_array_equal(v["f_rest_0"], g.sh[:, 1, 0].numpy())
    np.testing.assert_array_equal(v["f_rest_14"], g.sh[:, 15, 0].numpy())
    np.testing.assert_array_equal(v["f_rest_15"], g.sh[:, 1, 1].numpy())
    np.testing.assert_array_equal(v["rot_0"], g.quats[:, 0].numpy())      # w first
    np.testing.assert_array_equal(v["opacity"], g.opacity_logits.numpy())  # raw logits, as INRIA


def test_to_activated():
    g = random_gaussians(20, 1)
    act = to_activated(g)
    torch.testing.assert_close(act["scales"], g.log_scales.exp())
    torch.testing.assert_close(act["quats"].norm(dim=-1), torch.ones(20))
    torch.testing.assert_close(act["quats"] * g.quats.norm(dim=-1, keepdim=True), g.quats)
    assert ((act["opacities"] > 0) & (act["opacities"] < 1)).all()
    torch.testing.assert_close(torch.logit(act["opacities"]), g.opacity_logits, atol=1e-4, rtol=1e-4)
    assert act["sh"].shape == (20, 4, 3)


def test_load_rejects_other_ply(tmp_path):
    from reconx_core.export import point_cloud_ply_bytes

    path = tmp_path / "points.ply"
    path.write_bytes(point_cloud_ply_bytes(torch.rand(4, 3), torch.rand(4, 3)))
    with pytest.raises(InputError, match="not an INRIA 3DGS PLY"):
        load_ply(path)
    with pytest.raises(InputError, match="not found"):
        load_ply(tmp_path / "missing.ply")
