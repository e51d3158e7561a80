"""Structure-guided DynamiCrafter (512 interp): UNet, Resampler, CLIP towers, VAE, DDIM sampling, interpolation.

Entry points: `build_unet`, `build_resampler` (official config names), `load_video_model(path, device, dtype)`,
`build_video_model(config)` / `tiny_config()` (random weights), `interpolate(model, images, ...)`,
`interpolate_views(model, scene, ...) -> Views`,
`save_structure_branch` / `load_structure_branch`.
Backbones (DynamiCrafter-512-interp, ViewCrafter) behind one interface: `backbones` (`get_backbone`,
`load_backbone`, `backbone_names`); render guidance: `GuidanceSettings`, `GUIDANCE_MODES`.
"""

from .backbones import AUTO as AUTO_BACKBONE
from .backbones import Backbone, backbone_names, get_backbone, load_backbone
from .checkpoint import (export_official_state_dict, load_structure_branch, load_video_model, read_state_dict,
                         save_structure_branch, save_video_model)
from .model import OFFICIAL_512_INTERP, VideoModel, build_video_model, tiny_config
from .pipeline import interpolate, interpolate_views, reference_frame_indices
from .resampler import Resampler, build_resampler
from .guidance import GUIDANCE_MODES, GuidanceSettings
from .sampler import GeneratorNoise, ReplayNoise
from .schedule import DiffusionSchedule
from .unet import UNet, build_unet

__all__ = ["UNet", "build_unet", "Resampler", "build_resampler", "DiffusionSchedule", "VideoModel",
           "build_video_model", "tiny_config", "OFFICIAL_512_INTERP", "load_video_model", "read_state_dict",
           "export_official_state_dict", "save_video_model", "save_structure_branch", "load_structure_branch", "interpolate", "interpolate_views",
           "reference_frame_indices", "Backbone", "AUTO_BACKBONE", "backbone_names", "get_backbone", "load_backbone",
           "GUIDANCE_MODES", "GuidanceSettings", "GeneratorNoise", "ReplayNoise"]
