"""DynamiCrafter checkpoints: the official key layout, `load_video_model`, and the ReconX structure-branch file.

Official layout (LatentVisualDiffusion.state_dict, see shared/fixtures dynamicrafter512_interp_manifest.json):
    model.diffusion_model.*  -> VideoModel.unet           (same names)
    first_stage_model.*      -> VideoModel.vae            (LDM names -> diffusers, vae.ldm_to_diffusers_key)
    cond_stage_model.model.* -> VideoModel.text_encoder   (open_clip 2.22 names)
    embedder.model.visual.*  -> VideoModel.image_encoder.visual
    image_proj_model.*       -> VideoModel.image_proj     (same names)
    13 schedule buffers without prefix (checked against our schedule, not loaded)
plus tensors nothing reads (UNUSED_KEYS). The structure branch (to_k_struct, to_v_struct, alpha_struct in the
UNet, and the point-cloud encoder) is never in these files; it comes from an optional safetensors file.
ComfyUI's repackaging (dynamicrafter_512_interp_fp16_pruned.safetensors) is this layout without the two CLIP
towers; `load_video_model` then takes them from a clip_vision file / text encoder (key maps in comfy_layouts.py).
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Mapping, Optional, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..dust3r.weights_io import DYNAMICRAFTER_FILES, check_model_family, identify_model, read_weights
from ..errors import CheckpointError
from ..structure import PointCloudEncoder
from .backbones import DEFAULT_BACKBONE
from .comfy_layouts import load_empty_prompt, save_empty_prompt, tower_state
from .model import OFFICIAL_512_INTERP, VideoModel, build_video_model
from .vae import diffusers_to_ldm_key, ldm_to_diffusers_key

log = logging.getLogger(__name__)

SCHEDULE_KEYS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2", "scale_arr", "lvlb_weights", "scale_factor"}
# In the checkpoint but read by no computation of the interpolation model: CLIP's contrastive heads, the visual
# ln_post/proj (DynamiCrafter takes the last block's tokens), and the text tower copy left inside `embedder`.
_UNUSED = re.compile(r"(cond_stage_model\.model\.(text_projection|logit_scale)"
                     r"|embedder\.model\.(positional_embedding|text_projection|logit_scale|token_embedding\.weight"
                     r"|ln_final\.(weight|bias)|visual\.proj|visual\.ln_post\.(weight|bias)))")
STRUCTURE_FORMAT = "reconx-structure-branch"
_DOWNLOAD = "https://huggingface.co/Doubiiu/DynamiCrafter_512_Interp"


def is_unused_key(key: str) -> bool:
    """True for official keys that the interpolation never reads (see _UNUSED) or that are schedule buffers."""
    return key in SCHEDULE_KEYS or _UNUSED.fullmatch(key) is not None


def official_to_internal(key: str, vae_levels: int = 4) -> Optional[str]:
    """Map one official state_dict key to the VideoModel key; None for unused / schedule keys.

    Raises CheckpointError for a key of no known layout.
    """
    if is_unused_key(key):
        return None
    for prefix, target in (("model.diffusion_model.", "unet."), ("image_proj_model.", "image_proj."),
                           ("cond_stage_model.model.", "text_encoder."),
                           ("embedder.model.visual.", "image_encoder.visual.")):
        if key.startswith(prefix):
            return target + key[len(prefix):]
    if key.startswith("first_stage_model."):
        return "vae." + ldm_to_diffusers_key(key[len("first_stage_model."):], vae_levels)
    raise CheckpointError(f"unknown checkpoint key {key!r}: not a DynamiCrafter (LatentVisualDiffusion) layout")


def internal_to_official(key: str, vae_levels: int = 4) -> str:
    """Inverse of `official_to_internal` for the keys a VideoModel has (structure-branch keys have no official name)."""
    if "_struct" in key or key.startswith("structure_encoder."):
        raise CheckpointError(f"{key!r} belongs to the ReconX structure branch; save it with save_structure_branch")
    for prefix, target in (("unet.", "model.diffusion_model."), ("image_proj.", "image_proj_model."),
                           ("text_encoder.", "cond_stage_model.model."),
                           ("image_encoder.visual.", "embedder.model.visual.")):
        if key.startswith(prefix):
            return target + key[len(prefix):]
    if key.startswith("vae."):
        return "first_stage_model." + diffusers_to_ldm_key(key[len("vae."):], vae_levels)
    raise CheckpointError(f"{key!r} is not a VideoModel key")


def export_official_state_dict(model: VideoModel) -> dict:
    """The model's base weights under the official names (VAE attention as 1x1 convs) plus the schedule buffers.

    Loading the result with `load_video_model` gives back the same model; the structure branch is not included.
    """
    levels = len(model.vae.config.block_out_channels)
    out = {}
    for key, value in model.state_dict().items():
        if "_struct" in key or key.startswith("structure_encoder."):
            continue
        name = internal_to_official(key, levels)
        if name.startswith("first_stage_model.") and ".attn_1." in name and value.dim() == 2:
            value = value[:, :, None, None]
        out[name] = value.detach().cpu().contiguous()
    sched = model.schedule
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "scale_arr"):
        out[name] = getattr(sched, name).clone()
    return out


CONFIG_METADATA_KEY = "reconx_video_config"


def save_video_model(model: VideoModel, path: Union[str, Path]) -> None:
    """Write the base model as a .safetensors with the official key names and its config as JSON metadata.

    For models of another size than the official one (the tiny test/demo models): `load_video_model` reads the
    config back from the metadata, so such a file loads from a model folder like the real checkpoint.
    """
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    save_file(export_official_state_dict(model), str(tmp), metadata={CONFIG_METADATA_KEY: json.dumps(model.config)})
    tmp.replace(path)  # never leave a half-written model file behind


def read_config(path: Union[str, Path]) -> Optional[dict]:
    """The model config stored by `save_video_model` in a .safetensors' metadata, or None."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(CONFIG_METADATA_KEY)
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise CheckpointError(f"{path.name} is not a readable .safetensors file ({err}); download it again") from None
    return json.loads(text) if text else None


def read_state_dict(path: Union[str, Path]) -> dict:
    """All tensors of a DynamiCrafter checkpoint, on the CPU, with the official key names.

    .safetensors via safetensors; .ckpt/.pt/.pth via torch.load(weights_only=True), accepting a Lightning
    {'state_dict': ...}, a DeepSpeed {'module': {'_forward_module.' + key: ...}} or a bare dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; put DynamiCrafter_512_Interp's model.ckpt in models/reconx")
    if path.suffix not in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
        raise CheckpointError(f"{path.name}: expected a .ckpt, .pth or .safetensors file")
    # one shared reader tells a damaged file from one holding non-tensor objects, and never runs pickled code
    obj, _ = read_weights(path, what="DynamiCrafter checkpoint", download=_DOWNLOAD, mmap=True)
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "module" in obj:
        obj = {k[len("_forward_module."):] if k.startswith("_forward_module.") else k: v
               for k, v in obj["module"].items()}
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path.name} holds no state dict of tensors")
    check_model_family(obj.keys(), path.name, ("DynamiCrafter", "Stable Diffusion", "VAE"),
                       "a DynamiCrafter checkpoint", DYNAMICRAFTER_FILES)
    return obj


def _check_schedule(state: dict, model: VideoModel) -> None:
    if "alphas_cumprod" in state:
        ours = model.schedule.alphas_cumprod
        stored = state["alphas_cumprod"]
        theirs = stored.float()
        # half-precision files store the buffers rounded; a different schedule still differs by > 0.03
        tol = 1e-5 if stored.dtype in (torch.float32, torch.float64) else 1e-2
        if theirs.shape != ours.shape or (theirs - ours).abs().max() > tol:
            raise CheckpointError("the checkpoint's noise schedule differs from DynamiCrafter 512 interp's "
                                  "(zero-terminal-SNR v-prediction); is this another DynamiCrafter variant?")


def official_state_to_internal(model: VideoModel, state: dict) -> dict:
    """An official-layout state dict (full, or the ComfyUI pruned file) -> VideoModel names, shapes checked."""
    levels = len(model.vae.config.block_out_channels)
    target = model.state_dict()
    internal = {}
    for key, value in state.items():
        name = official_to_internal(key, levels)
        if name is None:
            continue
        if name not in target:
            raise CheckpointError(f"checkpoint key {key!r} has no place in this model configuration")
        if value.dim() == 4 and len(target[name].shape) == 2:
            value = value[:, :, 0, 0]  # LDM VAE attention 1x1 conv -> Linear
        _check_shape(key, value, target[name].shape, "the checkpoint is not DynamiCrafter 512 interp")
        internal[name] = value
    return internal


def _check_shape(key: str, value: torch.Tensor, want: torch.Size, why: str) -> None:
    if value.shape != want:
        raise CheckpointError(f"{key}: file shape {tuple(value.shape)} != model shape {tuple(want)}; {why}")


def _load_internal(model: VideoModel, internal: dict, assign: bool, optional_prefixes=()) -> None:
    """Load VideoModel-named tensors; only the structure branch and `optional_prefixes` may be missing."""
    target = model.state_dict()
    optional = {k for k in target if "_struct" in k or k.startswith(("structure_encoder.",) + tuple(optional_prefixes))}
    missing = sorted(set(target) - set(internal) - optional)
    if missing:
        prefixes = sorted({m.split(".")[0] for m in missing})
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors of {prefixes} (e.g. {missing[:3]}); "
                              "use the full DynamiCrafter_512_Interp checkpoint")
    model.load_state_dict(internal, strict=False, assign=assign)


def load_official_state_dict(model: VideoModel, state: dict, assign: bool = False) -> None:
    """Load an official-layout state dict into `model`; structure-branch tensors may be absent, nothing else."""
    internal = official_state_to_internal(model, state)
    _check_schedule(state, model)
    _load_internal(model, internal, assign)


def _init_structure_params(model: VideoModel, device) -> None:
    """Give branch parameters still on the meta device real values: default Linear init, alpha_struct = 0."""
    for module_name, module in model.unet.named_modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.is_meta:
                continue
            data = torch.empty(param.shape, device=device)
            if name == "alpha_struct":
                data.zero_()
            else:
                torch.nn.init.kaiming_uniform_(data, a=math.sqrt(5))
            setattr(module, name, torch.nn.Parameter(data, requires_grad=param.requires_grad))


TowerSource = Union[str, Path, Mapping[str, torch.Tensor]]
_CLIP_H_FILE = ("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors (IP-Adapter's image encoder) or laion's "
                "open_clip_pytorch_model.safetensors, in models/clip_vision")


def _read_tower_source(source: TowerSource, what: str) -> Tuple[dict, str]:
    """(state dict, name for messages) of a clip_vision / text-encoder file or an in-memory state dict."""
    if isinstance(source, Mapping):
        # detach: new tensor objects (same storage), so moving our model never moves the caller's module
        return {k: v.detach() for k, v in source.items() if isinstance(v, torch.Tensor)}, f"the given {what}"
    path = Path(source)
    obj, _ = read_weights(path, what=what, download="https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                          mmap=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name} holds no state dict of tensors")
    return obj, path.name


def _tower(model: VideoModel, source: TowerSource, want: str, what: str, required: bool) -> dict:
    """Our tensors of the `want` tower ("image" / "text") from a file or state dict, shapes checked."""
    state, name = _read_tower_source(source, what)
    tower = tower_state(state, want)
    if not tower:
        if required:
            found = identify_model(state.keys())
            kind = f"; it is {found[0]} ({found[1]})" if found else ""
            raise CheckpointError(f"{name} holds no CLIP {'image' if want == 'image' else 'text'} tower{kind}. "
                                  f"Use {_CLIP_H_FILE if want == 'image' else 'an OpenCLIP ViT-H-14 file'}")
        return {}
    target = model.state_dict()
    for key, value in tower.items():
        if key not in target:
            raise CheckpointError(f"{name}: tensor {key!r} has no place in DynamiCrafter's CLIP {want} tower "
                                  f"(is it another CLIP size?). Use {_CLIP_H_FILE}")
        width = target[key].shape
        if value.shape != width:
            raise CheckpointError(
                f"{name} is not the CLIP ViT-H/14 {want} tower DynamiCrafter uses ({key}: {tuple(value.shape)}, "
                f"needed {tuple(width)}). Use {_CLIP_H_FILE}")
    return tower


def load_video_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu",
                     dtype: Optional[torch.dtype] = None, structure_path: Optional[Union[str, Path]] = None,
                     config: Optional[dict] = None, offload: bool = False,
                     clip_vision: Optional[TowerSource] = None, text_encoder: Optional[TowerSource] = None,
                     empty_prompt_cache: Optional[Union[str, Path]] = None,
                     keep_text_encoder: bool = True) -> VideoModel:
    """Load DynamiCrafter 512 interp (UNet, VAE, CLIP towers, Resampler) into a VideoModel.

    path: model.ckpt (weights-only pickle), a .safetensors with the same keys (e.g. a bf16 variant), or the
        ComfyUI repackaging dynamicrafter_512_interp_fp16_pruned.safetensors (no CLIP towers; then give
        clip_vision). Half-precision files load to `dtype` (float32 when None).
    clip_vision: the CLIP ViT-H/14 image encoder, a path or a state dict in the transformers layout (ComfyUI's
        clip_vision files and its loaded CLIP_VISION), the OpenCLIP layout, or DynamiCrafter's; it replaces the
        checkpoint's own image tower.
    text_encoder: an OpenCLIP ViT-H-14 text tower (path or state dict). None: the checkpoint's, else the one inside
        an OpenCLIP clip_vision file, else none: then only empty prompts work, from `empty_prompt_cache`.
    empty_prompt_cache: file of the text tower's output for "" (comfy_layouts.EMPTY_PROMPT_FILE). Read when the
        model ends up without a text tower; written (atomically) when it has one and the file is absent or unusable.
    keep_text_encoder: False drops the text tower after computing its empty-prompt output (saves ~0.7-1.4 GB;
        only empty prompts work then).
    dtype: None keeps float32; torch.float16 / torch.bfloat16 halve memory (GroupNorms and the Resampler
    softmax still compute in float32). structure_path: optional ReconX structure-branch safetensors.
    offload: keep weights on the CPU and move each network to `device` only while it runs.
    The networks are built on the meta device and take the files' tensors directly (no second copy).
    config: the architecture; default: the one stored by `save_video_model` in the file, else the official one.
    """
    state = read_state_dict(path)
    name = Path(path).name
    model = build_video_model(config or read_config(path) or OFFICIAL_512_INTERP, device="meta")
    internal = official_state_to_internal(model, state)
    _check_schedule(state, model)
    del state
    if clip_vision is not None:
        image = _tower(model, clip_vision, "image", "clip_vision file", required=True)
        internal = {k: v for k, v in internal.items() if not k.startswith("image_encoder.")}
        internal.update(image)
    elif not any(k.startswith("image_encoder.") for k in internal):
        raise CheckpointError(f"{name} has no CLIP image encoder (the ComfyUI repackaging leaves it out): give a "
                              f"clip_vision file, {_CLIP_H_FILE}, or connect a CLIP Vision loader")
    text_source = "checkpoint"
    if text_encoder is not None:
        text = _tower(model, text_encoder, "text", "text encoder", required=True)
        internal = {k: v for k, v in internal.items() if not k.startswith("text_encoder.")}
        internal.update(text)
        text_source = "text encoder"
    elif not any(k.startswith("text_encoder.") for k in internal) and clip_vision is not None:
        internal.update(_tower(model, clip_vision, "text", "clip_vision file", required=False))
        text_source = "clip_vision file"
    if not any(k.startswith("text_encoder.") for k in internal):
        model.text_encoder = None  # only empty prompts, from the stored features
        text_source = None
    _load_internal(model, internal, assign=True)
    del internal
    _init_structure_params(model, "cpu")
    model.reset_buffers()
    width = model.config["unet"]["context_dim"]
    # (re)written when absent, damaged or of another model size (a tiny test model's)
    write_cache = empty_prompt_cache is not None and load_empty_prompt(empty_prompt_cache, width) is None
    if model.text_encoder is not None and (write_cache or not keep_text_encoder):
        with torch.no_grad():
            model.text_encoder.float()  # the stored features are float32 whatever the run's precision
            features = model.encode_text([""])
        if write_cache:
            Path(empty_prompt_cache).parent.mkdir(parents=True, exist_ok=True)
            save_empty_prompt(features, empty_prompt_cache, source=f"{name} ({text_source})")
        if not keep_text_encoder:
            model.text_encoder = None
            model.empty_prompt = features
    model.to(torch.float32 if dtype is None else dtype)
    if model.text_encoder is None and model.empty_prompt is None:
        cached = load_empty_prompt(empty_prompt_cache, width) if empty_prompt_cache is not None else None
        model.empty_prompt = None if cached is None else cached.to(model.dtype)
        log.info("no text encoder for %s: %s", name, "empty prompts from the stored features" if cached is not None
                 else "prompts need a text encoder")
    if structure_path is not None:
        load_structure_branch(model, structure_path)
    model.place(device, offload=offload)
    log.info("loaded DynamiCrafter from %s (%s, %s)", name, device, model.dtype)
    return model


def save_structure_branch(model: VideoModel, path: Union[str, Path]) -> None:
    """Write the point-cloud encoder and the UNet's branch tensors to a safetensors file.

    Keys: `structure_encoder.*` and `unet.*_struct*`; metadata holds the encoder config as JSON.
    """
    if model.structure_encoder is None:
        raise CheckpointError("the model has no structure encoder to save; attach one first")
    tensors = {f"structure_encoder.{k}": v for k, v in model.structure_encoder.state_dict().items()}
    tensors.update({f"unet.{k}": v for k, v in model.unet.state_dict().items() if "_struct" in k})
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"format": STRUCTURE_FORMAT, "encoder_config": json.dumps(model.structure_encoder.config),
            "backbone": model.config.get("backbone", DEFAULT_BACKBONE)}
    save_file(tensors, str(path), metadata=meta)


def load_structure_branch(model: VideoModel, path: Union[str, Path]) -> VideoModel:
    """Attach the point-cloud encoder and set the UNet's branch tensors from `save_structure_branch`'s file.

    A trained file (reconx_core.training.export) may also hold `unet.*` base-layer tensors its training stage
    fine-tuned (e.g. the image cross-attention `to_k_ip`/`to_v_ip`); they replace the checkpoint's. Its metadata
    names the backbone it was trained for ("backbone"); a model running as another backbone refuses it, here when
    the model already knows its backbone, else in backbones.configure_model.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"structure-branch file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path.name} is truncated or corrupt ({str(err)[:120]}); download it again") from None
    if meta.get("format") != STRUCTURE_FORMAT or "encoder_config" not in meta:
        raise CheckpointError(f"{path.name} is not a ReconX structure-branch file (metadata format missing)")
    config = json.loads(meta["encoder_config"])
    encoder = PointCloudEncoder(**config)
    enc_state = {k[len("structure_encoder."):]: v for k, v in tensors.items() if k.startswith("structure_encoder.")}
    unet_state = {k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")}
    expected = set(model.unet.structure_parameter_names())
    branch = {k for k in unet_state if "_struct" in k}
    if branch != expected:
        raise CheckpointError(f"{path.name} does not fit this UNet: {len(branch ^ expected)} branch "
                              "tensors differ (was it trained for another model size?)")
    unknown = sorted(set(unet_state) - expected - {n for n, _ in model.unet.named_parameters()})
    if unknown:
        raise CheckpointError(f"{path.name} does not fit this UNet: it holds {len(unknown)} UNet tensors the model "
                              f"lacks (e.g. {unknown[:2]}); was it trained for another video model?")
    trained_for = meta.get("backbone")
    running = model.config.get("backbone")
    if trained_for and running and trained_for != running:
        raise CheckpointError(f"{path.name} was trained for the {trained_for} video backbone, but this video model "
                              f"runs as {running}; load it with a {trained_for} checkpoint, or use a structure "
                              f"branch trained for {running}")
    try:
        encoder.load_state_dict(enc_state)
    except RuntimeError as err:
        raise CheckpointError(f"{path.name}: encoder weights do not match its config ({str(err)[:200]})") from None
    dtype, device = model.dtype, next(model.unet.parameters()).device
    params = dict(model.unet.named_parameters())
    with torch.no_grad():
        for name, value in unet_state.items():
            if params[name].shape != value.shape:
                raise CheckpointError(f"{path.name} was saved for a video model of another size ({name} has "
                                      f"shape {tuple(value.shape)}, this UNet needs {tuple(params[name].shape)}); "
                                      "pick the structure-branch file made for this checkpoint, or 'none'")
            params[name].copy_(value)
    model.structure_encoder = encoder.to(device=device, dtype=dtype).eval()
    model.structure_backbone = trained_for  # checked again when the model is configured as a backbone
    return model
