"""Parity of our torch rasterizer with gsplat's math.

References written in this file (not imported from reconx_core):
- projection and SH: the formulas of gsplat's pure-torch helpers (gsplat/cuda/_torch_impl.py: _world_to_cam,
  _persp_proj, _fully_fused_projection, _eval_sh_bases_fast), re-typed here in gsplat's own frame (+0.5 pixels);
- image: a brute-force renderer that visits every Gaussian for every pixel in depth order, with gsplat's
  per-pixel rules (alpha clamp 0.999 as gsplat 1.5.3, skip below 1/255 or sigma < 0, exclusive stop at transmittance 1e-4).
"""

import math

import pytest
import torch

from reconx_core.errors import InputError
from reconx_core.gaussians import render
from reconx_core.gaussians.project import project_gaussians
from reconx_core.gaussians.sh import sh_basis, sh_to_rgb
from reconx_core.types import Cameras, Gaussians

# Images and alphas lie in [0, 1], so the absolute 1e-4 on them is relative (840 eps); every bound here measured at
# most 16 % of itself on five numeric paths (default, MKL_CBWR=COMPATIBLE, MKL/oneDNN AVX2, those + ATEN avx2, ATEN
# default). CI runs the module again on a second numeric path (Makefile test-numeric).
pytestmark = pytest.mark.numeric


def random_gaussians(n, seed=0, sh_degree=3, scale=0.05, spread=(0.5, 0.4, 0.4), centre=(0.0, 0.0, 2.5)):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=g) * torch.tensor(spread) + torch.tensor(centre)
    quats = torch.randn(n, 4, generator=g)
    log_scales = torch.log(scale * (0.2 + torch.rand(n, 3, generator=g)))
    opacity_logits = torch.randn(n, generator=g) * 1.5
    sh = torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g) * 0.3
    return Gaussians(means, quats, log_scales, opacity_logits, sh)


def look_at_cameras(n, W, H, radius=2.5, target=(0.0, 0.0, 2.5), focal=None):
    """n cameras on an arc around `target`, looking at it (OpenCV)."""
    c2w = []
    for k in range(n):
        ang = (k - (n - 1) / 2) * 0.35
        eye = torch.tensor(target) + radius * torch.tensor([math.sin(ang), -0.15, -math.cos(ang)])
        fwd = torch.nn.functional.normalize(torch.tensor(target) - eye, dim=0)
        right = torch.nn.functional.normalize(torch.linalg.cross(fwd, torch.tensor([0.0, -1.0, 0.0])), dim=0)
        right = -right if right[0] * math.cos(ang) < 0 else right
        down = torch.linalg.cross(fwd, right)
        M = torch.eye(4)
        M[:3, 0], M[:3, 1], M[:3, 2], M[:3, 3] = right, down, fwd, eye
        c2w.append(M)
    f = focal or 1.1 * W
    K = torch.tensor([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1.0]])
    return Cameras(torch.stack(c2w), K.expand(n, 3, 3).clone(), W, H)


# ---------- references from gsplat's formulas (its frame: pixel centres at +0.5) ----------

def ref_quat_to_rotmat(q):
    w, x, y, z = torch.nn.functional.normalize(q, dim=-1).unbind(-1)
    return torch.stack([1 - 2 * (y ** 2 + z ** 2), 2 * (x * y - w * z), 2 * (x * z + w * y),
                        2 * (x * y + w * z), 1 - 2 * (x ** 2 + z ** 2), 2 * (y * z - w * x),
                        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x ** 2 + y ** 2)], -1).reshape(-1, 3, 3)


def ref_projection(means, quats, scales, opac, viewmat, Kg, W, H, near=0.01, far=1e10, eps2d=0.3):
    """gsplat's _fully_fused_projection (pinhole) + the CUDA kernel's opacity-aware radius; Kg has cx+0.5."""
    R = ref_quat_to_rotmat(quats)
    M = R * scales[:, None, :]
    covars = torch.einsum("nij,nkj->nik", M, M)
    Rv, t = viewmat[:3, :3], viewmat[:3, 3]
    mc = torch.einsum("ij,nj->ni", Rv, means) + t
    cc = Rv @ covars @ Rv.T
    tx, ty, tz = mc.unbind(-1)
    fx, fy, cx, cy = Kg[0, 0], Kg[1, 1], Kg[0, 2], Kg[1, 2]
    tan_fovx, tan_fovy = 0.5 * W / fx, 0.5 * H / fy
    lim_x_pos, lim_x_neg = (W - cx) / fx + 0.3 * tan_fovx, cx / fx + 0.3 * tan_fovx
    lim_y_pos, lim_y_neg = (H - cy) / fy + 0.3 * tan_fovy, cy / fy + 0.3 * tan_fovy
    txc = tz * torch.clamp(tx / tz, min=-lim_x_neg, max=lim_x_pos)
    tyc = tz * torch.clamp(ty / tz, min=-lim_y_neg, max=lim_y_pos)
    O = torch.zeros_like(tz)
    J = torch.stack([fx / tz, O, -fx * txc / tz ** 2, O, fy / tz, -fy * tyc / tz ** 2], -1).reshape(-1, 2, 3)
    cov2d = J @ cc @ J.transpose(-1, -2) + torch.eye(2) * eps2d
    means2d = torch.einsum("ij,nj->ni", Kg[:2, :3], mc) / tz[:, None]
    det = (cov2d[:, 0, 0] * cov2d[:, 1, 1] - cov2d[:, 0, 1] * cov2d[:, 1, 0]).clamp(min=1e-10)
    conics = torch.stack([cov2d[:, 1, 1] / det, -(cov2d[:, 0, 1] + cov2d[:, 1, 0]) / 2 / det, cov2d[:, 0, 0] / det], -1)
    extend = torch.minimum(torch.tensor(3.33), torch.sqrt(2 * torch.log((opac * 255).clamp(min=1))))
    rx, ry = torch.ceil(extend * cov2d[:, 0, 0].sqrt()), torch.ceil(extend * cov2d[:, 1, 1].sqrt())
    valid = (tz > near) & (tz < far) & (opac >= 1 / 255)
    inside = (means2d[:, 0] + rx > 0) & (means2d[:, 0] - rx < W) & (means2d[:, 1] + ry > 0) & (means2d[:, 1] - ry < H)
    return means2d, conics, tz, valid & inside, torch.stack([rx, ry], -1)


def ref_sh_basis_gsplat(dirs, degree):
    """gsplat's _eval_sh_bases_fast (Sloan's recurrences), for degrees 0-4."""
    x, y, z = dirs.unbind(-1)
    r = [torch.full_like(x, 0.2820947917738781)]
    if degree >= 1:
        a = -0.48860251190292
        r += [a * y, -a * z, a * x]
    if degree >= 2:
        z2 = z * z
        tb, ta = -1.092548430592079 * z, 0.5462742152960395
        c1, s1 = x * x - y * y, 2 * x * y
        r += [ta * s1, tb * y, 0.9461746957575601 * z2 - 0.3153915652525201, tb * x, ta * c1]
    if degree >= 3:
        tc, tb, ta = -2.285228997322329 * z2 + 0.4570457994644658, 1.445305721320277 * z, -0.5900435899266435
        c2, s2 = x * c1 - y * s1, x * s1 + y * c1
        r += [ta * s2, tb * s1, tc * y, z * (1.865881662950577 * z2 - 1.119528997770346), tc * x, tb * c1, ta * c2]
    if degree >= 4:
        td = z * (-4.683325804901025 * z2 + 2.007139630671868)
        tc, tb, ta = 3.31161143515146 * z2 - 0.47308734787878, -1.770130769779931 * z, 0.6258357354491763
        c3, s3 = x * c2 - y * s2, x * s2 + y * c2
        p20 = 1.984313483298443 * z2 * (1.865881662950577 * z2 - 1.119528997770346) \
            - 1.006230589874905 * (0.9461746957575601 * z2 - 0.3153915652525201)
        r += [ta * s3, tb * s2, tc * s1, td * y, p20, td * x, tc * c1, tb * c2, ta * c3]
    return torch.stack(r, -1)


def brute_force_render(g: Gaussians, cams: Cameras, background=None, near=0.01, far=1e10):
    """Every pixel against every Gaussian, front to back, sequentially (gsplat's per-pixel rules)."""
    W, H = cams.width, cams.height
    out_rgb, out_a, out_d = [], [], []
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    px, py = u.reshape(-1) + 0.5, v.reshape(-1) + 0.5          # gsplat's pixel centres
    for i in range(len(cams)):
        Kg = cams.intrinsics[i].clone()
        Kg[0, 2] += 0.5
        Kg[1, 2] += 0.5
        opac = torch.sigmoid(g.opacity_logits)
        m2, con, z, keep, _ = ref_projection(g.means, g.quats, g.log_scales.exp(), opac,
                                             torch.linalg.inv(cams.cam_to_world[i]), Kg, W, H, near, far)
        dirs = torch.nn.functional.normalize(g.means - cams.cam_to_world[i, :3, 3], dim=-1)
        colours = (torch.einsum("nk,nkc->nc", ref_sh_basis_gsplat(dirs, g.sh_degree), g.sh) + 0.5).clamp_min(0)
        T = torch.ones_like(px)
        done = torch.zeros_like(px, dtype=torch.bool)
        rgb, dep = torch.zeros(px.shape[0], 3), torch.zeros_like(px)
        for k in torch.argsort(z).tolist():
            if not keep[k]:
                continue
            dx, dy = m2[k, 0] - px, m2[k, 1] - py
            sigma = 0.5 * (con[k, 0] * dx * dx + con[k, 2] * dy * dy) + con[k, 1] * dx * dy
            alpha = torch.clamp_max(opac[k] * torch.exp(-sigma), 0.999)
            use = (sigma >= 0) & (alpha >= 1 / 255) & ~done
            next_T = T * (1 - alpha)
            stop = use & (next_T <= 1e-4)
            done = done | stop
            use = use & ~stop
            w = torch.where(use, alpha * T, torch.zeros_like(T))
            rgb = rgb + w[:, None] * colours[k]
            dep = dep + w * z[k]
            T = torch.where(use, next_T, T)
        a = 1 - T
        if background is not None:
            rgb = rgb + T[:, None] * background
        out_rgb.append(rgb.reshape(H, W, 3)), out_a.append(a.reshape(H, W))
        out_d.append(torch.where(a > 1e-6, dep / a.clamp_min(1e-6), torch.zeros_like(a)).reshape(H, W))
    return torch.stack(out_rgb), torch.stack(out_a), torch.stack(out_d)


# ---------- tests ----------

@pytest.mark.parametrize("degree", [0, 1, 2, 3, 4])
def test_sh_basis_matches_gsplat(degree):
    dirs = torch.nn.functional.normalize(torch.randn(500, 3, generator=torch.Generator().manual_seed(degree)), dim=-1)
    torch.testing.assert_close(sh_basis(dirs, degree), ref_sh_basis_gsplat(dirs, degree), atol=1e-6, rtol=1e-5)


def test_sh_colour_uses_fewer_bands_and_clamps():
    g = random_gaussians(50, sh_degree=3)
    dirs = torch.randn(50, 3)
    full = sh_to_rgb(g.sh, dirs)
    dc_only = sh_to_rgb(g.sh, dirs, degree=0)
    torch.testing.assert_close(dc_only, (g.sh[:, 0] * 0.28209479177387814 + 0.5).clamp_min(0))
    assert (full >= 0).all() and not torch.allclose(full, dc_only)


def test_projection_matches_gsplat_formulas():
    g = random_gaussians(400, seed=1, spread=(1.5, 1.2, 1.0))
    cams = look_at_cameras(2, 48, 32)
    for i in range(2):
        K = cams.intrinsics[i]
        Kg = K.clone()
        Kg[0, 2] += 0.5
        Kg[1, 2] += 0.5
        w2c = torch.linalg.inv(cams.cam_to_world[i])
        opac = torch.sigmoid(g.opacity_logits)
        p = project_gaussians(g.means, g.quats, g.log_scales.exp(), opac, w2c, K, 48, 32)
        m2, con, z, keep, radii = ref_projection(g.means, g.quats, g.log_scales.exp(), opac, w2c, Kg, 48, 32)
        assert keep.sum() > 50 and (~keep).sum() > 10, "the scene should exercise culling both ways"
        # Culling and radii are decisions on float32 values; they agree exactly because this seeded scene keeps
        # every Gaussian away from a decision boundary: measured (float64) >= 8.2e-5 relative between a radius and
        # an integer, >= 0.006 px between a footprint and an image edge, 0.015 in depth from the near plane and
        # from opacity 1/255, against float32 differences of ~1e-6 relative (~5e-5 px at 50 px).
        assert torch.equal(p.visible, keep)
        torch.testing.assert_close(p.means2d[keep] + 0.5, m2[keep], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(p.conics[keep], con[keep], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(p.depths, z)
        assert torch.equal(p.radii[keep].float(), radii[keep])


@pytest.mark.parametrize("tile_size", [8, 16])
def test_render_matches_brute_force(tile_size):
    g = random_gaussians(300, seed=2, scale=0.06)
    g.opacity_logits[:120] = 6.0   # opaque ones: exercises the 0.999 clamp and the transmittance stop
    cams = look_at_cameras(2, 40, 28)
    bg = torch.tensor([0.2, 0.4, 0.9])
    ours = render(g, cams, backend="torch", background=bg, tile_size=tile_size, chunk_elems=1 << 14)
    rgb, alpha, depth = brute_force_render(g, cams, background=bg)
    assert alpha.max() > 0.99 and alpha.min() < 0.1, "need both saturated and empty pixels"
    torch.testing.assert_close(ours.rgb, rgb, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.alpha, alpha, atol=1e-4, rtol=0)
    solid = alpha > 0.5
    torch.testing.assert_close(ours.depth[solid], depth[solid], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("saved", ["all", "some", "none"])
def test_render_gradients_match_brute_force(saved, monkeypatch):
    """Gradients of the hand-written backward, with the forward's tensors kept, partly kept or recomputed."""
    import reconx_core.gaussians.rasterize_torch as rt

    budget = {"all": None, "some": 1 << 13, "none": 0}[saved]
    if budget is not None:
        monkeypatch.setattr(rt, "SAVE_ELEMS", budget)
    calls = []
    chunk_weights = rt._chunk_weights
    monkeypatch.setattr(rt, "_chunk_weights", lambda *a: calls.append(a[3]) or chunk_weights(*a))
    torch.manual_seed(0)
    base = random_gaussians(60, seed=3, scale=0.08, sh_degree=1)
    base.opacity_logits[:10] = 6.0
    cams = look_at_cameras(1, 24, 20)
    weights = torch.rand(1, 20, 24, 3)
    grads, outs = [], []
    for fn in (lambda g: render(g, cams, backend="torch", chunk_elems=1 << 12),
               lambda g: brute_force_render(g, cams)):
        leaves = [t.detach().clone().requires_grad_() for t in
                  (base.means, base.quats, base.log_scales, base.opacity_logits, base.sh)]
        out = fn(Gaussians(*leaves))
        rgb, alpha, depth = (out.rgb, out.alpha, out.depth) if hasattr(out, "rgb") else out
        ((rgb * weights).sum() + alpha.sum() * 0.3 + (depth * alpha).sum() * 0.1).backward()
        grads.append([t.grad for t in leaves])
        outs.append((rgb.detach(), alpha.detach()))
    # The forward that keeps tensors for the backward renders the same image as the plain one.
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-4, rtol=0)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-4, rtol=0)
    # Each chunk's backward tensors are made once: in the forward when kept (True), else in the backward, after a
    # forward that skipped them (False).
    n_chunks, recomputed = calls.count(True), calls.count(False)
    assert n_chunks >= 4, "the test needs several chunks"
    assert {"all": recomputed == 0, "some": 0 < recomputed < n_chunks, "none": recomputed == n_chunks}[saved], \
        (saved, n_chunks, recomputed)
    for name, a, b in zip(("means", "quats", "log_scales", "opacity", "sh"), *grads):
        scale = b.abs().max()
        assert scale > 0, name
        assert (a - b).abs().max() <= 1e-3 * scale + 1e-5, (name, (a - b).abs().max().item(), scale.item())


def test_culling_near_far_and_empty_views():
    g = random_gaussians(100, seed=4)
    cams = look_at_cameras(1, 32, 24)
    full = render(g, cams, backend="torch")
    # A near plane beyond the whole scene leaves nothing; a far plane before it too.
    assert render(g, cams, backend="torch", near=100.0).alpha.max() == 0
    assert render(g, cams, backend="torch", far=0.5).alpha.max() == 0
    assert full.alpha.max() > 0.5
    rgb, alpha, _ = brute_force_render(g, cams, near=2.0)
    torch.testing.assert_close(render(g, cams, backend="torch", near=2.0).rgb, rgb, atol=1e-4, rtol=0)


def test_render_rejects_bad_backend():
    g = random_gaussians(5)
    with pytest.raises(InputError, match="backend"):
        render(g, look_at_cameras(1, 8, 8), backend="vulkan")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            render(g, look_at_cameras(1, 8, 8), backend="gsplat")


def test_gsplat_errors_after_a_working_first_use_are_not_swallowed(monkeypatch):
    """A failed first use (no build) falls back to our rasterizer once; later gsplat errors (e.g. a callback
    interrupt, a real bug) must surface instead of silently switching renderers."""
    import importlib

    from reconx_core.gaussians import rasterize_gsplat
    from tests.synthetic_textured import arc_cameras

    render_module = importlib.import_module("reconx_core.gaussians.render")  # the package's `render` is the function

    monkeypatch.setattr(rasterize_gsplat, "_state", {"checked": True, "module": object(), "failed": False,
                                                     "worked": False})
    monkeypatch.setattr(render_module, "resolve_backend", lambda backend, device: "gsplat")
    g = Gaussians(torch.zeros(4, 3) + torch.tensor([0.0, 0.0, 3.0]), torch.tensor([[1.0, 0, 0, 0]]).repeat(4, 1),
                  torch.full((4, 3), -2.0), torch.zeros(4), torch.zeros(4, 1, 3))
    cams = arc_cameras([0.0], 16, 12)

    def broken(*args, **kwargs):
        raise RuntimeError("nvcc not found")

    monkeypatch.setattr(rasterize_gsplat, "render_gsplat", broken)
    out = render_module.render(g, cams)  # first use fails: warn, fall back
    assert out.rgb.shape == (1, 12, 16, 3) and rasterize_gsplat._state["failed"]

    monkeypatch.setattr(rasterize_gsplat, "_state", {"checked": True, "module": object(), "failed": False,
                                                     "worked": True})
    with pytest.raises(RuntimeError, match="nvcc"):
        render_module.render(g, cams)  # it had worked before: the error is real
