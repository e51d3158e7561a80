"""gsplat's CUDA rasterizer behind our conventions, imported lazily.

gsplat JIT-compiles its CUDA kernels at first use; when that (or the import) fails we log one warning and the
caller falls back to our torch rasterizer. Pixel centres: ours are at integer coordinates, gsplat's at +0.5, so
the principal point is shifted by +0.5 before the call (DESIGN.md).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

_state = {"checked": False, "module": None, "failed": False, "worked": False}


def gsplat_available() -> bool:
    """True when gsplat imports and CUDA is present (the build itself is only tried at the first render)."""
    if not torch.cuda.is_available() or _state["failed"]:
        return False
    if not _state["checked"]:
        _state["checked"] = True
        try:
            import gsplat  # noqa: F401  (optional dependency, see requirements-gpu.txt)
            _state["module"] = gsplat
        except Exception as exc:  # any import-time failure means "not usable", never a crash
            log.warning("gsplat unavailable (%s); using the torch rasterizer", str(exc).splitlines()[0][:200])
            _state["failed"] = True
    return _state["module"] is not None


def mark_worked() -> None:
    """Remember that gsplat rendered once: from then on its errors are real errors, not a failed build."""
    _state["worked"] = True


def has_worked() -> bool:
    return _state["worked"]


def mark_failed(exc: BaseException) -> None:
    """Remember that gsplat's build or call failed, with one warning, so later renders skip it."""
    if not _state["failed"]:
        log.warning("gsplat failed at first use (%s); falling back to the torch rasterizer. Install nvcc/CUDA_HOME "
                    "or uninstall gsplat to silence this.", str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
    _state["failed"] = True
    _state["module"] = None


def render_gsplat(means, quats, scales, opacities, sh, world_to_cam, intrinsics, width, height, background,
                  near, far, sh_degree, eps2d, absgrad=False):
    """Render N cameras with gsplat.rasterization.

    means (G, 3) world; quats (G, 4) wxyz; scales (G, 3) linear; opacities (G,) in [0, 1]; sh (G, K, 3);
    world_to_cam (N, 4, 4) (gsplat's `viewmats` are world-to-camera); intrinsics (N, 3, 3) integer-centre
    convention; background (3,) or None; sh_degree <= sqrt(K) - 1.
    Returns rgb (N, H, W, 3) with the background composited, alpha (N, H, W), depth (N, H, W) the expected camera z
    (0 where alpha <= 1e-6, as our rasterizer), info dict (gsplat's).
    """
    gsplat = _state["module"]
    Ks = intrinsics.clone()
    Ks[:, 0, 2] += 0.5
    Ks[:, 1, 2] += 0.5
    # Three channels only: in "RGB+ED" mode gsplat appends the depth channel's (zero) background itself, and a
    # fourth channel here makes its rasterizer reject the (N, 5) backgrounds.
    bg = None if background is None else background.reshape(1, 3).expand(len(world_to_cam), 3).contiguous()
    colors, alphas, info = gsplat.rasterization(
        means, quats, scales, opacities, sh, world_to_cam, Ks, width, height, near_plane=near, far_plane=far,
        eps2d=eps2d, sh_degree=sh_degree, backgrounds=bg, render_mode="RGB+ED", absgrad=absgrad)
    alpha = alphas[..., 0]
    # gsplat divides the accumulated depth by max(alpha, 1e-10); ours reports 0 under alpha 1e-6.
    depth = torch.where(alpha > 1e-6, colors[..., 3], torch.zeros_like(alpha))
    return colors[..., :3], alpha, depth, info
