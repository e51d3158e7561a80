"""Confidence-aware 3D Gaussian Splatting: initialisation, rendering (gsplat or our torch rasterizer), the fit,
and the INRIA PLY format.

Entry points: `render`, `fit_gaussians`, `init_from_scene`, `init_from_points`, `to_activated`, `save_ply`,
`load_ply`, `load_lpips`.
"""

from .fit import fit_gaussians, refine_cameras, scene_extent
from .init import init_from_points, init_from_scene, to_activated
from .losses import load_lpips, ssim_map
from .ply import load_ply, save_ply
from .render import RenderOutput, render

__all__ = ["RenderOutput", "render", "fit_gaussians", "refine_cameras", "scene_extent", "init_from_points",
           "init_from_scene", "to_activated", "load_lpips", "ssim_map", "save_ply", "load_ply"]
