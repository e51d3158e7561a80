"""Training configuration: one YAML file per run (configs/train/*.yaml), read into `TrainConfig`.

Every field has a default; a YAML file sets what differs. Unknown keys are refused (a typo would otherwise train
with a default silently). The paper's recipe (ReconX, §4.1) is configs/train/stage1.yaml and stage2.yaml.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ..errors import InputError


@dataclass
class ModelConfig:
    """Which video model is trained.

    architecture: "checkpoint" (load `checkpoint`, the real DynamiCrafter-512-interp), "official" (its architecture
        with random weights: timing and memory checks) or "tiny" (video.tiny_config(), random weights: tests).
    checkpoint: the DynamiCrafter file (architecture "checkpoint"); clip_vision / text_encoder as load_video_model.
    overrides: per-network config entries merged into the architecture's config (e.g. {"unet": {...}}).
    init_branch: a structure-branch file to start from (stage 2 starts from stage 1's export).
    frozen_dtype: the dtype of everything the stage does not train ("bf16" halves their memory; "fp32").
        Trainable parameters stay float32 (AdamW's master weights); compute follows `mixed_precision`.
    seed: the seed of the random weights (tiny / official) and of the new branch's initialisation.
    """

    architecture: str = "checkpoint"
    checkpoint: Optional[str] = None
    clip_vision: Optional[str] = None
    text_encoder: Optional[str] = None
    overrides: Dict[str, Any] = field(default_factory=dict)
    init_branch: Optional[str] = None
    frozen_dtype: str = "bf16"
    seed: int = 0


@dataclass
class DataConfig:
    """What one training sample is.

    frames: frames per clip (the paper: 32), evenly spaced over the cached segment, both ends included; the first
        and the last are the references. resolution: (H, W) after crop_resize (the backbone's 320 x 512).
    points: points per cloud given to the encoder (a deterministic strided subset of the cached cloud; clouds with
        fewer points repeat theirs). split: dataset split. cache_dir: the point-cloud cache (default:
        DATA_ROOT/pointclouds/SPLIT). prompt: the text condition (RealEstate10K, ACID and DL3DV have no captions).
        frame_stride: the fs condition, "spacing" (the sampled frames' spacing in source frames, clamped to
        [1, max_frame_stride]) or a fixed int. num_workers: DataLoader workers per process. synthetic: random
        frames and clouds made in memory (timing checks without data; never for a real run).
    """

    frames: int = 32
    resolution: List[int] = field(default_factory=lambda: [320, 512])
    points: int = 65536
    split: str = "train"
    cache_dir: Optional[str] = None
    prompt: str = ""
    frame_stride: Union[str, int] = "spacing"
    max_frame_stride: int = 30
    num_workers: int = 2
    synthetic: bool = False


@dataclass
class OptimConfig:
    """AdamW (torch's defaults besides lr) with linear warm-up then a constant rate, and gradient clipping.
    branch_lr_scale: the new parameters (point-cloud encoder, to_k_struct, to_v_struct, alpha_struct) learn at
    lr x this (1: the paper's single rate)."""

    lr: float = 1e-4
    branch_lr_scale: float = 1.0
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    grad_clip: Optional[float] = 0.5


@dataclass
class ConditioningConfig:
    """Condition dropout for classifier-free guidance (see objective.ConditionDropout).

    uncond_prob: DynamiCrafter's p: text alone, text and image, image alone are each dropped with probability p.
    structure_drop_prob: the structure tokens are dropped with this probability, and always with text and image.
    """

    uncond_prob: float = 0.05
    structure_drop_prob: float = 0.1


@dataclass
class TrainConfig:
    """One training run. stage: 1 (image cross-attention + structure branch) or 2 (spatial layers + branch).

    steps: optimizer steps. global_batch_size: clips per optimizer step over all processes; micro_batch_size:
    clips per forward pass in one process; the gradient is accumulated over
    global / (micro x processes) micro-steps, so any number of processes trains the same thing.
    mixed_precision: "bf16" / "fp16" / "no" (CPU runs always use "no"). gradient_checkpointing: recompute the
    UNet's blocks in the backward pass. backbone_dropout: keep the UNet's dropout layers active (the official
    DynamiCrafter training does); with False the step is a deterministic function of the data, which the
    multi-process equivalence test needs. ema_decay: None = no EMA, else the exported weights are the EMA's.
    log_every, sample_every, checkpoint_every: steps (0 = never); keep_checkpoints: how many to keep.
    sample_steps: DDIM steps of the logged sample videos. log_with: "tensorboard" or None.
    """

    stage: int = 1
    steps: int = 2000
    global_batch_size: int = 8
    micro_batch_size: int = 1
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = True
    backbone_dropout: bool = True
    ema_decay: Optional[float] = None
    seed: int = 0
    log_every: int = 10
    sample_every: int = 500
    sample_steps: int = 25
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_with: Optional[str] = "tensorboard"
    export_dtype: str = "fp32"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> "TrainConfig":
        if self.stage not in (1, 2):
            raise InputError(f"stage must be 1 or 2, got {self.stage}")
        if self.steps < 0 or self.global_batch_size < 1 or self.micro_batch_size < 1:
            raise InputError("steps >= 0, global_batch_size >= 1 and micro_batch_size >= 1 are needed")
        if self.data.frames < 2:
            raise InputError(f"data.frames must be >= 2 (the two references), got {self.data.frames}")
        if self.data.points < 8:
            raise InputError(f"data.points must be >= 8, got {self.data.points}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise InputError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.model.architecture not in ("checkpoint", "official", "tiny"):
            raise InputError(f"model.architecture must be checkpoint, official or tiny, got "
                             f"{self.model.architecture!r}")
        if self.model.frozen_dtype not in ("bf16", "fp16", "fp32"):
            raise InputError(f"model.frozen_dtype must be bf16, fp16 or fp32, got {self.model.frozen_dtype!r}")
        if self.export_dtype not in ("bf16", "fp16", "fp32"):
            raise InputError(f"export_dtype must be bf16, fp16 or fp32, got {self.export_dtype!r}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise InputError(f"ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        return self

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-steps per optimizer step in each of `world_size` processes; InputError when the global batch does
        not split evenly (an uneven split would weight the processes' samples differently)."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise InputError(f"global_batch_size {self.global_batch_size} is not a multiple of micro_batch_size "
                             f"{self.micro_batch_size} x {world_size} processes; change one of them")
        return self.global_batch_size // per_step


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "conditioning": ConditioningConfig}


def _build(cls, values: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise InputError(f"unknown {where} option(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in values.items():
        if where == "config" and key in _SECTIONS:
            value = _build(_SECTIONS[key], value or {}, key)
        kwargs[key] = value
    return cls(**kwargs)


def config_from_dict(values: dict) -> TrainConfig:
    """A TrainConfig from a nested dict (a parsed YAML file); unknown keys raise InputError."""
    return _build(TrainConfig, copy.deepcopy(values or {}), "config").check()


def load_config(path: Union[str, Path], overrides: Optional[dict] = None) -> TrainConfig:
    """Read a YAML (or JSON) training config, apply `overrides` (nested dict, merged key by key) and check it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"training config {path} not found (the shipped ones are in configs/train/)")
    text = path.read_text()
    if path.suffix == ".json":
        values = json.loads(text)
    else:
        import yaml

        values = yaml.safe_load(text) or {}
    if not isinstance(values, dict):
        raise InputError(f"{path} must hold a mapping of options, got {type(values).__name__}")
    return config_from_dict(merge(values, overrides or {}))


def merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` merged in recursively (dicts merge, other values replace)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
