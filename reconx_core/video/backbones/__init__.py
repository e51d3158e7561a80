"""Video backbones behind one interface: what a model was trained for and how a segment is conditioned.

A `Backbone` says everything the pipeline, the sampler and the nodes need without looking inside a model: the
resolution and segment length it was trained on, its default sampling settings, its camera path, how one segment's
conditions are built from the reference views (and renders, when it takes them), and its sampler rule. Modules in
this package register their backbones when imported; every module here is imported, so a new backbone is one new
module (see dynamicrafter.py and viewcrafter.py).

Which backbone a checkpoint is for: ViewCrafter's four checkpoints and DynamiCrafter-512-interp have the same
tensor names, shapes and dtypes (2520 keys), so the tensors cannot tell them apart, nor a ViewCrafter 512 from a
1024 one. What can be detected, and is checked by `resolve_backbone`:
- the file name (e.g. "viewcrafter_25_512.ckpt", "model_sparse.ckpt", "dynamicrafter_512_interp.ckpt");
- the backbone stored in the metadata of a .safetensors written by `save_video_model` (the tiny test models);
- a `scale_arr` buffer ending at 0.3 (the 576x1024 ViewCrafter config's base scale; DynamiCrafter-512-interp and
  ViewCrafter_25_512 are configured with 0.7).
What cannot: a renamed file whose name says nothing ("model.ckpt") is taken as DynamiCrafter-512-interp by "auto";
pick the backbone by hand for a ViewCrafter file with such a name.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

from ...errors import CheckpointError, InputError

log = logging.getLogger(__name__)

AUTO = "auto"
DEFAULT_BACKBONE = "dynamicrafter_512_interp"


@dataclass
class SegmentConditions:
    """What a backbone conditions one segment on (B = 1).

    concat: (1, 4, L, h, w) latent concat condition. image: (1, 3, H, W) in [-1, 1], the view the image tokens come
    from. pin_latents: (1, 4, L, h, w) latents the pinned end frames are held to (used when pinning ends).
    """

    concat: torch.Tensor
    image: torch.Tensor
    pin_latents: torch.Tensor


@dataclass
class Backbone:
    """A video model family member and how to drive it. Subclasses implement `prepare` and `segment`.

    name: registry key and the loader's widget value. title: for messages and the README.
    resolution: (H, W) it was trained at. frames: frames per segment it was trained on (both ends included).
    frame_stride: its fs condition. prompt: its default prompt. steps, cfg, guidance_rescale, eta: sampler defaults.
    base_scale: the dynamic-rescale floor of its config (used when the checkpoint holds no scale_arr).
    final_prev_from_start: the sampler's last-step rescale rule (see DiffusionSchedule.ddim).
    pin_ends: whether the segment's end latents are held to the references by default.
    path: default camera path kind between references (reconx_core.camera_path.SEGMENT_PATH_KINDS).
    needs_renders: the renders are its condition (it cannot run without them).
    render_downsample: renders are made at 1/n of the resolution and upsampled bilinearly, as its training
        renders were (ViewCrafter's 576x1024 models: 288x512 renders x2).
    fixed_frames: whether other segment lengths are refused (a model trained on one length).
    family_patterns: regular expressions (case-insensitive) on a checkpoint's file name that mean its family.
    variant_patterns: ones that mean this very backbone (e.g. "512" in a ViewCrafter name).
    family_default: the family member a file name naming only the family means.
    """

    name: str
    title: str
    family: str
    resolution: Tuple[int, int]
    frames: int
    frame_stride: int
    prompt: str = ""
    steps: int = 50
    cfg: float = 7.5
    guidance_rescale: float = 0.7
    eta: float = 1.0
    base_scale: float = 0.7
    final_prev_from_start: bool = False
    pin_ends: bool = True
    path: str = "linear"
    needs_renders: bool = False
    render_downsample: int = 1
    fixed_frames: bool = False
    family_patterns: Tuple[str, ...] = ()
    variant_patterns: Tuple[str, ...] = ()
    family_default: bool = False

    def names_family(self, filename: str) -> bool:
        return any(re.search(p, filename, re.IGNORECASE) for p in self.family_patterns)

    def names_variant(self, filename: str) -> int:
        """Length of the longest variant pattern the name matches (0: none); longer = more specific."""
        return max((len(p) for p in self.variant_patterns if re.search(p, filename, re.IGNORECASE)), default=0)

    def prepare(self, model, references: torch.Tensor, noise) -> object:
        """Work shared by all segments, run once before them. references: (K, 3, H, W) in [-1, 1]."""
        return None

    def segment(self, model, k: int, references: torch.Tensor, renders: Optional[torch.Tensor], frames: int,
                noise, state) -> SegmentConditions:
        """Conditions of segment k (reference k -> k+1). renders: (L, 3, H, W) in [-1, 1] with the two references
        already in place at both ends, or None. frames: L. state: what `prepare` returned."""
        raise NotImplementedError


_REGISTRY: Dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
    if backbone.name in _REGISTRY or backbone.name == AUTO:
        raise ValueError(f"backbone {backbone.name!r} registered twice")
    _REGISTRY[backbone.name] = backbone
    return backbone


def _discover() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def backbone_names() -> List[str]:
    """Registered backbone names, DynamiCrafter first (the loader widget lists "auto" before them)."""
    return sorted(_REGISTRY, key=lambda n: (n != DEFAULT_BACKBONE, n))


def get_backbone(name_or_model: Union[str, object]) -> Backbone:
    """The backbone called `name`, or the one a VideoModel was loaded as (DynamiCrafter when it says nothing)."""
    if isinstance(name_or_model, Backbone):
        return name_or_model
    name = name_or_model if isinstance(name_or_model, str) else \
        getattr(name_or_model, "config", {}).get("backbone", DEFAULT_BACKBONE)
    if name not in _REGISTRY:
        raise InputError(f"unknown video backbone {name!r}; choose one of {[AUTO] + backbone_names()}")
    return _REGISTRY[name]


def backbone_from_file_name(filename: str) -> Tuple[Optional[Backbone], bool]:
    """(backbone, specific): the backbone a checkpoint's file name points to, and whether the name singles out
    the variant (True) or only names the family (False: the family's default member). (None, False) when the name
    says nothing."""
    scored = [(b.names_variant(filename), b) for b in _REGISTRY.values() if b.names_family(filename)]
    if not scored:
        return None, False
    best, backbone = max(scored, key=lambda sb: sb[0])
    if best > 0:
        return backbone, True
    family = backbone.family
    return next(b for b in _REGISTRY.values() if b.family == family and b.family_default), False


def resolve_backbone(choice: str, filename: str, stored_config: Optional[dict] = None,
                     scale_arr: Optional[torch.Tensor] = None) -> Backbone:
    """The backbone to run a checkpoint as: `choice` ("auto" or a name), checked against what the file shows.

    filename: the checkpoint's file name. stored_config: the config in a .safetensors' metadata (may name a
    backbone). scale_arr: the checkpoint's dynamic-rescale buffer, if it has one.
    Raises CheckpointError when the choice contradicts the stored backbone, the file name, or the scale_arr.
    """
    stored = (stored_config or {}).get("backbone")
    by_name, specific = backbone_from_file_name(Path(filename).name)
    if choice == AUTO:
        if stored:
            chosen = get_backbone(stored)
        elif by_name is not None:
            chosen = by_name
        else:
            chosen = get_backbone(DEFAULT_BACKBONE)
            log.info("%s: the file name names no backbone; running it as %s (choose the backbone by hand for a "
                     "ViewCrafter checkpoint)", filename, chosen.title)
    else:
        chosen = get_backbone(choice)
        if stored and stored != chosen.name:
            raise CheckpointError(f"{filename} was saved as a {get_backbone(stored).title} model, but backbone "
                                  f"{chosen.name!r} was chosen; choose '{stored}' or 'auto'")
        if by_name is not None and not stored and (by_name.family != chosen.family or
                                                   (specific and by_name.name != chosen.name)):
            raise CheckpointError(
                f"the file name {filename!r} says {by_name.title}, but backbone {chosen.name!r} ({chosen.title}) was "
                f"chosen. The tensors cannot tell these models apart, so the name decides: choose "
                f"'{by_name.name}' (or 'auto'), or rename the file if the name is wrong")
    if scale_arr is not None and scale_arr.numel() > 0:
        floor = float(scale_arr.reshape(-1)[-1])
        if abs(floor - chosen.base_scale) > 0.05 and floor < 0.5 <= chosen.base_scale:
            raise CheckpointError(
                f"{filename} holds a dynamic-rescale table ending at {floor:.2f}, the 576x1024 ViewCrafter "
                f"configuration's, but it is being run as {chosen.title} ({chosen.resolution[1]}x"
                f"{chosen.resolution[0]}); choose a 1024 ViewCrafter backbone")
    return chosen


def checkpoint_scale_arr(path: Union[str, Path]) -> Optional[torch.Tensor]:
    """The `scale_arr` buffer of a checkpoint (read lazily: mmap / safetensors), or None when it has none."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor("scale_arr").float() if "scale_arr" in f.keys() else None
        except Exception:  # an unreadable file is reported by the loader itself
            return None
    from ..checkpoint import read_state_dict

    value = read_state_dict(path).get("scale_arr")
    return None if value is None else value.float().clone()


def configure_model(model, backbone: Backbone, stored_config: Optional[dict] = None,
                    scale_arr: Optional[torch.Tensor] = None) -> None:
    """Make a loaded VideoModel run as `backbone`: record it in model.config["backbone"], take the backbone's
    resolution, frames and fs unless the file stored its own config (the tiny models), and set the dynamic-rescale
    table: the checkpoint's own `scale_arr` when it has one (the official loader is strict, so that is what the
    official code uses), else the backbone's base scale."""
    from ..schedule import DiffusionSchedule

    trained_for = getattr(model, "structure_backbone", None)  # set by load_structure_branch from its metadata
    if trained_for and trained_for != backbone.name:
        raise CheckpointError(f"the structure branch was trained for the {trained_for} video backbone, but this "
                              f"video model runs as {backbone.name}; load it with a {trained_for} checkpoint, or "
                              f"use a structure branch trained for {backbone.name}")
    model.config["backbone"] = backbone.name
    if not (stored_config and "resolution" in stored_config):
        model.config["resolution"] = list(backbone.resolution)
        model.config["frames"] = backbone.frames
        model.config["frame_stride"] = backbone.frame_stride
    want = model.schedule.scale_arr.shape
    if scale_arr is not None and tuple(scale_arr.shape) == tuple(want):
        model.schedule.scale_arr = scale_arr.float().cpu()
    else:
        sched = dict(model.config["schedule"], base_scale=backbone.base_scale)
        model.schedule.scale_arr = DiffusionSchedule.official(**sched).scale_arr
        model.config["schedule"] = sched


def load_backbone(model, path: Union[str, Path], choice: str = AUTO) -> Backbone:
    """Check `choice` against the checkpoint at `path` and configure the loaded `model` for it (see
    `resolve_backbone`, `configure_model`). Returns the backbone."""
    from ..checkpoint import read_config

    path = Path(path)
    stored = read_config(path) if path.is_file() else None
    scale_arr = checkpoint_scale_arr(path) if path.is_file() else None
    backbone = resolve_backbone(choice, path.name, stored, scale_arr)
    configure_model(model, backbone, stored, scale_arr)
    log.info("%s runs as %s (%dx%d, %d frames)", path.name, backbone.title, model.config["resolution"][1],
             model.config["resolution"][0], model.config["frames"])
    return backbone


_discover()

__all__ = ["AUTO", "Backbone", "SegmentConditions", "register", "backbone_names", "get_backbone",
           "backbone_from_file_name", "resolve_backbone", "configure_model", "load_backbone",
           "checkpoint_scale_arr", "DEFAULT_BACKBONE"]
