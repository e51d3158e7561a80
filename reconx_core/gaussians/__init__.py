"""Confidence-aware 3D Gaussian Splatting: initialisation, rendering (gsplat or our torch rasterizer), the fit,
and the INRIA PLY format.

Entry points: `render`, `fit_gaussians` / `optimize_gaussians` (with `FitConfig`, `FitResult`, `DensifyStrategy`),
`fit_to_views` / `fit_to_scene` (ReconX's recipes), `init_from_scene`, `init_from_views`, `init_from_points`,
`to_activated`, `save_ply`, `load_ply`, `load_lpips`.
"""

from ..geometry import refine_cameras
from .densify import DensifyState, DensifyStrategy
from .fit import FitConfig, FitResult, fit_gaussians, fit_to_scene, fit_to_views, optimize_gaussians, scene_extent
from .init import init_from_points, init_from_scene, init_from_views, to_activated
from .losses import load_lpips, ssim_map
from .ply import load_ply, save_ply
from .render import RenderOutput, render

__all__ = ["RenderOutput", "render", "fit_gaussians", "optimize_gaussians", "fit_to_views", "fit_to_scene",
           "FitConfig", "FitResult", "DensifyStrategy", "DensifyState", "refine_cameras", "scene_extent",
           "init_from_points", "init_from_scene", "init_from_views", "to_activated", "load_lpips", "ssim_map",
           "save_ply", "load_ply"]
