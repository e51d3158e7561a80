"""The DynamiCrafter parts as ComfyUI users keep them: key layouts, explicit key maps, and file-kind detection.

Three layouts besides the official `model.ckpt` (checkpoint.py) reach the same `VideoModel`:

- **The ComfyUI repackaging** (`dynamicrafter_512_interp_fp16_pruned.safetensors`, Kijai/DynamiCrafter_pruned):
  the official names for the UNet (`model.diffusion_model.*`), VAE (`first_stage_model.*`), Resampler
  (`image_proj_model.*`) and the 13 schedule buffers, every tensor float16, no CLIP towers (`cond_stage_model.*`
  and `embedder.*` removed). It goes through checkpoint.official_to_internal unchanged; the towers come from the
  two files below. The key set (1828 keys) is in tests/data/dynamicrafter512_interp_fp16_pruned_manifest.json.
- **ComfyUI's clip_vision file in the transformers layout** (`CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors`,
  IP-Adapter's image encoder: `CLIPVisionModelWithProjection` of OpenCLIP ViT-H-14 laion2B): `vision_model.*`
  plus `visual_projection.weight`. Separate q/k/v projections are fused into the `in_proj_weight` that
  `nn.MultiheadAttention` (and open_clip) use; `post_layernorm` and `visual_projection` are never read, because
  DynamiCrafter's image embedder returns all 257 tokens of the last block before ln_post (as the transformers
  model's `last_hidden_state`). ComfyUI's loaded CLIP_VISION (comfy.clip_model.CLIPVisionModelProjection) has the
  same state-dict names.
- **OpenCLIP files** (`open_clip_pytorch_model.safetensors` / `.bin` of laion/CLIP-ViT-H-14-laion2B-s32B-b79K,
  or a text-only or visual-only subset): open_clip 2.22 names, identical to ours after the prefix. The whole
  model carries both towers, so one such file serves as clip_vision and as text encoder.

Text layouts other than OpenCLIP's (e.g. transformers' CLIPTextModel) are not read.
All functions here work on key names and tensors only; nothing imports ComfyUI.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Tuple, Union

import torch

from ..errors import CheckpointError

Tensor = torch.Tensor
IMAGE_PREFIX = "image_encoder.visual."
TEXT_PREFIX = "text_encoder."

# --------------------------------------------------------------------------------------------- layout detection
TRANSFORMERS_VISION = "transformers CLIPVisionModel"
OPENCLIP = "OpenCLIP"
DYNAMICRAFTER = "DynamiCrafter"
_HF_LAYER = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.(.+)")


def openclip_prefix(keys: Iterable[str]) -> Optional[str]:
    """The prefix in front of open_clip's names ("" for an open_clip file, "embedder.model." or
    "cond_stage_model.model." inside a DynamiCrafter checkpoint), or None when no open_clip tower is present."""
    keys = set(keys)
    for prefix in ("", "embedder.model.", "cond_stage_model.model.", "model."):
        if (prefix + "visual.transformer.resblocks.0.attn.in_proj_weight" in keys
                or prefix + "transformer.resblocks.0.attn.in_proj_weight" in keys):
            return prefix
    return None


_HF_BARE = ("embeddings.", "encoder.layers.", "pre_layrnorm.", "post_layernorm.")


def normalise_transformers_vision(state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Put back the `vision_model.` prefix that a bare CLIPVisionTransformer state dict (transformers 5's
    CLIPVisionModel) leaves out; other keys pass unchanged."""
    bare = any(k.startswith("encoder.layers.") and ".self_attn.q_proj." in k for k in state)
    if not bare:
        return dict(state)
    return {("vision_model." + k if k.startswith(_HF_BARE) else k): v for k, v in state.items()}


def has_transformers_vision(keys: Iterable[str]) -> bool:
    keys = list(keys)
    return any(_HF_LAYER.fullmatch(k) for k in keys) or any(
        k.startswith("encoder.layers.") and ".self_attn.q_proj." in k for k in keys)


def towers_in(keys: Iterable[str]) -> Tuple[bool, bool]:
    """(has an image tower, has a text tower) in any layout this module reads."""
    keys = list(keys)
    keyset = set(keys)
    image = has_transformers_vision(keys) or any(
        p + "visual.transformer.resblocks.0.attn.in_proj_weight" in keyset
        for p in ("", "embedder.model.", "model."))
    text = any(p + "transformer.resblocks.0.attn.in_proj_weight" in keyset and p + "token_embedding.weight" in keyset
               for p in ("", "cond_stage_model.model.", "model."))
    return image, text


# ----------------------------------------------------------------------------- transformers CLIPVisionModel map
_HF_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_HF_TOP = {"vision_model.embeddings.class_embedding": "class_embedding",
           "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
           "vision_model.embeddings.position_embedding.weight": "positional_embedding",
           "vision_model.pre_layrnorm.weight": "ln_pre.weight",  # (sic) transformers' spelling
           "vision_model.pre_layrnorm.bias": "ln_pre.bias"}
# Read by no computation of DynamiCrafter's embedder (it stops before ln_post / the projection).
_HF_UNUSED = re.compile(r"vision_model\.post_layernorm\.(weight|bias)|visual_projection\.weight"
                        r"|vision_model\.embeddings\.position_ids")


def transformers_vision_key(key: str) -> Optional[Tuple[str, Optional[str]]]:
    """One transformers CLIPVisionModel(WithProjection) key -> (our VisionTransformer key, q/k/v part or None).

    Returns None for keys the image embedder never reads; raises CheckpointError for other keys. The q/k/v
    projections map to the fused `attn.in_proj_weight` / `attn.in_proj_bias` with part "q", "k" or "v".
    """
    if _HF_UNUSED.fullmatch(key):
        return None
    if key in _HF_TOP:
        return _HF_TOP[key], None
    match = _HF_LAYER.fullmatch(key)
    if match:
        layer, rest = match.groups()
        block = f"transformer.resblocks.{layer}."
        qkv = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if qkv:
            return block + f"attn.in_proj_{qkv.group(2)}", qkv.group(1)
        for theirs, ours in _HF_BLOCK.items():
            if rest.startswith(theirs + "."):
                return block + ours + rest[len(theirs):], None
    raise CheckpointError(f"unknown clip_vision key {key!r}: not a transformers CLIPVisionModel (ViT) layout")


def transformers_vision_to_internal(state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """A transformers-layout CLIP vision state dict -> our `image_encoder.visual.*` tensors (q, k, v fused)."""
    out: Dict[str, Tensor] = {}
    parts: Dict[str, Dict[str, Tensor]] = {}
    for key, value in normalise_transformers_vision(state).items():
        mapped = transformers_vision_key(key)
        if mapped is None:
            continue
        name, part = mapped
        if part is None:
            if name == "positional_embedding" and value.dim() == 3:
                value = value[0]
            out[IMAGE_PREFIX + name] = value
        else:
            parts.setdefault(name, {})[part] = value
    for name, qkv in parts.items():
        if set(qkv) != {"q", "k", "v"}:
            raise CheckpointError(f"clip_vision file lacks the {sorted({'q', 'k', 'v'} - set(qkv))} projection of "
                                  f"{name}; the file is incomplete, download it again")
        out[IMAGE_PREFIX + name] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return out


def internal_to_transformers_vision(state: Mapping[str, Tensor], with_projection: Optional[int] = None
                                    ) -> Dict[str, Tensor]:
    """Inverse of `transformers_vision_to_internal` for our `visual.*` tensors (prefix stripped or not).

    with_projection: also write `visual_projection.weight` (projection_dim x width, random) and post_layernorm,
    as CLIPVisionModelWithProjection files carry them. For tests and tiny files.
    """
    inverse_top = {v: k for k, v in _HF_TOP.items()}
    inverse_block = {v: k for k, v in _HF_BLOCK.items()}
    out: Dict[str, Tensor] = {}
    width = None
    for key, value in state.items():
        key = key[len(IMAGE_PREFIX):] if key.startswith(IMAGE_PREFIX) else key
        if key in inverse_top:
            out[inverse_top[key]] = value
            width = value.shape[-1] if key == "class_embedding" else width
            continue
        match = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key)
        if not match:
            raise CheckpointError(f"{key!r} is not a VisionTransformer key")
        layer, rest = match.groups()
        base = f"vision_model.encoder.layers.{layer}."
        fused = re.fullmatch(r"attn\.in_proj_(weight|bias)", rest)
        if fused:
            for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                out[base + f"self_attn.{part}_proj.{fused.group(1)}"] = chunk.clone()
            continue
        for ours, theirs in inverse_block.items():
            if rest.startswith(ours + "."):
                out[base + theirs + rest[len(ours):]] = value
                break
        else:
            raise CheckpointError(f"{key!r} has no transformers name")
    if with_projection:
        g = torch.Generator().manual_seed(0)
        out["vision_model.post_layernorm.weight"] = torch.ones(width)
        out["vision_model.post_layernorm.bias"] = torch.zeros(width)
        out["visual_projection.weight"] = torch.randn(with_projection, width, generator=g) * width ** -0.5
    return out


# ------------------------------------------------------------------------------------------- OpenCLIP maps
_OPENCLIP_UNUSED = re.compile(r"(visual\.proj|visual\.ln_post\.(weight|bias)|text_projection|logit_scale"
                              r"|attn_mask|visual\.attn_pool.*|visual\.head.*)")


def openclip_key(key: str, prefix: str = "") -> Optional[str]:
    """One open_clip key (after `prefix`) -> our VideoModel key (`image_encoder.visual.*` / `text_encoder.*`).

    None for tensors neither tower reads (projections, logit_scale, ln_post) and for keys outside `prefix`.
    """
    if not key.startswith(prefix):
        return None
    name = key[len(prefix):]
    if _OPENCLIP_UNUSED.fullmatch(name):
        return None
    if name.startswith("visual."):
        return "image_encoder." + name
    if name.startswith(("transformer.", "token_embedding.", "ln_final.")) or name == "positional_embedding":
        return TEXT_PREFIX + name
    raise CheckpointError(f"unknown OpenCLIP key {key!r}; expected an open_clip ViT-H-14 state dict")


def openclip_to_internal(state: Mapping[str, Tensor], want: str = "both") -> Dict[str, Tensor]:
    """An open_clip state dict (whole model, one tower, or inside a DynamiCrafter checkpoint) -> our tensors.

    want: "image", "text" or "both" (which towers to return).
    """
    prefix = openclip_prefix(state.keys())
    if prefix is None:
        return {}
    out = {}
    for key, value in state.items():
        name = openclip_key(key, prefix) if key.startswith(prefix) else None
        if name is None:
            continue
        if (want == "image" and name.startswith(TEXT_PREFIX)) or (want == "text" and name.startswith(IMAGE_PREFIX)):
            continue
        out[name] = value
    return out


def internal_to_openclip(state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Our `image_encoder.visual.*` / `text_encoder.*` tensors -> open_clip names (for tests and tiny files)."""
    out = {}
    for key, value in state.items():
        if key.startswith("image_encoder.visual."):
            out[key[len("image_encoder."):]] = value
        elif key.startswith(TEXT_PREFIX):
            out[key[len(TEXT_PREFIX):]] = value
    return out


# --------------------------------------------------------------------------------------------- tower sources
def tower_state(source: Mapping[str, Tensor], want: str) -> Dict[str, Tensor]:
    """The image ("image") or text ("text") tower in a state dict of any readable layout -> our tensors.

    Empty when the source holds no such tower. Raises CheckpointError for a transformers text layout.
    """
    keys = list(source.keys())
    if want == "image" and has_transformers_vision(keys):
        state = normalise_transformers_vision(source)
        vision = {k: v for k, v in state.items() if k.startswith("vision_model.") or k == "visual_projection.weight"}
        return transformers_vision_to_internal(vision)
    if want == "text" and any(k.startswith("text_model.encoder.layers.") for k in keys):
        raise CheckpointError("this text encoder is in the transformers CLIPTextModel layout (text_model.*), which "
                              "ReconX does not read; use an OpenCLIP ViT-H-14 file (open_clip_pytorch_model"
                              ".safetensors of laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
    return openclip_to_internal(source, want)


# ------------------------------------------------------------------------------ empty-prompt text embedding
EMPTY_PROMPT_FILE = "openclip_vit_h14_empty_prompt.safetensors"
EMPTY_PROMPT_FORMAT = "reconx-empty-prompt"


def save_empty_prompt(features: Tensor, path: Union[str, Path], source: str) -> None:
    """Write the text tower's output for the empty prompt, (1, 77, D), float32, with its provenance.

    DynamiCrafter conditions both guidance branches on encode("") in interpolation; with this file a model loaded
    without a text encoder can still run empty prompts. Written atomically.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    meta = {"format": EMPTY_PROMPT_FORMAT, "source": source, "shape": json.dumps(list(features.shape)),
            "what": "OpenCLIP text tower, penultimate block + ln_final, tokens [SOT, EOT, 0 x 75]"}
    save_file({"empty_prompt": features.detach().float().cpu().contiguous()}, str(tmp), metadata=meta)
    tmp.replace(path)


def load_empty_prompt(path: Union[str, Path], width: int) -> Optional[Tensor]:
    """The (1, 77, width) empty-prompt features from `save_empty_prompt`'s file, or None when absent or of
    another width (another model size)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("format") != EMPTY_PROMPT_FORMAT:
                return None
            value = f.get_tensor("empty_prompt")
    except Exception:  # a damaged cache is ignored; the loader writes it again when it has a text tower
        return None
    return value if value.dim() == 3 and value.shape[-1] == width else None
