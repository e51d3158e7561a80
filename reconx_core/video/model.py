"""`VideoModel`: every network of DynamiCrafter 512 interp (+ the optional ReconX point-cloud encoder) in one object.

Built from a config dict with the official argument names (`OFFICIAL_512_INTERP` is configs/inference_512_v1.0.yaml;
`tiny_config()` a few-MB version for tests and `--tiny` demos). Stages run on `device`; with `offload=True` each
network sits on `offload_device` and visits `device` only while it runs (`stage`), so the UNet, VAE and CLIP
towers never share GPU memory.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import List, Optional, Union

import torch
from torch import nn

from ..errors import ResourceError
from ..structure import PointCloudEncoder
from .clip import ImageTower, TextTower
from .resampler import build_resampler
from .schedule import DiffusionSchedule
from .tokenizer import ClipTokenizer
from .unet import build_unet
from .vae import build_vae

log = logging.getLogger(__name__)

OFFICIAL_512_INTERP = {
    "unet": {"in_channels": 8, "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1],
             "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "dropout": 0.1, "num_head_channels": 64,
             "transformer_depth": 1, "context_dim": 1024, "use_linear": True, "use_checkpoint": False,
             "temporal_conv": True, "temporal_attention": True, "temporal_selfatt_only": True,
             "use_relative_position": False, "use_causal_attention": False, "temporal_length": 16,
             "addition_attention": True, "image_cross_attention": True, "default_fs": 24, "fs_condition": True},
    "resampler": {"dim": 1024, "depth": 4, "dim_head": 64, "heads": 12, "num_queries": 16, "embedding_dim": 1280,
                  "output_dim": 1024, "ff_mult": 4, "video_length": 16},
    "vae": {"ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                         "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                         "dropout": 0.0}, "embed_dim": 4},
    "text": {"width": 1024, "layers": 24, "heads": 16, "vocab_size": 49408, "layer": "penultimate"},
    "image": {"width": 1280, "layers": 32, "heads": 16, "patch_size": 14, "image_size": 224},
    "schedule": {"timesteps": 1000, "linear_start": 0.00085, "linear_end": 0.012, "rescale_betas_zero_snr": True,
                 "base_scale": 0.7},
    "structure": {"dim": 1024, "heads": 8, "num_freqs": 8, "ff_mult": 4},
    "resolution": [320, 512], "frames": 16, "frame_stride": 5,
}


def tiny_config() -> dict:
    """A random-weight model of a few MB with the official structure (UNet/Resampler of shared/fixtures dc_tiny.json)."""
    cfg = copy.deepcopy(OFFICIAL_512_INTERP)
    cfg["unet"].update(model_channels=32, attention_resolutions=[1], num_res_blocks=1, channel_mult=[1, 2],
                       num_head_channels=8, context_dim=32, temporal_length=4)
    cfg["resampler"].update(dim=32, depth=2, dim_head=8, heads=4, embedding_dim=48, output_dim=32, video_length=4)
    cfg["vae"]["ddconfig"].update(ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1)
    cfg["text"].update(width=32, layers=2, heads=2)
    cfg["image"].update(width=48, layers=2, heads=4)
    cfg["structure"].update(dim=32, heads=4)
    cfg.update(resolution=[64, 64], frames=4)
    return cfg


class VideoModel(nn.Module):
    """UNet (`unet`), VAE (`vae`), text tower (`text_encoder`), image tower (`image_encoder`), Resampler
    (`image_proj`), optional `structure_encoder`, the diffusion `schedule` and the text `tokenizer`."""

    def __init__(self, config: dict, structure_encoder: bool = False):
        super().__init__()
        self.config = copy.deepcopy(config)
        self.unet = build_unet(config["unet"])
        self.vae = build_vae(config["vae"]["ddconfig"], config["vae"]["embed_dim"])
        self.text_encoder = TextTower(**config["text"])
        self.image_encoder = ImageTower(**config["image"])
        self.image_proj = build_resampler(config["resampler"])
        self.structure_encoder = PointCloudEncoder(**config["structure"]) if structure_encoder else None
        with torch.device("cpu"):  # real values even when the networks are built on the meta device
            self.schedule = DiffusionSchedule.official(**config["schedule"])
        self.tokenizer = ClipTokenizer()
        # The text tower's output for "" when the model was loaded without a text encoder (see encode_text).
        self.register_buffer("empty_prompt", None, persistent=False)
        self.device = torch.device("cpu")
        self.offload_device = None  # set by `place`

    def reset_buffers(self) -> None:
        """Recompute the non-persistent buffers (attention masks, CLIP mean/std, Fourier bands) after a meta build."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_buffers"):
                module.reset_buffers()

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.time_embed[0].weight.dtype

    @property
    def has_structure_branch(self) -> bool:
        """True when a structure encoder is attached and the UNet's branch gates are not all zero."""
        if self.structure_encoder is None:
            return False
        return any(p.abs().sum() > 0 for n, p in self.unet.named_parameters() if n.endswith("alpha_struct"))

    def place(self, device: Union[str, torch.device], dtype: Optional[torch.dtype] = None, offload: bool = False,
              offload_device: Union[str, torch.device] = "cpu") -> "VideoModel":
        """Set the compute device and dtype. With offload=True weights stay on `offload_device` between stages."""
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device) if offload else None
        if dtype is not None:
            self.to(dtype=dtype)
        self.to(self.offload_device or self.device)
        return self

    @contextlib.contextmanager
    def stage(self, module: nn.Module):
        """Move `module` to the compute device for the duration of the block (and back when offloading)."""
        if self.offload_device is None:
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to(self.offload_device)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @torch.no_grad()
    def encode_text(self, prompts: Union[str, List[str]]) -> torch.Tensor:
        """Prompts -> (B, 77, context_dim) penultimate-layer CLIP text features.

        Without a text tower (`text_encoder` None: a ComfyUI pruned checkpoint loaded with no text encoder) only
        empty prompts work, from the stored `empty_prompt` features; anything else is a ResourceError.
        """
        if self.text_encoder is None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            if any(" ".join(p.split()) for p in prompts):
                raise ResourceError(
                    "this video model was loaded without a text encoder, so only an empty prompt works; clear the "
                    "prompt, or pick an OpenCLIP ViT-H-14 text encoder in the video model loader "
                    "(open_clip_pytorch_model.safetensors of laion/CLIP-ViT-H-14-laion2B-s32B-b79K)")
            if self.empty_prompt is None:
                raise ResourceError(
                    "this video model was loaded without a text encoder and no stored empty-prompt features were "
                    "found; pick an OpenCLIP ViT-H-14 text encoder once in the video model loader (its empty-prompt "
                    "output is then saved beside the models, and later runs with empty prompts need no text "
                    "encoder)")
            return self.empty_prompt.to(self.device).expand(len(prompts), -1, -1).clone()
        tokens = self.tokenizer(prompts).to(self.device)
        with self.stage(self.text_encoder) as text:
            return text(tokens)

    @torch.no_grad()
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> Resampler tokens (B, num_queries*video_length, context_dim)."""
        with self.stage(self.image_encoder) as tower:
            clip_tokens = tower(images.to(self.device))
        with self.stage(self.image_proj) as proj:
            return proj(clip_tokens)


def build_video_model(config: Optional[dict] = None, structure_encoder: bool = False, seed: Optional[int] = None,
                      device: Union[str, torch.device] = "cpu") -> VideoModel:
    """Build every network with random weights (official 512 interp config by default; `tiny_config()` for tests).

    device="meta" allocates nothing, for checking a checkpoint's layout. The inits are PyTorch's defaults, not the
    official zero inits, so a random tiny model gives non-trivial outputs.
    """
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = VideoModel(config or OFFICIAL_512_INTERP, structure_encoder=structure_encoder)
    return model.eval()
