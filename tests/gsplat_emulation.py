"""A CPU stand-in for `gsplat.rasterization` (gsplat 1.5.x), for testing our adapter without a GPU.

`gsplat.rasterization` is a Python front end (gsplat/rendering.py: argument checks, packed/unpacked layouts, SH
evaluation, the "RGB+ED" depth channel and its background, the expected-depth division) over five CUDA entry
points imported into gsplat.rendering: fully_fused_projection, spherical_harmonics, isect_tiles,
isect_offset_encode and rasterize_to_pixels. `emulated_gsplat()` keeps that front end exactly as installed and
swaps only those five names for CPU versions:

- projection: gsplat's own pure-PyTorch pieces from gsplat/cuda/_torch_impl.py (_quat_scale_to_covar_preci,
  _world_to_cam, _persp_proj), finished as the CUDA kernel (csrc/ProjectionEWA3DGSFused.cu) does: eps2d blur,
  inverse covariance, opacity-aware box (extend = min(3.33, sqrt(2 ln(255 opacity))), opacity < 1/255 culled),
  radius_clip, off-image cull, and the packed (COO) layout with int64 ids;
- SH: _torch_impl._spherical_harmonics, zero where masked (the CUDA kernel skips masked entries);
- tiling: _torch_impl._isect_tiles and _isect_offset_encode (the packed layout is scattered to a dense one and
  mapped back, since the reference only handles the dense layout);
- compositing: a brute-force, differentiable per-tile loop with the CUDA kernel's rules
  (csrc/RasterizeToPixels3DGSFwd.cu): pixel centres at (x + 0.5, y + 0.5), sigma = 0.5 (a dx^2 + c dy^2) + b dx dy,
  alpha = min(0.999, opacity exp(-sigma)), skip when sigma < 0 or alpha < 1/255, stop (exclusive) when the
  transmittance would reach <= 1e-4, out = sum w c + T_final background, alpha = 1 - T_final; plus the wrapper's
  input checks (shapes, background channels). gsplat's own _rasterize_to_pixels cannot be used: it calls the CUDA
  `rasterize_to_indices_in_range`.

Only the pinhole camera, classic/antialiased modes and no distortion are emulated (all our adapter uses). The
tiling reference loops in Python over every (image, Gaussian): keep scenes to a few hundred Gaussians.
Imports: `import gsplat` and `gsplat.cuda._torch_impl` need only torch, typing_extensions, jaxtyping and rich (all
installed with gsplat) and never touch the CUDA backend, which is imported lazily at the first kernel call; the
pure-PyTorch `gsplat.rendering._rasterization` would need nerfacc and CUDA kernels, and is not used.
"""

from __future__ import annotations

import contextlib
import math

import torch

ALPHA_THRESHOLD = 1.0 / 255.0   # csrc/include/Common.h
MAX_ALPHA = 0.999               # csrc/RasterizeToPixels3DGSFwd.cu: min(0.999f, opac * __expf(-sigma))
STOP_TRANSMITTANCE = 1e-4       # next_T <= 1e-4f: this pixel is done (exclusive)
SUPPORTED_CHANNELS = (1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65, 128, 129, 256, 257, 512, 513)


def _impl():
    from gsplat.cuda import _torch_impl
    return _torch_impl


def fully_fused_projection(means, covars, quats, scales, viewmats, Ks, width, height, eps2d=0.3, near_plane=0.01,
                           far_plane=1e10, radius_clip=0.0, packed=False, sparse_grad=False,
                           calc_compensations=False, camera_model="pinhole", opacities=None):
    """CPU version of gsplat.cuda._wrapper.fully_fused_projection (same arguments and outputs)."""
    T = _impl()
    assert camera_model == "pinhole", "the emulation covers the pinhole camera only"
    batch_dims = means.shape[:-2]
    N, C = means.shape[-2], viewmats.shape[-3]
    assert means.shape == batch_dims + (N, 3), means.shape
    assert viewmats.shape == batch_dims + (C, 4, 4), viewmats.shape
    assert Ks.shape == batch_dims + (C, 3, 3), Ks.shape
    if covars is None:
        assert quats.shape == batch_dims + (N, 4) and scales.shape == batch_dims + (N, 3)
        covars, _ = T._quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    else:
        assert covars.shape == batch_dims + (N, 6), covars.shape
        a, b, c, d, e, f = covars.unbind(-1)
        covars = torch.stack([a, b, c, b, d, e, c, e, f], -1).reshape(batch_dims + (N, 3, 3))
    if opacities is not None:
        assert opacities.shape == batch_dims + (N,), opacities.shape
    means_c, covars_c = T._world_to_cam(means, covars, viewmats)
    means2d, cov2d = T._persp_proj(means_c, covars_c, Ks, width, height)
    det_orig = cov2d[..., 0, 0] * cov2d[..., 1, 1] - cov2d[..., 0, 1] * cov2d[..., 1, 0]
    cov2d = cov2d + eps2d * torch.eye(2, dtype=means.dtype)
    det = cov2d[..., 0, 0] * cov2d[..., 1, 1] - cov2d[..., 0, 1] * cov2d[..., 1, 0]
    compensations = torch.sqrt((det_orig / det).clamp_min(0.0)) if calc_compensations else None
    safe_det = det.clamp_min(1e-10)
    conics = torch.stack([cov2d[..., 1, 1] / safe_det, -(cov2d[..., 0, 1] + cov2d[..., 1, 0]) / 2.0 / safe_det,
                          cov2d[..., 0, 0] / safe_det], -1)
    depths = means_c[..., 2]
    with torch.no_grad():
        extend = torch.full_like(depths, 3.33)
        valid = (det > 0) & (depths > near_plane) & (depths < far_plane)
        if opacities is not None:
            op = opacities.detach()[..., None, :].expand_as(depths)
            if compensations is not None:
                op = op * compensations.detach()
            valid &= op >= ALPHA_THRESHOLD
            extend = torch.minimum(extend, torch.sqrt(2.0 * torch.log((op / ALPHA_THRESHOLD).clamp_min(1.0))))
        rx = torch.ceil(extend * cov2d[..., 0, 0].detach().clamp_min(0).sqrt())
        ry = torch.ceil(extend * cov2d[..., 1, 1].detach().clamp_min(0).sqrt())
        valid &= ~((rx <= radius_clip) & (ry <= radius_clip))
        m = means2d.detach()
        valid &= ~((m[..., 0] + rx <= 0) | (m[..., 0] - rx >= width) | (m[..., 1] + ry <= 0) | (m[..., 1] - ry >= height))
        radii = torch.stack([rx, ry], -1).where(valid[..., None], torch.zeros_like(m)).to(torch.int32)
    if not packed:
        return radii, means2d, depths, conics, compensations
    B = math.prod(batch_dims)
    flat_valid = valid.reshape(B, C, N)
    batch_ids, camera_ids, gaussian_ids = torch.nonzero(flat_valid, as_tuple=True)   # int64, as the CUDA code
    sel = lambda t: t.reshape((B, C, N) + t.shape[len(batch_dims) + 2:])[batch_ids, camera_ids, gaussian_ids]  # noqa: E731
    return (batch_ids, camera_ids, gaussian_ids, sel(radii), sel(means2d), sel(depths), sel(conics),
            None if compensations is None else sel(compensations))


def spherical_harmonics(degrees_to_use, dirs, coeffs, masks=None):
    """CPU version of gsplat.cuda._wrapper.spherical_harmonics: _torch_impl's, zero where masked out."""
    out = _impl()._spherical_harmonics(degrees_to_use, dirs, coeffs)
    if masks is not None:
        assert masks.shape == dirs.shape[:-1], masks.shape
        out = out * masks[..., None].to(out.dtype)
    return out


@torch.no_grad()
def isect_tiles(means2d, radii, depths, tile_size, tile_width, tile_height, sort=True, segmented=False,
                packed=False, n_images=None, image_ids=None, gaussian_ids=None):
    """CPU version of gsplat.cuda._wrapper.isect_tiles (flatten ids index [I * N] or, packed, [nnz])."""
    T = _impl()
    if not packed:
        return T._isect_tiles(means2d, radii, depths, tile_size, tile_width, tile_height, sort)
    nnz = means2d.shape[0]
    assert means2d.shape == (nnz, 2) and radii.shape == (nnz, 2) and depths.shape == (nnz,)
    assert image_ids is not None and gaussian_ids is not None and n_images is not None
    N = int(gaussian_ids.max()) + 1 if nnz else 1
    dense_m = means2d.new_zeros(n_images, N, 2)
    dense_r = radii.new_zeros(n_images, N, 2)
    dense_d = depths.new_zeros(n_images, N)
    dense_m[image_ids, gaussian_ids], dense_r[image_ids, gaussian_ids] = means2d, radii
    dense_d[image_ids, gaussian_ids] = depths
    tiles_dense, isect_ids, flat = T._isect_tiles(dense_m, dense_r, dense_d, tile_size, tile_width, tile_height, sort)
    packed_index = torch.full((n_images * N,), -1, dtype=torch.int64)
    packed_index[image_ids * N + gaussian_ids] = torch.arange(nnz)
    flat = packed_index[flat.long()].to(torch.int32)
    assert bool((flat >= 0).all())
    return tiles_dense[image_ids, gaussian_ids], isect_ids, flat


@torch.no_grad()
def isect_offset_encode(isect_ids, n_images, tile_width, tile_height):
    """CPU version of gsplat.cuda._wrapper.isect_offset_encode (_torch_impl's)."""
    return _impl()._isect_offset_encode(isect_ids, n_images, tile_width, tile_height)


def rasterize_to_pixels(means2d, conics, colors, opacities, image_width, image_height, tile_size, isect_offsets,
                        flatten_ids, backgrounds=None, masks=None, packed=False, absgrad=False):
    """CPU version of gsplat.cuda._wrapper.rasterize_to_pixels: its input checks, then brute-force compositing of
    each tile's depth-sorted list with the CUDA kernel's rules (differentiable through autograd).

    Returns render_colors [..., H, W, channels] and render_alphas [..., H, W, 1].
    """
    image_dims = isect_offsets.shape[:-2]
    I = math.prod(image_dims)
    channels = colors.shape[-1]
    if packed:
        nnz = means2d.shape[0]
        assert means2d.shape == (nnz, 2), means2d.shape
        assert conics.shape == (nnz, 3), conics.shape
        assert colors.shape[0] == nnz, colors.shape
        assert opacities.shape == (nnz,), opacities.shape
        flat_m, flat_c, flat_col, flat_o = means2d, conics, colors, opacities
    else:
        N = means2d.shape[-2]
        assert means2d.shape == image_dims + (N, 2), means2d.shape
        assert conics.shape == image_dims + (N, 3), conics.shape
        assert colors.shape == image_dims + (N, channels), colors.shape
        assert opacities.shape == image_dims + (N,), opacities.shape
        flat_m, flat_c = means2d.reshape(I * N, 2), conics.reshape(I * N, 3)
        flat_col, flat_o = colors.reshape(I * N, channels), opacities.reshape(I * N)
    if backgrounds is not None:
        assert backgrounds.shape == image_dims + (channels,), backgrounds.shape
    if masks is not None:
        assert masks.shape == isect_offsets.shape, masks.shape
    if channels > 513 or channels == 0:
        raise ValueError(f"Unsupported number of color channels: {channels}")
    tile_height, tile_width = isect_offsets.shape[-2:]
    assert tile_height * tile_size >= image_height and tile_width * tile_size >= image_width

    offsets = isect_offsets.reshape(-1).tolist() + [int(flatten_ids.shape[0])]
    bg = None if backgrounds is None else backgrounds.reshape(I, channels)
    mask = None if masks is None else masks.reshape(I, tile_height, tile_width)
    images, alphas = [], []
    for img in range(I):
        rows = []
        arows = []
        for ty in range(tile_height):
            cols, acols = [], []
            for tx in range(tile_width):
                y0, x0 = ty * tile_size, tx * tile_size
                h, w = min(tile_size, image_height - y0), min(tile_size, image_width - x0)
                k = (img * tile_height + ty) * tile_width + tx
                ids = flatten_ids[offsets[k]:offsets[k + 1]].long()
                if (mask is not None and not bool(mask[img, ty, tx])) or ids.numel() == 0:
                    fill = flat_col.new_zeros(h, w, channels) if bg is None else bg[img].expand(h, w, channels)
                    cols.append(fill)
                    acols.append(flat_col.new_zeros(h, w, 1))
                    continue
                py, px = torch.meshgrid(torch.arange(y0, y0 + h, dtype=flat_m.dtype) + 0.5,
                                        torch.arange(x0, x0 + w, dtype=flat_m.dtype) + 0.5, indexing="ij")
                pix = torch.stack([px.reshape(-1), py.reshape(-1)], -1)                # (P, 2)
                delta = flat_m[ids][None, :, :] - pix[:, None, :]                     # (P, k, 2), mean - pixel
                a, b, c = flat_c[ids].unbind(-1)
                sigma = 0.5 * (a * delta[..., 0] ** 2 + c * delta[..., 1] ** 2) + b * delta[..., 0] * delta[..., 1]
                alpha = (flat_o[ids] * torch.exp(-sigma)).clamp_max(MAX_ALPHA)
                alpha = alpha * ((sigma >= 0) & (alpha >= ALPHA_THRESHOLD)).to(alpha.dtype)
                t_after = torch.cumprod(1.0 - alpha, dim=1)
                t_before = torch.cat([torch.ones_like(t_after[:, :1]), t_after[:, :-1]], 1)
                blended = (t_after > STOP_TRANSMITTANCE).to(alpha.dtype)              # exclusive stop
                weights = alpha * t_before * blended
                out = weights @ flat_col[ids]                                          # (P, channels)
                t_final = torch.where(blended > 0, 1.0 - alpha, torch.ones_like(alpha)).prod(1)
                if bg is not None:
                    out = out + t_final[:, None] * bg[img]
                cols.append(out.reshape(h, w, channels))
                acols.append((1.0 - t_final).reshape(h, w, 1))
            rows.append(torch.cat(cols, 1))
            arows.append(torch.cat(acols, 1))
        images.append(torch.cat(rows, 0))
        alphas.append(torch.cat(arows, 0))
    render_colors = torch.stack(images).reshape(image_dims + (image_height, image_width, channels))
    render_alphas = torch.stack(alphas).reshape(image_dims + (image_height, image_width, 1))
    return render_colors, render_alphas


PATCHED = {"fully_fused_projection": fully_fused_projection, "spherical_harmonics": spherical_harmonics,
           "isect_tiles": isect_tiles, "isect_offset_encode": isect_offset_encode,
           "rasterize_to_pixels": rasterize_to_pixels}


@contextlib.contextmanager
def emulated_gsplat():
    """Within the block, gsplat.rasterization runs on the CPU: its front end unchanged, its five CUDA entry points
    replaced by the versions above. Yields the gsplat module. Needs gsplat installed (no build, no GPU)."""
    import gsplat
    import gsplat.rendering as rendering

    saved = {name: getattr(rendering, name) for name in PATCHED}
    try:
        for name, fn in PATCHED.items():
            setattr(rendering, name, fn)
        yield gsplat
    finally:
        for name, fn in saved.items():
            setattr(rendering, name, fn)
