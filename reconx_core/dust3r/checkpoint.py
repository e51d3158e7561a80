"""Reading DUSt3R / MASt3R checkpoints: files, key variants, and the architecture read off tensor names and shapes.

Files accepted by `load_dust3r` (all read without running anything in them, see weights_io.py):
- the official .pth files: `{'model': state_dict, 'args': argparse.Namespace(model="AsymmetricCroCo3DStereo(...)")}`
  (MASt3R: "AsymmetricMASt3R(...)"), read with torch.load(weights_only=True);
- a .safetensors state dict (any name), optionally with the constructor string in its metadata ("args"/"model");
- the Hugging Face layout naver publishes (`naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt`, ...): a folder with
  `config.json` (the constructor kwargs, written by huggingface_hub's PyTorchModelHubMixin; JSON with `Infinity`)
  and `model.safetensors` (written by safetensors' save_model, which keeps one name of each tied tensor). Give the
  folder, its config.json, or its model.safetensors (the config.json beside a file named model.safetensors or
  pytorch_model.bin is used).

The architecture always comes from the tensors. The constructor arguments (config.json, or the .pth args string,
parsed as literals only: never evaluated) supply what shapes cannot tell (head counts, depth/confidence modes,
training resolution, MASt3R's descriptor split) and are cross-checked against the tensors: a contradiction is a
CheckpointError naming both values.

Key variants handled by `normalize_state_dict`:
- DPT projections appear as `dpt.scratch.layerN_rn.weight`, `dpt.scratch.layer_rn.{N-1}.weight`, or both
  (the official modules register one tensor under both names; the HF model.safetensors keeps only layerN_rn);
- `dec_blocks2.*` may be absent: the official loader then copies `dec_blocks.*` into it;
- a `module.` prefix (DistributedDataParallel) is stripped.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch

from ..errors import CheckpointError
from .model import Dust3R, Dust3RConfig
from .weights_io import DUST3R_FILES, check_model_family, identify_model, read_weights, wrong_model_message

log = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]
PathLike = Union[str, os.PathLike]

DOWNLOAD = "https://github.com/naver/dust3r#checkpoints or https://github.com/naver/mast3r#checkpoints"
HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # what PyTorchModelHubMixin writes (new, old versions)
_REQUIRED = ("patch_embed.proj.weight", "enc_blocks.0.attn.qkv.weight", "enc_norm.weight",
             "decoder_embed.weight", "dec_blocks.0.cross_attn.projq.weight", "dec_norm.weight")
_INF = float("inf")


# ------------------------------------------------------------------------------------------------------- files
def resolve_checkpoint_files(path: PathLike) -> Tuple[Path, Optional[Path]]:
    """(weights file, config.json or None) for a file, a Hugging Face folder or a config.json path.

    A config.json is used only in the Hugging Face layout: the folder itself, the config.json, or a weights file
    named model.safetensors / pytorch_model.bin with a config.json beside it. Other files stand alone.
    """
    path = Path(path)
    if path.is_dir():
        weights = next((path / n for n in HF_WEIGHTS if (path / n).is_file()), None)
        if weights is None:
            found = sorted(p.name for p in path.iterdir())[:8]
            raise CheckpointError(
                f"folder {path} has no model.safetensors (the Hugging Face layout is config.json + "
                f"model.safetensors); it holds {found or 'nothing'}. Download both files from the model's page, "
                f"or pick a checkpoint file instead: {DUST3R_FILES}")
        config = path / HF_CONFIG
        return weights, (config if config.is_file() else None)
    if path.suffix.lower() == ".json":
        if not path.is_file():
            raise CheckpointError(f"DUSt3R config {path} not found")
        weights = next((path.parent / n for n in HF_WEIGHTS if (path.parent / n).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path.name} is a model config, but no model.safetensors lies beside it in "
                                  f"{path.parent}; download the weights from the same Hugging Face repository")
        return weights, path
    if path.name in HF_WEIGHTS and (path.parent / HF_CONFIG).is_file():
        return path, path.parent / HF_CONFIG
    return path, None


def read_config_json(path: PathLike) -> dict:
    """The constructor kwargs in a PyTorchModelHubMixin config.json -> dict.

    Plain JSON parsing (Python's json accepts the `Infinity` / `-Infinity` the mixin writes for the modes); JSON
    lists stay lists. Raises CheckpointError for unreadable or non-object JSON.
    """
    path = Path(path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable JSON model config ({type(err).__name__}: {str(err)[:160]});"
                              " download config.json again from the model's Hugging Face page") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} holds JSON {type(cfg).__name__}, not the object of constructor arguments "
                              "a DUSt3R/MASt3R config.json has")
    return cfg


class _Unparsed(str):
    """The source text of a constructor argument that is not a plain literal (ignored by the checks)."""


def parse_constructor_call(text: str) -> dict:
    """Keyword arguments of "AsymmetricCroCo3DStereo(k=v, ...)" as literals, without evaluating anything.

    Strings, numbers, booleans, None, tuples/lists of those, `inf`/`-inf`/`nan` are understood; other values are
    kept as `_Unparsed` source text. Returns {} for text that is not a single call.
    """
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError):
        log.warning("could not parse the checkpoint's constructor string %r; using the tensors alone", text[:120])
        return {}
    if not isinstance(node, ast.Call):
        return {}
    out = {"__class__": ast.unparse(node.func)}
    for kw in node.keywords:
        if kw.arg is not None:
            out[kw.arg] = _literal(kw.value)
    return out


def _literal(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
        return node.value
    if isinstance(node, (ast.Tuple, ast.List)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Name) and node.id in ("inf", "nan"):
        return float(node.id)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _literal(node.operand)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return -v if isinstance(node.op, ast.USub) else v
    return _Unparsed(ast.unparse(node))


def read_checkpoint(path: PathLike, meta: bool = False) -> Tuple[StateDict, dict]:
    """Read a checkpoint (file, Hugging Face folder or its config.json) -> (state dict on the CPU, hints).

    hints: {'name': shown in messages, 'args': the constructor string or None, 'config': constructor kwargs
    (from config.json or the parsed args string) or None, 'config_source': where they came from, 'metadata':
    safetensors metadata}. With meta=True a .safetensors is read header-only (meta tensors).
    Raises CheckpointError for a missing, damaged, unsafe or non-DUSt3R file.
    """
    weights, config_path = resolve_checkpoint_files(path)
    name = weights.name if config_path is None else f"{weights.parent.name}/{weights.name}"
    obj, metadata = read_weights(weights, what="DUSt3R/MASt3R checkpoint", download=DOWNLOAD, meta=meta,
                                 mmap=True, safe_globals=[argparse.Namespace])
    hints = {"name": name, "args": None, "config": None, "config_source": None, "metadata": metadata}
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        args = obj.get("args")
        hints["args"] = getattr(args, "model", None) if args is not None else None
        obj = obj["model"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        found = identify_model(obj.keys()) if isinstance(obj, Mapping) else None
        if found is not None and found[0] not in ("DUSt3R", "MASt3R"):
            raise CheckpointError(wrong_model_message(name, found, "a DUSt3R/MASt3R checkpoint", DUST3R_FILES))
        raise CheckpointError(f"{name} holds no state dict (expected {{'model': state_dict, 'args': ...}} or a "
                              f"plain dict of tensors); it is not a DUSt3R checkpoint. Pick one of: {DUST3R_FILES}")
    hints["args"] = hints["args"] or metadata.get("args") or metadata.get("model")
    if config_path is not None:
        hints["config"] = read_config_json(config_path)
        hints["config_source"] = f"{weights.parent.name}/{config_path.name}"
    elif isinstance(hints["args"], str):
        hints["config"] = parse_constructor_call(hints["args"]) or None
        hints["config_source"] = f"the constructor arguments stored in {name}"
    return dict(obj), hints


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


def _mode(value, default: Tuple) -> Tuple:
    """('exp', vmin, vmax) from a config list / parsed tuple; None stays None (no confidence channel)."""
    if value is None:
        return None
    try:
        kind, lo, hi = value
        return (str(kind), float(lo), float(hi))
    except (TypeError, ValueError):
        log.warning("unexpected mode %r in the checkpoint's arguments; using %r", value, default)
        return default


def _default_heads(dim: int) -> int:
    # every public DUSt3R/CroCo model uses 64-channel heads; smaller test-size models (dims below 256, such as
    # the shared tiny fixtures) are built with 4 heads
    if dim >= 256 and dim % 64 == 0:
        return dim // 64
    return 4 if dim % 16 == 0 else 1


def _as_config(config) -> Optional[dict]:
    if config is None or isinstance(config, Mapping):
        return dict(config) if config is not None else None
    return read_config_json(config)


def infer_config(sd: Mapping[str, torch.Tensor], hints: Optional[dict] = None, **overrides) -> Dust3RConfig:
    """Read the architecture off a (normalised) state dict and check it against the constructor arguments.

    Shapes give every width and depth, the head type (linear, dpt, or MASt3R's catmlp+dpt), the DPT widths, the
    confidence channel and MASt3R's descriptor channel count and MLP width. From `overrides`, else hints['config']
    (config.json or the parsed args string), else safetensors metadata, else defaults: head counts (default 64
    channels per head), depth/conf modes (default DUSt3R's), the training resolution (img_size, else `_224_` /
    `_512_` in the file name, else 512) and, for MASt3R, output_mode 'pts3d+descN', two_confs and desc_conf_mode
    (default: the public metric model's desc24 + separate ('exp', 0, inf) descriptor confidence).
    Raises CheckpointError when the tensors are not a DUSt3R/MASt3R network, are inconsistent with each other,
    or contradict the constructor arguments.
    """
    hints = hints or {}
    name = hints.get("name", "state dict")
    check_model_family(sd.keys(), name, ("DUSt3R", "MASt3R"), "a DUSt3R/MASt3R checkpoint", DUST3R_FILES)
    missing = [k for k in _REQUIRED if k not in sd]
    has_linear = "downstream_head1.proj.weight" in sd
    has_dpt = "downstream_head1.dpt.head.4.weight" in sd
    has_local = "downstream_head1.head_local_features.fc1.weight" in sd
    if missing or not (has_linear or has_dpt):
        if not (has_linear or has_dpt):
            missing.append("downstream_head1.proj.weight or downstream_head1.dpt.*")
        sample = [k for k in sd if not k.startswith(("enc_blocks.", "dec_blocks"))][:8]
        raise CheckpointError(
            f"{name} does not match the DUSt3R layout: missing {missing}; its keys start with "
            f"{sample or list(sd)[:8]}. Pick an official checkpoint: {DUST3R_FILES}")
    cfgd = dict(hints.get("config") or {})
    source = hints.get("config_source") or "the constructor arguments"
    meta = hints.get("metadata") or {}
    pe = sd["patch_embed.proj.weight"]
    enc_dim, patch = int(pe.shape[0]), int(pe.shape[-1])
    dec_dim = int(sd["decoder_embed.weight"].shape[0])
    mlp_hidden = int(sd["enc_blocks.0.mlp.fc1.weight"].shape[0])

    def pick(key: str, default=None):
        for src in (overrides.get(key), cfgd.get(key), meta.get(key)):
            if src is not None and not isinstance(src, _Unparsed):
                return src
        return default

    def heads(key: str, dim: int) -> int:
        value = pick(key)
        if value is None:
            value = _default_heads(dim)
            log.info("%s not stored in the checkpoint; assuming %d for width %d", key, value, dim)
        value = int(value)
        if value < 1 or dim % value or (dim // value) % 4:
            raise CheckpointError(f"{name}: {key}={value} does not fit width {dim} (each head needs a multiple of 4 "
                                  "channels for RoPE); fix the value in the config or the loader's overrides")
        return value

    cfg = Dust3RConfig(
        enc_embed_dim=enc_dim, enc_depth=_count(sd, "enc_blocks."), enc_num_heads=heads("enc_num_heads", enc_dim),
        dec_embed_dim=dec_dim, dec_depth=_count(sd, "dec_blocks."), dec_num_heads=heads("dec_num_heads", dec_dim),
        patch_size=patch, mlp_ratio=mlp_hidden / enc_dim,
        depth_mode=_mode(pick("depth_mode"), Dust3RConfig.depth_mode) or Dust3RConfig.depth_mode,
        conf_mode=_mode(pick("conf_mode", Dust3RConfig.conf_mode), Dust3RConfig.conf_mode),
    )
    pos = pick("pos_embed")
    if isinstance(pos, str):
        if not pos.startswith("RoPE"):
            raise CheckpointError(f"{name}: pos_embed={pos!r} in {source}; only RoPE models (all public DUSt3R and "
                                  "MASt3R checkpoints) are supported")
        cfg.rope_freq = float(pos[4:] or 100)
    if has_linear:
        cfg.head_type = "linear"
        cfg.has_conf = sd["downstream_head1.proj.weight"].shape[0] == 4 * patch * patch
    else:
        h = "downstream_head1.dpt."
        cfg.head_type = "catmlp+dpt" if has_local else "dpt"
        cfg.dpt_layer_dims = tuple(int(sd[f"{h}act_postprocess.{k}.0.weight"].shape[0]) for k in range(4))
        cfg.dpt_feature_dim = int(sd[f"{h}scratch.layer_rn.0.weight"].shape[0])
        cfg.dpt_last_dim = int(sd[f"{h}head.2.weight"].shape[0])
        cfg.has_conf = sd[f"{h}head.4.weight"].shape[0] == 4
    if has_local:
        _infer_mast3r(sd, cfg, cfgd, pick, name, source)
    size = overrides.get("image_size") or _image_size(pick("img_size"), hints.get("name"))
    cfg.image_size = int(size)
    _check_against_config(cfg, cfgd, sd, name, source)
    return cfg


def _infer_mast3r(sd, cfg: Dust3RConfig, cfgd: dict, pick, name: str, source: str) -> None:
    """MASt3R's descriptor head: MLP width from fc1, channel count from fc2; the split from output_mode."""
    fc1 = sd["downstream_head1.head_local_features.fc1.weight"]
    fc2 = sd.get("downstream_head1.head_local_features.fc2.weight")
    p2 = cfg.patch_size ** 2
    if fc2 is None or fc1.shape[1] != cfg.enc_embed_dim + cfg.dec_embed_dim or fc2.shape[0] % p2:
        raise CheckpointError(
            f"{name}: the MASt3R local-feature head does not fit this network (fc1 {tuple(fc1.shape)}, fc2 "
            f"{tuple(fc2.shape) if fc2 is not None else 'missing'}; expected fc1 input {cfg.enc_embed_dim} + "
            f"{cfg.dec_embed_dim} and fc2 outputs a multiple of {p2}). The file is damaged or a mix of models; "
            f"pick an official checkpoint: {DUST3R_FILES}")
    channels = int(fc2.shape[0]) // p2
    cfg.mlp_hidden = int(fc1.shape[0])
    output_mode = pick("output_mode")
    if cfgd:
        # the class defaults of AsymmetricMASt3R apply to arguments the config leaves out
        cfg.two_confs = bool(pick("two_confs", False))
        cfg.desc_conf_mode = _mode(pick("desc_conf_mode"), cfg.conf_mode) or cfg.conf_mode
        if pick("desc_mode", "norm") != "norm":
            raise CheckpointError(f"{name}: desc_mode={pick('desc_mode')!r} in {source}; only 'norm' (the public "
                                  "MASt3R's) is supported")
    else:
        log.info("%s: MASt3R without constructor arguments; assuming the public model's two_confs=True and "
                 "desc_conf_mode=('exp', 0, inf)", name)
    m = re.fullmatch(r"pts3d\+desc(\d+)", output_mode) if isinstance(output_mode, str) else None
    cfg.desc_dim = int(m.group(1)) if m else channels - int(cfg.two_confs)
    if cfg.desc_dim < 1 or cfg.desc_dim + int(cfg.two_confs) != channels:
        raise CheckpointError(
            f"{name}: {source} says output_mode={output_mode!r}, two_confs={cfg.two_confs}, i.e. "
            f"{cfg.desc_dim + int(cfg.two_confs)} local-feature channels per pixel, but the tensors hold {channels} "
            f"(head_local_features.fc2 {tuple(fc2.shape)}). The config belongs to another model: keep each model's "
            "config.json with its own weights")


def _check_against_config(cfg: Dust3RConfig, cfgd: dict, sd, name: str, source: str) -> None:
    """CheckpointError listing every constructor argument that contradicts what the tensors hold."""
    if not cfgd:
        return
    found = {"enc_embed_dim": cfg.enc_embed_dim, "enc_depth": cfg.enc_depth, "dec_embed_dim": cfg.dec_embed_dim,
             "dec_depth": cfg.dec_depth, "patch_size": cfg.patch_size}
    bad = []
    for key, value in found.items():
        stated = cfgd.get(key)
        if isinstance(stated, (int, float)) and not isinstance(stated, bool) and int(stated) != value:
            bad.append(f"{key}={stated} (tensors: {value})")
    ratio = cfgd.get("mlp_ratio")
    if isinstance(ratio, (int, float)) and int(cfg.enc_embed_dim * ratio) != round(cfg.enc_embed_dim * cfg.mlp_ratio):
        bad.append(f"mlp_ratio={ratio} (tensors: {cfg.mlp_ratio:g})")
    head = cfgd.get("head_type")
    evidence = {"linear": "downstream_head1.proj.weight", "dpt": "downstream_head1.dpt.*",
                "catmlp+dpt": "downstream_head1.dpt.* and downstream_head1.head_local_features.*"}[cfg.head_type]
    if isinstance(head, str) and head != cfg.head_type:
        bad.append(f"head_type={head!r} (tensors: {cfg.head_type!r}, {evidence})")
    out_mode = cfgd.get("output_mode")
    if isinstance(out_mode, str):
        wants_desc = out_mode.startswith("pts3d+desc")
        if wants_desc != (cfg.head_type == "catmlp+dpt") or not out_mode.startswith("pts3d"):
            heads_hold = "pts3d+desc" if cfg.head_type == "catmlp+dpt" else "pts3d"
            bad.append(f"output_mode={out_mode!r} (tensors: {heads_hold} head)")
    if "conf_mode" in cfgd and (cfgd["conf_mode"] is None) == cfg.has_conf:
        bad.append(f"conf_mode={cfgd['conf_mode']!r} (tensors: {'with' if cfg.has_conf else 'without'} a confidence "
                   "channel)")
    if cfgd.get("norm_im2_in_dec") is False:
        bad.append("norm_im2_in_dec=False (not supported: every public model normalises the other view's tokens)")
    if bad:
        raise CheckpointError(
            f"{source} contradicts the tensors in {name}: {'; '.join(bad)}. The config (or args) belongs to another "
            "model, or the weights were changed: keep each model's config.json with its own model.safetensors (both "
            f"from the same Hugging Face repository), or pick an official checkpoint: {DUST3R_FILES}")


def _image_size(img_size, name: Optional[str]) -> int:
    if isinstance(img_size, (list, tuple)) and img_size and all(isinstance(v, (int, float)) for v in img_size):
        return int(max(img_size))
    if isinstance(img_size, (int, float)) and not isinstance(img_size, bool):
        return int(img_size)
    m = re.search(r"(?:^|[_\-./])(224|512)(?:[_\-./]|$)", name or "")
    return int(m.group(1)) if m else 512


# ------------------------------------------------------------------------------------------------------ loading
def _layout_error(name: str, cfg: Dust3RConfig, sd, missing: List[str], unexpected: List[str],
                  wrong: List[str]) -> CheckpointError:
    """A message that says what was found, why it is not one network, and what to load instead."""
    kind = {"linear": "DUSt3R linear", "dpt": "DUSt3R DPT", "catmlp+dpt": "MASt3R"}[cfg.head_type]
    found = (f"{kind} head, encoder {cfg.enc_embed_dim} wide x {cfg.enc_depth} blocks, decoder {cfg.dec_embed_dim} "
             f"wide x {cfg.dec_depth} blocks (read from patch_embed, decoder_embed and the block counts)")
    parts = []
    if wrong:
        parts.append(f"{len(wrong)} tensors have other shapes than that network needs ({'; '.join(wrong[:4])})")
    depths = {p: _count(sd, p + ".") for p in ("enc_blocks", "dec_blocks", "dec_blocks2")}
    if depths["dec_blocks2"] and depths["dec_blocks2"] != depths["dec_blocks"]:
        parts.append(f"dec_blocks has {depths['dec_blocks']} blocks but dec_blocks2 has {depths['dec_blocks2']}")
    if missing:
        parts.append(f"{len(missing)} tensors are missing ({', '.join(missing[:5])})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensors do not belong to it ({', '.join(unexpected[:5])})")
    return CheckpointError(
        f"{name} is not one consistent DUSt3R/MASt3R network: it looks like a {found}, but "
        f"{'; '.join(parts)}. The file mixes models of different sizes, was edited, or is damaged. "
        f"Pick an unmodified official checkpoint instead: {DUST3R_FILES}")


def load_dust3r(path_or_state_dict, device="cpu", dtype: Optional[torch.dtype] = None,
                config: Optional[Union[Mapping, PathLike]] = None, **overrides) -> Dust3R:
    """Build a `Dust3R` (DUSt3R or MASt3R network) from a checkpoint or a state dict, in eval mode.

    path_or_state_dict: a .pth / .ckpt / .safetensors file, a Hugging Face folder (config.json +
        model.safetensors), its config.json or model.safetensors; or a dict of tensors (official key names).
    device: where the model goes. With device="meta" nothing is allocated (a file is read header-only for
        safetensors, and a state dict of meta tensors is accepted), so a layout can be checked without weights.
    dtype: None keeps float32; torch.float16 / torch.bfloat16 cast the encoder and decoders, while the two heads
        stay float32 (they run outside autocast, as in the official code, where exp() needs the range).
    config: constructor kwargs (a config.json dict or its path) for a bare state dict / file; replaces what the
        file carries.
    overrides: enc_num_heads, dec_num_heads, image_size (win over everything else).
    Raises CheckpointError naming the file and what is wrong: missing, damaged, unsafe, another model family,
    inconsistent shapes, or a config that contradicts the tensors.
    """
    meta = str(device) == "meta"
    if isinstance(path_or_state_dict, Mapping):
        sd, hints = dict(path_or_state_dict), {"args": None, "metadata": {}, "name": "state dict", "config": None}
    else:
        sd, hints = read_checkpoint(path_or_state_dict, meta=meta)
    if config is not None:
        hints["config"] = _as_config(config)
        hints["config_source"] = "the config passed to load_dust3r"
    sd = normalize_state_dict(sd)
    cfg = infer_config(sd, hints, **overrides)
    with torch.device("meta"):
        model = Dust3R(cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} is {tuple(sd[k].shape)}, needs {tuple(v.shape)}" for k, v in expected.items()
             if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        raise _layout_error(hints["name"], cfg, sd, missing, unexpected, wrong)
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
        for child_name, child in model.named_children():
            if not child_name.startswith("downstream_head"):
                child.to(dtype)
        model.mask_token.data = model.mask_token.data.to(dtype)
    log.info("%s: %s head, enc %dx%d, dec %dx%d, native size %d, %s on %s",
             "MASt3R" if model.is_mast3r else "DUSt3R", cfg.head_type, cfg.enc_embed_dim, cfg.enc_depth,
             cfg.dec_embed_dim, cfg.dec_depth, cfg.image_size, dtype or torch.float32, device)
    return model.to(device).eval()
