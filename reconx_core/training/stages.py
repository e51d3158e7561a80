"""Which parameters each training stage trains (everything else is frozen).

ReconX (§4.1): "stage 1 fine-tunes the image cross-attention layers together with the new branch, stage 2 the
spatial layers". In the DynamiCrafter UNet (reconx_core.video.unet, official parameter names) that is, exactly:

- structure branch (both stages): every `attn2.to_k_struct.weight`, `attn2.to_v_struct.weight`, `attn2.alpha_struct`
  of the spatial transformers (the tanh gate λ_F), and the whole point-cloud encoder (trained from scratch).
- image cross-attention (stage 1): DynamiCrafter's image branch of each spatial transformer's cross-attention,
  `attn2.to_k_ip.weight` and `attn2.to_v_ip.weight` (and `attn2.alpha` in the learnable-scale variant, absent
  from the 512 interp model). The query and output projections `attn2.to_q` / `attn2.to_out` are shared with the
  text cross-attention and stay frozen in stage 1.
- spatial layers (stage 2): DynamiCrafter's own split (its paper trains "the spatial layers" while keeping the
  temporal ones): every UNet parameter that acts on each frame alone - the input conv, the ResBlocks' 2D layers
  (in_layers, emb_layers, out_layers, skip_connection), the SpatialTransformers (norm, proj_in, attn1, attn2
  including to_k_ip/to_v_ip, ff, norms, proj_out), the down/up-samplers and the output head - i.e. everything but
  the temporal layers (every TemporalTransformer, including `init_attn`, and every ResBlock `temopral_conv`) and
  the time / frame-stride embeddings (`time_embed`, `fps_embedding`), which are conditioning, not spatial layers.

The Resampler (image_proj), the VAE and the CLIP towers are frozen in both stages.
"""

from __future__ import annotations

from typing import Dict, List

from torch import nn

from ..errors import InputError

STAGES = (1, 2)
EMBEDDING_PREFIXES = ("time_embed.", "fps_embedding.")


def _temporal_names(unet: nn.Module) -> set:
    from ..video.attention import TemporalTransformer
    from ..video.unet import TemporalConvBlock

    names = set()
    for module_name, module in unet.named_modules():
        if isinstance(module, (TemporalTransformer, TemporalConvBlock)):
            names.update(f"{module_name}.{n}" for n, _ in module.named_parameters())
    return names


def unet_parameter_groups(unet: nn.Module) -> Dict[str, List[str]]:
    """UNet parameter names by kind: "structure_branch", "image_cross_attention", "spatial" (excluding the two
    before), "temporal", "embedding". Every parameter is in exactly one group."""
    temporal = _temporal_names(unet)
    groups: Dict[str, List[str]] = {k: [] for k in ("structure_branch", "image_cross_attention", "spatial",
                                                    "temporal", "embedding")}
    for name, _ in unet.named_parameters():
        if "_struct" in name:
            groups["structure_branch"].append(name)
        elif name in temporal:
            groups["temporal"].append(name)
        elif name.startswith(EMBEDDING_PREFIXES):
            groups["embedding"].append(name)
        elif ".attn2.to_k_ip." in name or ".attn2.to_v_ip." in name or name.endswith(".attn2.alpha"):
            groups["image_cross_attention"].append(name)
        else:
            groups["spatial"].append(name)
    return groups


def stage_unet_parameter_names(unet: nn.Module, stage: int) -> List[str]:
    """The UNet parameters stage `stage` trains, in named_parameters() order (branch included)."""
    if stage not in STAGES:
        raise InputError(f"stage must be 1 or 2, got {stage}")
    groups = unet_parameter_groups(unet)
    kinds = {"structure_branch", "image_cross_attention"} | ({"spatial"} if stage == 2 else set())
    chosen = {n for k in kinds for n in groups[k]}
    if not groups["structure_branch"]:
        raise InputError("this UNet has no structure branch (built with structure_branch=False); nothing to train")
    return [n for n, _ in unet.named_parameters() if n in chosen]


def base_layer_names(unet: nn.Module, stage: int) -> List[str]:
    """The stage's trained UNet parameters that belong to the pretrained backbone (not the new branch): what an
    exported file must carry besides the branch."""
    return [n for n in stage_unet_parameter_names(unet, stage) if "_struct" not in n]


def freeze_for_stage(model, stage: int) -> List[str]:
    """Set requires_grad on a VideoModel for `stage`: the stage's UNet parameters and the whole structure encoder
    train, every other parameter of every network is frozen. Returns the trainable names, prefixed
    (`unet.` / `structure_encoder.`)."""
    if model.structure_encoder is None:
        raise InputError("the video model has no structure encoder; build it with structure_encoder=True")
    chosen = set(stage_unet_parameter_names(model.unet, stage))
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for name, p in model.unet.named_parameters():
        if name in chosen:
            p.requires_grad_(True)
            names.append(f"unet.{name}")
    for name, p in model.structure_encoder.named_parameters():
        p.requires_grad_(True)
        names.append(f"structure_encoder.{name}")
    return names


def count_stage_parameters(model, stage: int) -> Dict[str, int]:
    """Parameter counts (elements) for `stage`: "trainable" (encoder + the stage's UNet parameters), split into
    "structure_encoder", "unet_branch", "unet_base_layers"; and "frozen" (everything else of the VideoModel)."""
    groups = unet_parameter_groups(model.unet)
    unet = dict(model.unet.named_parameters())
    trained = set(stage_unet_parameter_names(model.unet, stage))
    branch = sum(unet[n].numel() for n in groups["structure_branch"])
    base = sum(unet[n].numel() for n in trained if "_struct" not in n)
    encoder = sum(p.numel() for p in model.structure_encoder.parameters()) if model.structure_encoder else 0
    total = sum(p.numel() for p in model.parameters())
    trainable = encoder + branch + base
    return {"trainable": trainable, "structure_encoder": encoder, "unet_branch": branch, "unet_base_layers": base,
            "frozen": total - trainable, "total": total}
