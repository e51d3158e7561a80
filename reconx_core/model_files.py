"""What a model file is, told cheaply: the safetensors header (a few hundred kB at most) or the file name.

Used to give each loader input only the files it can load (the video loader's checkpoint list, its structure
list, clip_vision and text-encoder lists, the DUSt3R list). Nothing is loaded and nothing in a file is run.

Kinds (`classify_model_file`):
- "video": DynamiCrafter (official layout, the ComfyUI pruned file, or a file written by save_video_model);
- "structure": a ReconX structure-branch file;
- "clip_vision": a CLIP image tower alone (transformers CLIPVisionModel or OpenCLIP visual);
- "openclip": an OpenCLIP model with both towers (serves as clip_vision and as text encoder);
- "text_encoder": an OpenCLIP text tower alone;
- "dust3r": DUSt3R or MASt3R;
- "lpips": a torchvision backbone for LPIPS (by name);
- "empty_prompt": stored empty-prompt text features (comfy_layouts.save_empty_prompt);
- "unknown": a pickle (.ckpt/.pth/.pt/.bin) whose name says nothing: only loading would tell;
- "other": a readable .safetensors of none of the above; "damaged": an unreadable .safetensors header.
"""

from __future__ import annotations

import json
import os
import struct
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Tuple, Union

from .errors import CheckpointError

PathLike = Union[str, os.PathLike]
_MAX_HEADER = 100 << 20  # safetensors' own limit


def safetensors_header(path: PathLike) -> Tuple[Dict[str, dict], Dict[str, str]]:
    """({tensor name: {"dtype", "shape", "data_offsets"}}, metadata) read from the file's JSON header only.

    Raises CheckpointError for a file too short or with a header that is not a safetensors JSON object.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path.name} is too short to be a .safetensors file ({len(head)} bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER or length > path.stat().st_size - 8:
            raise CheckpointError(f"{path.name}: header length {length} does not fit the file; it is damaged")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, ValueError) as err:
            raise CheckpointError(f"{path.name}: the safetensors header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata


_NAME_KINDS = (("lpips", ("alexnet", "vgg16", "squeezenet")), ("dust3r", ("dust3r", "mast3r")),
               ("openclip", ("open_clip", "openclip")), ("clip_vision", ("clip_vision", "image_encoder", "clip-vit")),
               ("structure", ("structure",)), ("video", ("dynamicrafter", "tooncrafter")))


def _kind_from_keys(keys: List[str], metadata: Dict[str, str]) -> str:
    from .dust3r.weights_io import identify_model
    from .video.comfy_layouts import EMPTY_PROMPT_FORMAT, towers_in

    if metadata.get("format") == "reconx-structure-branch":
        return "structure"
    if metadata.get("format") == EMPTY_PROMPT_FORMAT:
        return "empty_prompt"
    if metadata.get("reconx_video_config"):
        return "video"
    found = identify_model(keys)
    if found is not None:
        family = found[0]
        if family == "DynamiCrafter":
            return "video"
        if family in ("DUSt3R", "MASt3R"):
            return "dust3r"
        if family == "ReconX structure branch":
            return "structure"
        return "other"
    image, text = towers_in(keys)
    if image and text:
        return "openclip"
    if image:
        return "clip_vision"
    if text:
        return "text_encoder"
    return "other"


@lru_cache(maxsize=512)
def _classify_cached(path: str, size: int, mtime_ns: int) -> str:
    p = Path(path)
    if p.suffix.lower() == ".safetensors":
        try:
            header, metadata = safetensors_header(p)
        except (CheckpointError, OSError):
            return "damaged"
        return _kind_from_keys(list(header), metadata)
    name = p.name.lower()
    for kind, words in _NAME_KINDS:
        if any(w in name for w in words):
            return kind
    return "unknown"


def classify_model_file(path: PathLike) -> str:
    """The kind of a model file (see the module docstring), from its safetensors header or its name.

    Cached per (path, size, modification time), so a node list refreshed often re-reads nothing.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return "damaged"
    return _classify_cached(str(p), st.st_size, st.st_mtime_ns)
