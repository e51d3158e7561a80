"""Our gsplat adapter (reconx_core/gaussians/rasterize_gsplat.py) checked on the CPU against our torch rasterizer.

gsplat.rasterization cannot run without CUDA, so `tests/gsplat_emulation.py` runs gsplat's own Python front end
(argument checks, packed layout, SH, the "RGB+ED" depth channel and its background, the expected-depth division)
over CPU versions of its five CUDA entry points, built from gsplat's pure-PyTorch reference (_torch_impl.py) and a
brute-force compositor with the CUDA kernel's rules. `render(..., backend="gsplat")` then goes through our adapter
into that emulation, and its images must equal `render(..., backend="torch")` on the same Gaussians. That checks
what the adapter decides: argument order, viewmats = world-to-camera, Ks with the +0.5 pixel-centre shift,
background (3 channels; gsplat adds the depth channel's), render_mode "RGB+ED" (expected, not accumulated, depth),
sh_degree, and the layout of the returned alpha (N, H, W) and depth (N, H, W).

Tolerances (float32, values of magnitude <= ~1.5 for colours and alpha, <= ~4 for depth):
- The two paths compute the same sums in different arrangements (einsum projection and exp vs our expanded
  quadratic and exp2), so each pixel differs by rounding: measured max 1.6e-6 (rgb), 2.4e-6 (alpha) and
  2.0e-5 on depths of ~3.4 (6e-6 relative). Bound: 2e-5 x max(1, magnitude) per pixel, 10x the worst measured.
  Expected depth is compared where alpha > 0.05 (it is accumulated depth / alpha) and the accumulated depth
  (depth x alpha) everywhere.
- Thresholds (alpha < 1/255 skipped, transmittance stop at 1e-4) can flip for a pair within rounding of them on
  another CPU, moving a pixel by at most ~2/255 of the magnitude: up to 0.5 % of pixels may exceed the bound by
  that much. Every breakage below moves hundreds of pixels by far more.
- Opacities are capped at 0.9 so that alpha never reaches the clamp (0.999 in both, checked separately below)
  (see test_known_difference_alpha_clamp).
"""

from __future__ import annotations

import math

import pytest
import torch

gsplat = pytest.importorskip("gsplat", reason="gsplat is not installed (pip install gsplat==1.5.3; it installs "
                                              "as source, with no compilation)")

import importlib  # noqa: E402

from reconx_core.gaussians import rasterize_gsplat  # noqa: E402
from reconx_core.types import Cameras, Gaussians  # noqa: E402
from tests.gsplat_emulation import emulated_gsplat, fully_fused_projection  # noqa: E402

RTOL = 2e-5
FLIP_FRACTION = 0.005
FLIP_SIZE = 2.0 / 255.0
# the module, not the function that reconx_core.gaussians re-exports under the same name
render_module = importlib.import_module("reconx_core.gaussians.render")
render_fn = render_module.render


def scene(n=160, seed=0, sh_degree=3, behind=True):
    """Random Gaussians around z = 2.5 (some behind the cameras when `behind`), opacities <= 0.9."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * torch.tensor([0.6, 0.45, 0.5]) + torch.tensor([0.0, 0.0, 2.5])
    if behind:
        means[:6, 2] = -1.0 - torch.rand(6, generator=g)        # behind every camera: culled
    quats = torch.randn(n, 4, generator=g)
    log_scales = torch.log(0.06 * (0.2 + torch.rand(n, 3, generator=g)))
    opacity = 0.05 + 0.85 * torch.rand(n, generator=g)           # <= 0.9: no alpha clamp is reached
    sh = torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g) * 0.3
    return Gaussians(means, quats, log_scales, torch.logit(opacity), sh)


def cameras(width=50, height=37):
    """Three different cameras: off-centre principal points, fx != fy, an image size that is not a tile multiple."""
    c2w = []
    for k, ang in enumerate((-0.3, 0.0, 0.25)):
        eye = torch.tensor([2.2 * math.sin(ang), -0.2 + 0.1 * k, 2.5 - 2.2 * math.cos(ang)])
        fwd = torch.nn.functional.normalize(torch.tensor([0.0, 0.0, 2.5]) - eye, dim=0)
        right = torch.nn.functional.normalize(torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0]), fwd), dim=0)
        down = torch.linalg.cross(fwd, right)
        M = torch.eye(4)
        M[:3, 0], M[:3, 1], M[:3, 2], M[:3, 3] = right, down, fwd, eye
        c2w.append(M)
    K = torch.tensor([[[58.0, 0, 24.0], [0, 61.0, 19.5], [0, 0, 1]],
                      [[55.0, 0, 25.0], [0, 55.0, 18.5], [0, 0, 1]],
                      [[60.0, 0, 26.3], [0, 57.0, 17.0], [0, 0, 1]]])
    return Cameras(torch.stack(c2w), K, width, height)


@pytest.fixture
def gsplat_on_cpu(monkeypatch):
    """render(backend="gsplat") goes through our adapter into the emulated gsplat; yields a list of the
    keyword arguments of every gsplat.rasterization call (to prove the torch fallback was not taken)."""
    calls = []
    with emulated_gsplat() as module:
        real = module.rasterization

        class Recorder:
            def rasterization(self, *args, **kwargs):
                calls.append(kwargs)
                return real(*args, **kwargs)

        monkeypatch.setattr(rasterize_gsplat, "_state", {"checked": True, "module": Recorder(), "failed": False,
                                                         "worked": False})
        resolve = render_module.resolve_backend
        monkeypatch.setattr(render_module, "resolve_backend",
                            lambda backend, device: "gsplat" if backend == "gsplat" else resolve(backend, device))
        yield calls


def parity_violations(a, b) -> list:
    """What is wrong between two RenderOutputs, per the tolerances in the module docstring ([] = they agree)."""
    problems = []
    acc_a, acc_b = a.depth * a.alpha, b.depth * b.alpha
    solid = (a.alpha > 0.05) & (b.alpha > 0.05)
    for name, x, y in (("rgb", a.rgb, b.rgb), ("alpha", a.alpha, b.alpha), ("depth*alpha", acc_a, acc_b),
                       ("depth where alpha > 0.05", a.depth * solid, b.depth * solid)):
        if x.shape != y.shape:
            problems.append(f"{name}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
            continue
        magnitude = max(1.0, float(y.abs().max()))
        diff = (x - y).abs()
        over = diff > RTOL * magnitude
        n_pixels = over.reshape(over.shape[0], x.shape[1], x.shape[2], -1).any(-1).sum()
        total = x.shape[0] * x.shape[1] * x.shape[2]
        if n_pixels > FLIP_FRACTION * total or float(diff.max()) > FLIP_SIZE * magnitude + RTOL * magnitude:
            problems.append(f"{name}: max diff {float(diff.max()):.3g} (magnitude {magnitude:.3g}), "
                            f"{int(n_pixels)}/{total} pixels over {RTOL * magnitude:.2g}")
    return problems


def both(gaussians, cams, **kwargs):
    return render_fn(gaussians, cams, backend="gsplat", **kwargs), render_fn(gaussians, cams, backend="torch",
                                                                            **kwargs)


# ------------------------------------------------------------------------------------ the emulation itself
def test_emulated_projection_is_gsplats_reference():
    """Our composition of _world_to_cam/_persp_proj equals gsplat's own _fully_fused_projection (3.33-sigma boxes
    when no opacities are given), and the packed layout holds the same entries as the dense one."""
    from gsplat.cuda import _torch_impl as T

    g, cams = scene(), cameras()
    viewmats, Ks = cams.world_to_cam, cams.intrinsics.clone()
    Ks[:, :2, 2] += 0.5
    scales = g.log_scales.exp()
    ours = fully_fused_projection(g.means, None, g.quats, scales, viewmats, Ks, 50, 37)
    covars, _ = T._quat_scale_to_covar_preci(g.quats, scales, compute_preci=False)
    ref = T._fully_fused_projection(g.means, covars, viewmats, Ks, 50, 37)
    valid = (ref[0] > 0).all(-1)
    assert torch.equal(ours[0], ref[0])
    for x, y in zip(ours[1:4], ref[1:4]):      # means2d, depths, conics: same formulas, same order of operations
        assert torch.allclose(x[valid], y[valid], rtol=1e-6, atol=0)
    opac = torch.sigmoid(g.opacity_logits)
    dense = fully_fused_projection(g.means, None, g.quats, scales, viewmats, Ks, 50, 37, opacities=opac)
    packed = fully_fused_projection(g.means, None, g.quats, scales, viewmats, Ks, 50, 37, opacities=opac,
                                    packed=True)
    _, cam_ids, gauss_ids, radii = packed[:4]
    assert cam_ids.dtype == torch.int64 and radii.dtype == torch.int32
    assert torch.equal(radii, dense[0][cam_ids, gauss_ids])
    assert int((dense[0] > 0).all(-1).sum()) == len(gauss_ids)
    # opacity-aware boxes are never larger than the 3.33-sigma ones
    assert bool((dense[0] <= ours[0]).all())


def test_emulation_packed_equals_unpacked():
    g, cams = scene(), cameras()
    Ks = cams.intrinsics.clone()
    Ks[:, :2, 2] += 0.5
    with emulated_gsplat() as gs:
        args = (g.means, g.quats, g.log_scales.exp(), torch.sigmoid(g.opacity_logits), g.sh, cams.world_to_cam, Ks,
                50, 37)
        a, alpha_a, _ = gs.rasterization(*args, sh_degree=3, packed=True, render_mode="RGB+ED")
        b, alpha_b, _ = gs.rasterization(*args, sh_degree=3, packed=False, render_mode="RGB+ED")
    assert torch.allclose(a, b, rtol=0, atol=1e-6) and torch.allclose(alpha_a, alpha_b, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ the adapter
@pytest.mark.parametrize("sh_degree", [0, 1, 3])
@pytest.mark.parametrize("background", [None, (0.2, 0.5, 0.9)])
def test_adapter_matches_torch_rasterizer(gsplat_on_cpu, sh_degree, background):
    g, cams = scene(), cameras()
    gs, ref = both(g, cams, sh_degree=sh_degree, background=background)
    assert len(gsplat_on_cpu) == 1, "the gsplat path was not taken (fallback to the torch rasterizer?)"
    assert not rasterize_gsplat._state["failed"] and rasterize_gsplat.has_worked()
    assert gs.rgb.shape == (3, 37, 50, 3) and gs.alpha.shape == (3, 37, 50) and gs.depth.shape == (3, 37, 50)
    call = gsplat_on_cpu[0]
    assert call["render_mode"] == "RGB+ED" and call["sh_degree"] == sh_degree
    assert call["backgrounds"] is None if background is None else call["backgrounds"].shape == (3, 3)
    # the scene is not trivial: every view shows Gaussians, and partly transparent pixels exist
    assert float(ref.alpha.amax(dim=(1, 2)).min()) > 0.5 and bool(((ref.alpha > 0.05) & (ref.alpha < 0.95)).any())
    assert parity_violations(gs, ref) == []


def test_adapter_near_far_and_empty_pixels(gsplat_on_cpu):
    """near/far reach gsplat as near_plane/far_plane; pixels nothing covers have alpha 0, depth 0, background."""
    g, cams = scene(), cameras()
    gs, ref = both(g, cams, near=2.0, far=3.0, background=(0.1, 0.2, 0.3))
    assert gsplat_on_cpu[0]["near_plane"] == 2.0 and gsplat_on_cpu[0]["far_plane"] == 3.0
    assert parity_violations(gs, ref) == []
    empty = ref.alpha == 0
    assert bool(empty.any())
    assert bool((gs.depth[empty] == 0).all()) and bool((gs.alpha[empty] == 0).all())
    assert torch.allclose(gs.rgb[empty], torch.tensor([0.1, 0.2, 0.3]).expand_as(gs.rgb[empty]))


def test_adapter_gradients_match(gsplat_on_cpu):
    """The adapter is differentiable in the raw parameters like our rasterizer: same gradients of one loss.

    Gradients are sums over pixels of products of rounded terms; bound 1e-3 x the largest |gradient| of each
    parameter (measured agreement ~1e-5 relative)."""
    g, cams = scene(n=80, seed=3, sh_degree=1), cameras()
    target = torch.rand(3, 37, 50, 3, generator=torch.Generator().manual_seed(0))
    grads = []
    for backend in ("gsplat", "torch"):
        leaves = [t.clone().requires_grad_(True) for t in (g.means, g.quats, g.log_scales, g.opacity_logits, g.sh)]
        out = render_fn(Gaussians(*leaves), cams, backend=backend)
        loss = (out.rgb - target).abs().mean() + 0.1 * (out.depth * out.alpha).mean()
        loss.backward()
        grads.append([t.grad for t in leaves])
    for name, a, b in zip(("means", "quats", "log_scales", "opacity_logits", "sh"), *grads):
        scale = float(b.abs().max())
        assert scale > 0, name
        assert float((a - b).abs().max()) <= 1e-3 * scale, name


# -------------------------------------------------------------- the test fails when the adapter is broken
def _break(kind):
    """A wrapper of gsplat.rasterization that receives what a broken adapter would pass."""
    def broken(real):
        def rasterization(means, quats, scales, opacities, colors, viewmats, Ks, width, height, **kw):
            if kind == "c2w instead of w2c":
                viewmats = torch.linalg.inv(viewmats)
            elif kind == "no +0.5 on the principal point":
                Ks = Ks.clone()
                Ks[:, :2, 2] -= 0.5
            elif kind == "RGB+D (accumulated depth)":
                kw["render_mode"] = "RGB+D"
            elif kind == "sh_degree ignored (all bands)":
                kw["sh_degree"] = int(round(math.sqrt(colors.shape[-2]))) - 1
            elif kind == "background with a depth channel":     # the adapter's bug before this test existed
                if kw.get("backgrounds") is not None:
                    kw["backgrounds"] = torch.cat([kw["backgrounds"], kw["backgrounds"][:, :1] * 0], -1)
            return real(means, quats, scales, opacities, colors, viewmats, Ks, width, height, **kw)
        return rasterization
    return broken


BREAKAGES = ["c2w instead of w2c", "no +0.5 on the principal point", "RGB+D (accumulated depth)",
             "sh_degree ignored (all bands)", "background with a depth channel"]


@pytest.mark.parametrize("kind", BREAKAGES)
def test_breakage_is_caught(gsplat_on_cpu, kind):
    """Sanity check of this file: each deliberate mistake makes the parity check above fail."""
    module = rasterize_gsplat._state["module"]
    module.rasterization = _break(kind)(module.rasterization)
    g, cams = scene(), cameras()
    gs, ref = both(g, cams, sh_degree=1, background=(0.2, 0.5, 0.9))
    fell_back = rasterize_gsplat._state["failed"]          # gsplat raised at first use: render() used ours
    assert fell_back or parity_violations(gs, ref) != [], f"{kind} went unnoticed"
    if kind == "background with a depth channel":
        assert fell_back                                    # gsplat rejects a (C, 5) background for 4 channels


def test_alpha_clamp_is_gsplats(gsplat_on_cpu):
    """Both backends clamp a Gaussian's alpha at 0.999, gsplat 1.5.3's rule (RasterizeToPixels3DGSFwd.cu; Inria
    3DGS used 0.99): one opaque Gaussian's centre pixel reads 0.999 through either."""
    g = Gaussians(torch.tensor([[0.0, 0.0, 2.0]]), torch.tensor([[1.0, 0, 0, 0]]), torch.log(torch.full((1, 3), 0.2)),
                  torch.tensor([12.0]), torch.zeros(1, 1, 3))
    K = torch.tensor([[[40.0, 0, 16.0], [0, 40.0, 16.0], [0, 0, 1]]])
    cam = Cameras(torch.eye(4)[None], K, 33, 33)
    gs, ref = both(g, cam)
    assert abs(float(gs.alpha[0, 16, 16]) - 0.999) < 1e-5
    assert abs(float(ref.alpha[0, 16, 16]) - 0.999) < 1e-5
