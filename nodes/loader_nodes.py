"""Model loader nodes: DUSt3R (stages 1 and 4) and the video model (stage 3), from ComfyUI's model folders."""

from __future__ import annotations

import logging

import torch

from reconx_core.video.backbones import backbone_names

from . import comfy_bridge as bridge

log = logging.getLogger("reconx")
CATEGORY = "ReconX"
NO_BRANCH = "none"
AUTO = "auto"
NO_TEXT = "none (empty prompts only)"
# What each list may show (reconx_core.model_files kinds; "unknown" = a pickle whose name says nothing).
DUST3R_KINDS = {"dust3r", "unknown"}
VIDEO_KINDS = {"video", "unknown"}
CLIP_VISION_KINDS = {"clip_vision", "openclip", "unknown"}
TEXT_KINDS = {"openclip", "text_encoder", "unknown"}


class ReconXDust3rLoader:
    DESCRIPTION = ("Loads a DUSt3R checkpoint (official .pth or .safetensors) from models/dust3r. The architecture is "
                   "read from the file's tensors; nothing in the file is executed. The model is handed to ComfyUI's "
                   "model management, so it is offloaded when other models need the GPU.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("RECONX_DUST3R",)
    RETURN_NAMES = ("dust3r",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": (bridge.list_models("dust3r", DUST3R_KINDS), {
                "tooltip": "A DUSt3R or MASt3R checkpoint in models/dust3r: an official .pth, a .safetensors, or a "
                           "Hugging Face folder (config.json + model.safetensors). Entries marked ⬇ are not here "
                           "yet: choosing one downloads it (CC BY-NC-SA 4.0, non-commercial)."}),
            "precision": (["auto", "fp32", "fp16", "bf16"], {
                "default": "auto",
                "tooltip": "Weights' precision. auto: bf16/fp16 on a GPU, fp32 on the CPU."}),
            "device": (["auto", "cpu", "cuda"], {
                "default": "auto", "tooltip": "Where the network runs. auto: ComfyUI's device."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, ckpt_name):
        # also accepts a "⬇ ..." choice whose file arrived since (the refreshed list no longer shows the mark)
        return bridge.validate_choice("dust3r", ckpt_name)

    def load(self, ckpt_name, precision="auto", device="auto"):
        from reconx_core.dust3r import load_dust3r

        dev = bridge.resolve_device(device)
        dtype = bridge.resolve_dtype(precision, dev)
        path = bridge.model_path("dust3r", ckpt_name)
        # Load on the offload device; ManagedModel.acquire() moves it to `dev` when a node needs it.
        model = load_dust3r(str(path), device="cpu", dtype=dtype).eval()
        log.info("loaded DUSt3R %s (%s, native size %s)", ckpt_name, dtype, getattr(model, "image_size", "?"))
        return (bridge.ManagedModel(model, dev, dtype, name=ckpt_name),)


class ReconXVideoModelLoader:
    DESCRIPTION = ("Loads DynamiCrafter-512-interp from models/reconx: the original model.ckpt, or ComfyUI's fp16 "
                   "pruned file (dynamicrafter_512_interp_fp16_pruned.safetensors) with a CLIP ViT-H image encoder "
                   "from models/clip_vision (or a CLIP Vision loader) and, for text prompts, an OpenCLIP ViT-H text "
                   "encoder. "
                   "Optionally adds the ReconX structure branch (point-cloud encoder + extra cross-attention), whose "
                   "gate starts at zero so that without it the model is exactly DynamiCrafter. Entries marked ⬇ "
                   "download when chosen.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("RECONX_VIDEO_MODEL",)
    RETURN_NAMES = ("video_model",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "ckpt_name": (bridge.list_models("reconx", VIDEO_KINDS), {
                "tooltip": "DynamiCrafter 512 interp in models/reconx (or models/checkpoints/dynamicrafter): "
                           "DynamiCrafter_512_Interp's model.ckpt (rename it freely) or "
                           "dynamicrafter_512_interp_fp16_pruned.safetensors (needs a clip_vision encoder)."}),
            "structure_name": ([NO_BRANCH] + bridge.list_models("reconx", {"structure"}, downloads=False), {
                "default": NO_BRANCH,
                "tooltip": "ReconX structure-branch weights (.safetensors) in models/reconx; none = plain "
                           "DynamiCrafter interpolation."}),
            "precision": (["auto", "fp32", "fp16", "bf16"], {
                "default": "auto", "tooltip": "auto: bf16/fp16 on a GPU, fp32 on the CPU."}),
            "device": (["auto", "cpu", "cuda"], {"default": "auto", "tooltip": "Where sampling runs."}),
            "staged_offload": ("BOOLEAN", {
                "default": True,
                "tooltip": "Keep only the network in use (UNet, VAE or CLIP) on the GPU; saves several GB."}),
        }, "optional": {
            "clip_vision_name": ([AUTO] + bridge.list_models("clip_vision", CLIP_VISION_KINDS), {
                "default": AUTO,
                "tooltip": "CLIP ViT-H/14 image encoder in models/clip_vision, e.g. "
                           "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors (the one IP-Adapter uses). auto: the "
                           "checkpoint's own (the pruned file has none). A connected clip_vision input wins."}),
            "text_encoder_name": ([AUTO, NO_TEXT] + bridge.list_models("text_encoders", TEXT_KINDS), {
                "default": AUTO,
                "tooltip": "OpenCLIP ViT-H-14 text encoder in models/text_encoders, for text prompts. auto: the "
                           "checkpoint's, else the clip_vision file's when it holds both towers, else none. Without "
                           "one only empty prompts work (their features are saved once a text encoder was loaded)."}),
            "clip_vision": ("CLIP_VISION", {
                "tooltip": "A loaded CLIP Vision model (Load CLIP Vision with CLIP-ViT-H-14-laion2B-s32B-b79K) to "
                           "reuse instead of reading a file; its weights are converted, the preprocessing stays "
                           "DynamiCrafter's."}),
            "backbone": ([AUTO] + backbone_names(), {
                "default": AUTO,
                "tooltip": "What the checkpoint is: DynamiCrafter-512-interp, or a ViewCrafter (25_512: 320x512; "
                           "25_1024: ViewCrafter_25 and _25_sparse, 576x1024; 16_1024: ViewCrafter_16). Their "
                           "tensors look the same, so auto reads the file name (e.g. viewcrafter_25_512.ckpt, "
                           "model_sparse.ckpt; a name without either word counts as DynamiCrafter) and a choice "
                           "that contradicts the name is refused."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, ckpt_name, structure_name=NO_BRANCH, clip_vision_name=AUTO, text_encoder_name=AUTO):
        checks = [bridge.validate_choice("reconx", ckpt_name)]
        if structure_name != NO_BRANCH:
            checks.append(bridge.validate_choice("reconx", structure_name))
        if clip_vision_name != AUTO:
            checks.append(bridge.validate_choice("clip_vision", clip_vision_name))
        if text_encoder_name not in (AUTO, NO_TEXT):
            checks.append(bridge.validate_choice("text_encoders", text_encoder_name))
        return next((c for c in checks if c is not True), True)

    def load(self, ckpt_name, structure_name=NO_BRANCH, precision="auto", device="auto", staged_offload=True,
             clip_vision_name=AUTO, text_encoder_name=AUTO, clip_vision=None, backbone=AUTO):
        from reconx_core.errors import CheckpointError
        from reconx_core.video import load_backbone, load_video_model
        from reconx_core.video.comfy_layouts import EMPTY_PROMPT_FILE
        from reconx_core.video.tokenizer import ClipTokenizer

        dev = bridge.resolve_device(device)
        dtype = bridge.resolve_dtype(precision, dev)
        path = bridge.model_path("reconx", ckpt_name)
        branch = None if structure_name == NO_BRANCH else bridge.model_path("reconx", structure_name)
        image = clip_vision_state(clip_vision) if clip_vision is not None else (
            None if clip_vision_name == AUTO else bridge.model_path("clip_vision", clip_vision_name))
        text = None if text_encoder_name in (AUTO, NO_TEXT) else bridge.model_path("text_encoders", text_encoder_name)
        # The empty prompt's text features are kept beside the models, so later runs need no text encoder.
        cache = bridge.model_folders("reconx")[0] / EMPTY_PROMPT_FILE
        model = load_video_model(path, device="cpu", dtype=None if dtype == torch.float32 else dtype,
                                 structure_path=branch, clip_vision=image, text_encoder=text, empty_prompt_cache=cache,
                                 keep_text_encoder=text_encoder_name != NO_TEXT).eval()
        # The CLIP BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) may sit beside the weights.
        model.tokenizer = ClipTokenizer(search_dirs=[str(p) for p in bridge.model_folders("reconx")])
        try:  # which video model this is (the file name and its metadata decide; see reconx_core.video.backbones)
            load_backbone(model, path, backbone)
        except CheckpointError as error:
            raise CheckpointError(f"ReconX Video Model Loader: {error}") from None
        return (bridge.ManagedModel(model, dev, dtype, name=ckpt_name, staged_offload=staged_offload),)


def clip_vision_state(clip_vision) -> dict:
    """The CPU state dict of ComfyUI's CLIP_VISION (comfy.clip_vision.ClipVisionModel: its .model is
    comfy.clip_model.CLIPVisionModelProjection, transformers names) for load_video_model."""
    from reconx_core.errors import InputError

    getter = getattr(clip_vision, "get_sd", None)
    state = getter() if callable(getter) else getattr(clip_vision, "model", clip_vision).state_dict()
    if any(v.is_meta for v in state.values()):
        raise InputError("the connected CLIP Vision model's weights are not loaded in memory; pick its file in "
                         "clip_vision_name instead of connecting it")
    return {k: v.detach().to("cpu") for k, v in state.items()}


NODE_CLASS_MAPPINGS = {"ReconXDust3rLoader": ReconXDust3rLoader, "ReconXVideoModelLoader": ReconXVideoModelLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"ReconXDust3rLoader": "ReconX DUSt3R Loader",
                              "ReconXVideoModelLoader": "ReconX Video Model Loader (DynamiCrafter)"}
