"""Confidence-aware 3D Gaussian Splatting: initialisation, rendering (gsplat or our torch rasterizer), the fit,
and the INRIA PLY format. See `render`, `fit_gaussians`, `init_from_scene`, `save_ply`."""

from .render import RenderOutput, render

__all__ = ["RenderOutput", "render"]
