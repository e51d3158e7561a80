"""ReconX core: a plain PyTorch library (no ComfyUI imports) for sparse-view reconstruction.

Stages, one module each: `dust3r` (pairwise point maps), `align` (global alignment), `structure`
(point-cloud encoder), `video` (structure-guided DynamiCrafter), `confidence`, `gaussians` (3DGS).
"""

from .errors import CheckpointError, InputError, ReconXError, ResourceError
from .types import Cameras, Gaussians, PairPredictions, Scene, Views

__all__ = ["Cameras", "Gaussians", "PairPredictions", "Scene", "Views",
           "ReconXError", "InputError", "CheckpointError", "ResourceError"]
