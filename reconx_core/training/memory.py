"""Training memory per GPU, on paper: parameter counts from meta-device models and activations traced on meta.

How (no GPU, no memory used):
- Parameters: the VideoModel built on the meta device (official DynamiCrafter-512-interp architecture + the
  ReconX branch and encoder), split by stage with reconx_core.training.stages.
- Activations: one training forward and backward of the UNet and the point-cloud encoder at micro-batch 1, traced
  on the meta device with the stage's parameters requiring grad, bf16 compute (what autocast does), attention as
  the fused (flash) kernels allocate it: output plus a float32 log-sum-exp saved for backward, no L x L matrix.
  A dispatch mode adds up the bytes of every live tensor (a storage counted once, freed when its last tensor
  dies) and keeps the peak, forward and backward together; parameter gradients are dropped as soon as they are
  accumulated (they are counted with the model states instead). With gradient checkpointing the same trace runs
  with UNet.gradient_checkpointing, so the recomputation in the backward pass is in the peak.
- Model states: frozen weights in bf16 (the text tower is dropped after its features are cached), trained weights
  in float32 with float32 gradients and AdamW's two float32 moments (16 bytes per trained parameter). ZeRO-2 over
  G GPUs keeps bf16 copies of all weights and shards the float32 master weights, gradients and moments:
  2 + 16 / G bytes per trained parameter, plus its two communication buckets (2 x 2e8 bf16 elements, as in
  configs/accelerate/deepspeed_zero2_8gpu.yaml).
The CUDA context (~0.5 GiB), the allocator's slack (~10-15 %), the frozen VAE / CLIP passes (run before the UNet
under no_grad, far below the UNet's peak) and EMA (+4 bytes per trained parameter when on) are not included.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Optional

import torch

GIB = 1024 ** 3
BUCKET_BYTES = 2 * 2e8 * 2


class LiveBytes:
    """A dispatch mode counting the bytes of live tensors created while active (meta tensors allocate nothing)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                counter.track(out)
                return out

        self.mode = Mode()
        self.live, self.current, self.peak = {}, 0, 0

    def track(self, out) -> None:
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            entry = self.live.get(key)
            if entry is None:
                entry = self.live[key] = [storage.nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self._release, key)

    def _release(self, key) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.current -= entry[0]
                del self.live[key]

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


class _FlashAttention(torch.autograd.Function):
    """What a fused attention kernel allocates: the output, and for backward q, k, v, the output and a float32
    log-sum-exp per query; its backward allocates dq, dk, dv."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def flash_attention_stand_in():
    """Within the block F.scaled_dot_product_attention allocates as a fused kernel does (see _FlashAttention)."""
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, *a, **kw: _FlashAttention.apply(q, k, v)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def trace_training_step(model, frames: int, height: int, width: int, points: int, checkpointing: bool,
                        dtype: torch.dtype = torch.bfloat16, batch: int = 1) -> int:
    """Peak live bytes of one training forward + backward of model.unet and model.structure_encoder.

    model: a VideoModel whose requires_grad flags say what trains (freeze_for_stage), on the meta device or a real
    one (then the same counter measures the real run). Inputs are made inside the trace; parameter gradients are
    discarded on arrival. Returns bytes.
    """
    unet, encoder = model.unet, model.structure_encoder
    device = next(unet.parameters()).device
    trained = [p for p in list(unet.parameters()) + list(encoder.parameters()) if p.requires_grad]
    hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in trained]
    before = unet.gradient_checkpointing
    unet.gradient_checkpointing = checkpointing
    h, w = height // 8, width // 8
    image_tokens = model.config["resampler"]["num_queries"] * model.config["resampler"]["video_length"]
    ctx_dim = model.config["unet"]["context_dim"]
    try:
        with flash_attention_stand_in(), LiveBytes() as counter:
            x = torch.randn(batch, 8, frames, h, w, device=device, dtype=dtype)
            context = torch.randn(batch, 77 + image_tokens, ctx_dim, device=device, dtype=dtype)
            cloud = torch.randn(batch, points, 3, device=device)
            t = torch.zeros(batch, dtype=torch.long, device=device)
            tokens = encoder(cloud)
            out = unet(x, t, context, fs=t, structure=tokens.to(dtype))
            loss = out.float().square().mean()
            del out, tokens
            loss.backward()
            del loss
    finally:
        unet.gradient_checkpointing = before
        for hook in hooks:
            hook.remove()
    return counter.peak


def meta_training_model(config: Optional[dict] = None, dtype: torch.dtype = torch.bfloat16):
    """The VideoModel on the meta device in `dtype` with a structure encoder (official architecture by default)."""
    from ..video import OFFICIAL_512_INTERP, build_video_model

    model = build_video_model(config or OFFICIAL_512_INTERP, structure_encoder=True, device="meta")
    return model.to(dtype)


def model_state_bytes(counts: dict, text_tower: int, gpus: int) -> float:
    """Weights, gradients and AdamW moments per GPU (see the module docstring). counts: count_stage_parameters."""
    frozen = counts["frozen"] - text_tower
    trained = counts["trainable"]
    if gpus == 1:
        return 2 * frozen + 16 * trained
    return 2 * frozen + (2 + 16 / gpus) * trained + BUCKET_BYTES


def memory_table(frames: int = 32, height: int = 320, width: int = 512, points: int = 65536,
                 config: Optional[dict] = None) -> dict:
    """Parameter counts per stage and per-GPU memory estimates (GiB) at micro-batch 1, with and without gradient
    checkpointing, for 1 GPU (DDP-style full states) and 8 GPUs (ZeRO-2). Traces take ~1 min on a CPU."""
    from .stages import count_stage_parameters, freeze_for_stage

    model = meta_training_model(config)
    text_tower = sum(p.numel() for p in model.text_encoder.parameters())
    out = {"frames": frames, "height": height, "width": width, "points": points, "stages": {}}
    for stage in (1, 2):
        freeze_for_stage(model, stage)
        counts = count_stage_parameters(model, stage)
        acts = {ck: trace_training_step(model, frames, height, width, points, ck) for ck in (False, True)}
        rows = {}
        for gpus in (1, 8):
            states = model_state_bytes(counts, text_tower, gpus)
            for ck, act in acts.items():
                rows[f"{gpus}gpu_{'ckpt' if ck else 'nockpt'}"] = round((states + act) / GIB, 1)
        out["stages"][stage] = {"parameters": counts, "activations_gib": {("ckpt" if k else "nockpt"):
                                                                          round(v / GIB, 2) for k, v in acts.items()},
                                "model_states_gib": {g: round(model_state_bytes(counts, text_tower, g) / GIB, 2)
                                                     for g in (1, 8)},
                                "total_gib": rows}
    out["text_tower_parameters"] = text_tower
    return out


def format_memory_table(result: dict) -> str:
    """The README's markdown table from memory_table()."""
    lines = ["| stage | trained parameters | frozen (bf16) | activations, no ckpt / ckpt | 1 GPU, no ckpt / ckpt |"
             " 8 GPUs ZeRO-2, no ckpt / ckpt |", "|---|---|---|---|---|---|"]
    for stage, row in result["stages"].items():
        p = row["parameters"]
        frozen = p["frozen"] - result["text_tower_parameters"]
        a, t = row["activations_gib"], row["total_gib"]
        lines.append(f"| {stage} | {p['trainable'] / 1e6:,.1f} M (encoder {p['structure_encoder'] / 1e6:.1f} M, "
                     f"branch {p['unet_branch'] / 1e6:.1f} M, base layers {p['unet_base_layers'] / 1e6:.1f} M) | "
                     f"{frozen / 1e6:,.0f} M | {a['nockpt']} / {a['ckpt']} GiB | {t['1gpu_nockpt']} / "
                     f"{t['1gpu_ckpt']} GiB | {t['8gpu_nockpt']} / {t['8gpu_ckpt']} GiB |")
    return "\n".join(lines)


if __name__ == "__main__":
    import json

    table = memory_table()
    print(json.dumps({k: v for k, v in table.items()}, indent=1, default=str))
    print(format_memory_table(table))
