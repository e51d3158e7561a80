"""Model loader nodes: DUSt3R (stages 1 and 4) and the video model (stage 3), from ComfyUI's model folders."""

from __future__ import annotations

import logging

import torch

from . import comfy_bridge as bridge

log = logging.getLogger("reconx")
CATEGORY = "ReconX"
NO_BRANCH = "none"


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
            "ckpt_name": (bridge.list_models("dust3r"), {
                "tooltip": "A DUSt3R checkpoint in models/dust3r, e.g. DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth "
                           "(download it from the DUSt3R repository; CC BY-NC-SA 4.0)."}),
            "precision": (["auto", "fp32", "fp16", "bf16"], {
                "default": "auto",
                "tooltip": "Weights' precision. auto: bf16/fp16 on a GPU, fp32 on the CPU."}),
            "device": (["auto", "cpu", "cuda"], {
                "default": "auto", "tooltip": "Where the network runs. auto: ComfyUI's device."}),
        }}

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
    DESCRIPTION = ("Loads DynamiCrafter-512-interp (model.ckpt or a .safetensors variant) from models/reconx, and "
                   "optionally the ReconX structure branch (point-cloud encoder + extra cross-attention), whose gate "
                   "starts at zero so that without it the model is exactly DynamiCrafter.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("RECONX_VIDEO_MODEL",)
    RETURN_NAMES = ("video_model",)

    @classmethod
    def INPUT_TYPES(cls):
        files = bridge.list_models("reconx")
        return {"required": {
            "ckpt_name": (files, {"tooltip": "DynamiCrafter_512_Interp model.ckpt (rename it freely) in models/reconx."}),
            "structure_name": ([NO_BRANCH] + files, {
                "default": NO_BRANCH,
                "tooltip": "ReconX structure-branch weights (.safetensors) in models/reconx; none = plain "
                           "DynamiCrafter interpolation."}),
            "precision": (["auto", "fp32", "fp16", "bf16"], {
                "default": "auto", "tooltip": "auto: bf16/fp16 on a GPU, fp32 on the CPU."}),
            "device": (["auto", "cpu", "cuda"], {"default": "auto", "tooltip": "Where sampling runs."}),
            "staged_offload": ("BOOLEAN", {
                "default": True,
                "tooltip": "Keep only the network in use (UNet, VAE or CLIP) on the GPU; saves several GB."}),
        }}

    def load(self, ckpt_name, structure_name=NO_BRANCH, precision="auto", device="auto", staged_offload=True):
        from reconx_core.video import load_video_model
        from reconx_core.video.tokenizer import ClipTokenizer

        dev = bridge.resolve_device(device)
        dtype = bridge.resolve_dtype(precision, dev)
        path = bridge.model_path("reconx", ckpt_name)
        branch = None if structure_name == NO_BRANCH else bridge.model_path("reconx", structure_name)
        model = load_video_model(path, device="cpu", dtype=None if dtype == torch.float32 else dtype,
                                 structure_path=branch).eval()
        # The CLIP BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) may sit beside the weights.
        model.tokenizer = ClipTokenizer(search_dirs=[str(p) for p in bridge.model_folders("reconx")])
        return (bridge.ManagedModel(model, dev, dtype, name=ckpt_name, staged_offload=staged_offload),)


NODE_CLASS_MAPPINGS = {"ReconXDust3rLoader": ReconXDust3rLoader, "ReconXVideoModelLoader": ReconXVideoModelLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"ReconXDust3rLoader": "ReconX DUSt3R Loader",
                              "ReconXVideoModelLoader": "ReconX Video Model Loader (DynamiCrafter)"}
