"""The scene's 3D structure, in the two forms a video model can be guided by.

- `encoder`: ReconX's point-cloud encoder, F(P) -> structure tokens for the UNet's structure branch
  (`PointCloudEncoder`, `encode_scene`, `scene_points`); needs trained branch weights.
- `render`: z-buffered splats of the scene's confident points into any cameras (`render_point_cloud`,
  `render_scene_path`), the condition of ViewCrafter and of render-guided DynamiCrafter sampling.
- `frames`: a video made by any other model between the photos, as Views (`frames_to_views`).
"""

from .encoder import (DOWNSAMPLE, FourierEmbedding, PointCloudEncoder, encode_scene, farthest_point_sample,
                      normalize_points, scene_points)
from .frames import frames_to_views
from .render import PathRenders, PointRenders, default_radius, render_point_cloud, render_scene_path

__all__ = ["DOWNSAMPLE", "FourierEmbedding", "PointCloudEncoder", "encode_scene", "farthest_point_sample",
           "normalize_points", "scene_points", "PointRenders", "PathRenders", "render_point_cloud",
           "render_scene_path", "default_radius", "frames_to_views"]
