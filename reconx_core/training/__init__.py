"""Training ReconX's structure branch (the authors released neither weights nor training code).

The recipe (ReconX §4.1): DynamiCrafter-512-interp backbone; point clouds from DUSt3R on each clip's first and last
frames; stage 1 fine-tunes the image cross-attention layers with the new branch (2,000 steps, lr 1e-4), stage 2 the
spatial layers (30,000 steps, lr 1e-5); AdamW; 32 frames per clip; the branch's weight λ_F learned through a tanh
gate; RealEstate10K, ACID, DL3DV-10K. Modules:

- `config`: TrainConfig from configs/train/*.yaml.
- `stages`: which parameters each stage trains (exact names, documented there).
- `data`: the point-cloud cache (written by scripts/prepare_pointclouds.py), clip sampling, deterministic
  per-sample randomness (clips, timesteps, noise, dropout) keyed by the run-wide sample number.
- `pointclouds`: DUSt3R + two-view alignment on a segment's two ends -> a cache entry.
- `objective`: the v-prediction loss with inference's conditioning, condition dropout.
- `loop`: the accelerate training loop (`train`), `run_steps` for scripts/gpu_check.py.
- `export`: the trained branch + the stage's layers as one structure-branch file for the video model loader.
- `memory`: parameter counts per stage and per-GPU memory estimates from meta-device models.
- `synthetic`: test clips whose in-between frames only the point cloud determines.

Needs `pip install accelerate tensorboard` (the ComfyUI pack itself never imports this package).
"""

from .config import TrainConfig, config_from_dict, load_config
from .export import export_structure_branch, read_export_info
from .stages import (base_layer_names, count_stage_parameters, freeze_for_stage, stage_unet_parameter_names,
                     unet_parameter_groups)


def train(*args, **kwargs):
    """reconx_core.training.loop.train (imported on use: it needs accelerate)."""
    from .loop import train as _train

    return _train(*args, **kwargs)


def run_steps(*args, **kwargs):
    """reconx_core.training.loop.run_steps: a few steps on in-memory data (scripts/gpu_check.py)."""
    from .loop import run_steps as _run_steps

    return _run_steps(*args, **kwargs)


__all__ = ["TrainConfig", "config_from_dict", "load_config", "export_structure_branch", "read_export_info",
           "base_layer_names", "count_stage_parameters", "freeze_for_stage", "stage_unet_parameter_names",
           "unet_parameter_groups", "train", "run_steps"]
