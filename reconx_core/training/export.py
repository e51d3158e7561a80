"""The trained result as one file the video model loader takes as its structure-branch file.

    structure_encoder.*      the point-cloud encoder
    unet.*_struct*           the branch of every spatial cross-attention (to_k_struct, to_v_struct, alpha_struct)
    unet.<base layers>       the backbone layers the stage fine-tuned (stage 1: attn2.to_k_ip / to_v_ip; stage 2:
                             every spatial layer), which replace the checkpoint's when the file is loaded

Metadata (all strings): format "reconx-structure-branch", encoder_config (JSON), backbone (the registry name the
model was trained as; reconx_core.video.load_structure_branch refuses the file for another backbone), unet_config
(JSON), stage, steps, base_layers (how many base tensors), training (the run's config, JSON).
Drop it into models/reconx and pick it as the loader's structure branch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..video.backbones import DEFAULT_BACKBONE
from ..video.checkpoint import STRUCTURE_FORMAT
from .stages import base_layer_names

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_structure_branch(model, path: Union[str, Path], stage: int, steps: int,
                            training_config: Optional[dict] = None, dtype: str = "fp32") -> Path:
    """Write `model`'s branch, encoder and stage-`stage` base layers to `path` (atomically). Returns the path.

    model: a VideoModel with a structure encoder. dtype: "fp32", "bf16" or "fp16" for the tensors (the gates
    alpha_struct always stay float32: they are scalars).
    """
    if model.structure_encoder is None:
        raise CheckpointError("the model has no structure encoder to export")
    cast = DTYPES[dtype]
    unet = dict(model.unet.named_parameters())
    names = [n for n in model.unet.structure_parameter_names()] + base_layer_names(model.unet, stage)
    tensors = {f"structure_encoder.{k}": v for k, v in model.structure_encoder.state_dict().items()}
    tensors.update({f"unet.{n}": unet[n] for n in names})
    tensors = {k: v.detach().to("cpu", torch.float32 if k.endswith("alpha_struct") else cast).contiguous()
               for k, v in tensors.items()}
    meta = {"format": STRUCTURE_FORMAT, "encoder_config": json.dumps(model.structure_encoder.config),
            "backbone": model.config.get("backbone", DEFAULT_BACKBONE), "unet_config": json.dumps(model.config["unet"]),
            "stage": str(stage), "steps": str(steps), "base_layers": str(len(names) - len(
                model.unet.structure_parameter_names())), "training": json.dumps(training_config or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_export_info(path: Union[str, Path]) -> dict:
    """The metadata of an exported (or save_structure_branch) file, JSON fields parsed."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    for key in ("encoder_config", "unet_config", "training"):
        if key in meta:
            meta[key] = json.loads(meta[key])
    for key in ("stage", "steps", "base_layers"):
        if key in meta:
            meta[key] = int(meta[key])
    return meta
