"""Structure-guided DynamiCrafter (512 interp): UNet, Resampler, CLIP towers, VAE, DDIM sampling, interpolation."""

from .resampler import Resampler, build_resampler
from .schedule import DiffusionSchedule
from .unet import UNet, build_unet

__all__ = ["UNet", "build_unet", "Resampler", "build_resampler", "DiffusionSchedule"]
