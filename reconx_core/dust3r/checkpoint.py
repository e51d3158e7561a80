"""Reading DUSt3R checkpoints: files, key variants, and the architecture read off tensor names and shapes.

Official .pth files are `{'model': state_dict, 'args': argparse.Namespace(model="AsymmetricCroCo3DStereo(...)")}`.
We never evaluate that string: the architecture comes from the tensors, and the string (or the file name) is only
searched with regular expressions for the two things shapes cannot tell: the head counts and the training
resolution.

Key variants handled by `normalize_state_dict` (tested in tests/test_dust3r.py):
- DPT projections appear as `dpt.scratch.layerN_rn.weight`, `dpt.scratch.layer_rn.{N-1}.weight`, or both
  (the official modules register one tensor under both names);
- `dec_blocks2.*` may be absent: the official loader then copies `dec_blocks.*` into it;
- a `module.` prefix (DistributedDataParallel) is stripped.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch

from ..errors import CheckpointError
from .model import Dust3R, Dust3RConfig

log = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]

_REQUIRED = ("patch_embed.proj.weight", "enc_blocks.0.attn.qkv.weight", "enc_norm.weight",
             "decoder_embed.weight", "dec_blocks.0.cross_attn.projq.weight", "dec_norm.weight")


# ------------------------------------------------------------------------------------------------------- files
def read_checkpoint(path: Union[str, os.PathLike], meta: bool = False) -> Tuple[StateDict, dict]:
    """Read a checkpoint file -> (state dict on the CPU, hints).

    .safetensors are read with safetensors (with meta=True only the header is read and the tensors are meta
    tensors of the right shapes and dtypes); .pth/.ckpt/.bin/.pt with torch.load(weights_only=True), allowing
    argparse.Namespace for the official `args`. hints: {'args': str or None, 'metadata': dict, 'name': file name}.
    Raises CheckpointError for a missing, unreadable, truncated or non-checkpoint file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"DUSt3R checkpoint not found: {path}. Put the .pth or .safetensors file there "
                              "(models/dust3r in ComfyUI) or pass the correct path")
    hints = {"args": None, "metadata": {}, "name": path.name}
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                hints["metadata"] = dict(f.metadata() or {})
                if meta:
                    sd = {}
                    for k in f.keys():
                        sl = f.get_slice(k)
                        sd[k] = torch.empty(sl.get_shape(), dtype=_st_dtype(sl.get_dtype()), device="meta")
                else:
                    sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for bad headers and short files
            raise CheckpointError(f"{path.name} is not a readable .safetensors file ({type(e).__name__}: {e}); it "
                                  "is probably truncated or corrupt: download it again") from None
        hints["args"] = hints["metadata"].get("args") or hints["metadata"].get("model")
        return sd, hints
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(path), map_location="meta" if meta else "cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(f"{path.name} contains Python objects other than tensors, which are not loaded "
                                  "for safety; convert it to .safetensors with a trusted script") from None
        raise CheckpointError(f"{path.name} could not be unpickled ({e}); it is probably truncated or corrupt: "
                              "download it again") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path.name} could not be read ({type(e).__name__}: {str(e)[:200]}); it is "
                              "probably truncated or corrupt: download it again") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        args = obj.get("args")
        hints["args"] = getattr(args, "model", None) if args is not None else None
        obj = obj["model"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path.name} holds no state dict (expected {{'model': state_dict, 'args': ...}} or a "
                              "plain dict of tensors); is it a DUSt3R checkpoint?")
    return dict(obj), hints


def _st_dtype(name: str) -> torch.dtype:
    table = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
    return table.get(name, torch.float32)


# ------------------------------------------------------------------------------------------------- key layout
def normalize_state_dict(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Return a new dict with the official key variants completed (see the module docstring).

    Tensors are shared, except the `dec_blocks2` copies, which are cloned (two decoders, two sets of weights).
    """
    out = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    for head in ("downstream_head1", "downstream_head2"):
        base = f"{head}.dpt.scratch."
        for n in range(1, 5):
            a, b = f"{base}layer{n}_rn.weight", f"{base}layer_rn.{n - 1}.weight"
            if a in out and b not in out:
                out[b] = out[a]
            elif b in out and a not in out:
                out[a] = out[b]
    if not any(k.startswith("dec_blocks2.") for k in out):
        for k in [k for k in out if k.startswith("dec_blocks.")]:
            v = out[k]
            out["dec_blocks2." + k[len("dec_blocks."):]] = v if v.is_meta else v.clone()
    return out


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in sd for m in [pat.match(k)] if m}
    return max(idx) + 1 if idx else 0


def _arg(args: Optional[str], name: str) -> Optional[str]:
    if not args:
        return None
    m = re.search(rf"\b{name}\s*=\s*([^,()]+|\([^()]*\))", args)
    return m.group(1).strip() if m else None


def _mode(text: Optional[str], default: Tuple) -> Tuple:
    """Parse "('exp', -inf, inf)" without eval; anything unexpected keeps the default."""
    if not text:
        return default
    parts = [p.strip().strip("'\"") for p in text.strip("()").split(",")]
    try:
        return (parts[0], float(parts[1]), float(parts[2]))
    except (IndexError, ValueError):
        return default


def _default_heads(dim: int) -> int:
    # every public DUSt3R/CroCo model uses 64-channel heads; smaller test-size models (dims below 256, such as
    # the shared tiny fixtures) are built with 4 heads
    if dim >= 256 and dim % 64 == 0:
        return dim // 64
    return 4 if dim % 16 == 0 else 1


def infer_config(sd: Mapping[str, torch.Tensor], hints: Optional[dict] = None, **overrides) -> Dust3RConfig:
    """Read the architecture off a (normalised) state dict.

    Shapes give every width and depth, the head type, the DPT widths and the confidence channel. Head counts
    come, in this order, from `overrides` (enc_num_heads=, dec_num_heads=), the checkpoint's args string or
    safetensors metadata, else 64 channels per head (all public checkpoints). image_size comes from overrides,
    the args' img_size, a `_224_`/`_512_` in the file name, else 512.
    """
    hints = hints or {}
    missing = [k for k in _REQUIRED if k not in sd]
    has_linear = "downstream_head1.proj.weight" in sd
    has_dpt = "downstream_head1.dpt.head.4.weight" in sd
    if missing or not (has_linear or has_dpt):
        if not (has_linear or has_dpt):
            missing.append("downstream_head1.proj.weight or downstream_head1.dpt.*")
        sample = [k for k in sd if not k.startswith(("enc_blocks.", "dec_blocks"))][:8]
        raise CheckpointError(
            f"{hints.get('name', 'state dict')} does not match the DUSt3R layout: missing {missing}; its keys "
            f"start with {sample or list(sd)[:8]}. Use an official DUSt3R checkpoint "
            "(e.g. DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth)")
    args = hints.get("args")
    meta = hints.get("metadata") or {}
    pe = sd["patch_embed.proj.weight"]
    enc_dim, patch = int(pe.shape[0]), int(pe.shape[-1])
    dec_dim = int(sd["decoder_embed.weight"].shape[0])
    mlp_hidden = int(sd["enc_blocks.0.mlp.fc1.weight"].shape[0])

    def heads(name: str, dim: int) -> int:
        for src in (overrides.get(name), _arg(args, name), meta.get(name)):
            if src is not None:
                return int(src)
        guess = _default_heads(dim)
        log.info("%s not stored in the checkpoint; assuming %d for width %d", name, guess, dim)
        return guess

    cfg = Dust3RConfig(
        enc_embed_dim=enc_dim, enc_depth=_count(sd, "enc_blocks."), enc_num_heads=heads("enc_num_heads", enc_dim),
        dec_embed_dim=dec_dim, dec_depth=_count(sd, "dec_blocks."), dec_num_heads=heads("dec_num_heads", dec_dim),
        patch_size=patch, mlp_ratio=mlp_hidden / enc_dim,
        depth_mode=_mode(_arg(args, "depth_mode"), Dust3RConfig.depth_mode),
        conf_mode=_mode(_arg(args, "conf_mode"), Dust3RConfig.conf_mode),
    )
    pos = _arg(args, "pos_embed")
    if pos and pos.strip("'\"").startswith("RoPE"):
        cfg.rope_freq = float(pos.strip("'\"")[4:] or 100)
    if has_linear:
        cfg.head_type = "linear"
        cfg.has_conf = sd["downstream_head1.proj.weight"].shape[0] == 4 * patch * patch
    else:
        h = "downstream_head1.dpt."
        cfg.head_type = "dpt"
        cfg.dpt_layer_dims = tuple(int(sd[f"{h}act_postprocess.{k}.0.weight"].shape[0]) for k in range(4))
        cfg.dpt_feature_dim = int(sd[f"{h}scratch.layer_rn.0.weight"].shape[0])
        cfg.dpt_last_dim = int(sd[f"{h}head.2.weight"].shape[0])
        cfg.has_conf = sd[f"{h}head.4.weight"].shape[0] == 4
    cfg.image_size = int(overrides.get("image_size") or _image_size(args, hints.get("name")))
    return cfg


def _image_size(args: Optional[str], name: Optional[str]) -> int:
    m = re.search(r"img_size\s*=\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)", args or "")
    if m:
        return max(int(m.group(1)), int(m.group(2)))
    m = re.search(r"(?:^|[_\-.])(224|512)(?:[_\-.]|$)", name or "")
    return int(m.group(1)) if m else 512


# ------------------------------------------------------------------------------------------------------ loading
def load_dust3r(path_or_state_dict, device="cpu", dtype: Optional[torch.dtype] = None, **overrides) -> Dust3R:
    """Build a `Dust3R` from a checkpoint file or a state dict, in eval mode.

    path_or_state_dict: path to .safetensors / .pth / .ckpt, or a dict of tensors (official key names).
    device: where the model goes. With device="meta" nothing is allocated (a file is read header-only for
        safetensors, and a state dict of meta tensors is accepted), so a layout can be checked without weights.
    dtype: None keeps float32; torch.float16 / torch.bfloat16 cast the encoder and decoders, while the two heads
        stay float32 (they run outside autocast, as in the official code, where exp() needs the range).
    overrides: enc_num_heads, dec_num_heads, image_size, for checkpoints that do not record them.
    Raises CheckpointError naming missing/unexpected keys or shape mismatches, or what is wrong with the file.
    """
    meta = str(device) == "meta"
    if isinstance(path_or_state_dict, Mapping):
        sd, hints = dict(path_or_state_dict), {"args": None, "metadata": {}, "name": "state dict"}
    else:
        sd, hints = read_checkpoint(path_or_state_dict, meta=meta)
    sd = normalize_state_dict(sd)
    cfg = infer_config(sd, hints, **overrides)
    with torch.device("meta"):
        model = Dust3R(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k}: {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{hints['name']} does not match the DUSt3R architecture read from it "
            f"({cfg.head_type} head, enc {cfg.enc_embed_dim}x{cfg.enc_depth}, "
            f"dec {cfg.dec_embed_dim}x{cfg.dec_depth}): "
            f"{len(missing)} missing keys {missing[:6]}, {len(unexpected)} unexpected keys {unexpected[:6]}, "
            f"{len(wrong)} shape mismatches {wrong[:4]}. The file may be from another model or a newer format")
    if meta:
        return model.eval()
    if any(v.is_meta for v in sd.values()):
        raise CheckpointError("the state dict holds meta tensors (no data); load it with device='meta' or pass "
                              "real weights")
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    if dtype is not None and dtype != torch.float32:
        if dtype not in (torch.float16, torch.bfloat16):
            raise CheckpointError(f"dtype {dtype} is not supported; use torch.float32, float16 or bfloat16")
        for name, child in model.named_children():
            if not name.startswith("downstream_head"):
                child.to(dtype)
        model.mask_token.data = model.mask_token.data.to(dtype)
    log.info("DUSt3R: %s head, enc %dx%d, dec %dx%d, native size %d, %s on %s", cfg.head_type, cfg.enc_embed_dim,
             cfg.enc_depth, cfg.dec_embed_dim, cfg.dec_depth, cfg.image_size, dtype or torch.float32, device)
    return model.to(device).eval()
