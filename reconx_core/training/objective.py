"""The training objective: DynamiCrafter's own v-prediction loss, conditioned exactly as at inference.

For a clip of T frames with latents x0 (VAE posterior samples, one frame at a time, as the official
`encode_first_stage` with perframe_ae), a timestep t ~ U{0..999} and noise ε ~ N(0, I):

    x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε          v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x0
    loss = mean over (C, T, h, w) of (UNet([x_t | c_concat], t, [text | image tokens], fs, F(P)) - v)²

with ᾱ the zero-terminal-SNR schedule of reconx_core.video.schedule (so at t = 999 the target is -x0), averaged
over the clips of the batch (the official `p_losses`, l_simple_weight 1, no learned log-variance). The conditions
come from the backbone seam (reconx_core.video.backbones), as in `interpolate`: c_concat holds the reference
latents at frames 0 and T-1 and zeros between; the image tokens are the Resampler's of frame 0; the text is the
prompt's (empty for these datasets). The references are encoded with the same posterior draws as frames 0 and T-1
of x0, so c_concat's ends equal x0's ends as in the official training (`img_cat_cond = z[:, :, 0]`, `z[:, :, -1]`).

Condition dropout (`ConditionDropout`) keeps classifier-free guidance working at sampling time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..video.backbones import get_backbone
from ..video.sampler import ReplayNoise
from ..video.vae import encode_frames


@dataclass
class ConditionDropout:
    """Which conditions each clip loses, from its two uniform draws u, u_s in [0, 1).

    DynamiCrafter's rule (ddpm3d.py get_batch_input, p = uncond_prob = 0.05): text dropped when u < 2p, image
    dropped when p <= u < 3p; so text alone, both, and image alone each with probability p. A dropped text is the
    empty prompt's features, a dropped image the Resampler's tokens of a black frame (zeros in [-1, 1]) - the
    'empty_seq' unconditional branch the sampler uses. ReconX adds the structure tokens: dropped when
    u_s < structure_drop_prob, and whenever text and image are both dropped (the sampler's unconditional branch has
    no structure). A dropped structure is all-zero tokens: to_k_struct / to_v_struct have no bias, so the branch
    adds exactly 0, which is what `structure=None` gives at sampling time.
    """

    uncond_prob: float = 0.05
    structure_drop_prob: float = 0.1

    def masks(self, drop: torch.Tensor) -> tuple:
        """drop: (B, 2) uniforms -> (text_dropped, image_dropped, structure_kept), each (B,) bool."""
        u, u_s = drop[:, 0], drop[:, 1]
        p = self.uncond_prob
        text_dropped = u < 2 * p
        image_dropped = (u >= p) & (u < 3 * p)
        structure_kept = ~((u_s < self.structure_drop_prob) | (text_dropped & image_dropped))
        return text_dropped, image_dropped, structure_kept


def diffuse(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule) -> tuple:
    """(x_t, v target) for latents x0 (B, C, T, h, w), noise like x0, timesteps t (B,) int64 (float32 math)."""
    a = schedule.sqrt_alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1, 1)
    s = schedule.sqrt_one_minus_alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1, 1)
    return a * x0 + s * noise, a * noise - s * x0


@dataclass
class StepInputs:
    """One micro-batch, ready for the UNet. x: (B, 8, T, h, w) = [x_t | c_concat]; target: (B, 4, T, h, w) v;
    timesteps (B,) int64; context (B, 77 + L_img, D); fs (B,) int64; points (B, P, 3); structure_kept (B,) float."""

    x: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor
    context: torch.Tensor
    fs: torch.Tensor
    points: torch.Tensor
    structure_kept: torch.Tensor


class Conditioner:
    """Builds StepInputs from TrainingClips batches with the frozen networks of a VideoModel (VAE, image tower,
    Resampler); the text features are computed once (the prompt does not change) and the text tower can be
    dropped afterwards (`drop_text_encoder`)."""

    def __init__(self, model, prompt: str = "", dropout: Optional[ConditionDropout] = None):
        self.model = model
        self.backbone = get_backbone(model)
        self.dropout = dropout or ConditionDropout()
        with torch.no_grad():
            self.text = model.encode_text([prompt]).float()
            self.empty_text = model.encode_text([""]).float()
        self.prompt = prompt
        self._uncond_image = None

    def drop_text_encoder(self) -> None:
        """Free the text tower (its outputs are cached); `interpolate` then runs with empty prompts only."""
        self.model.empty_prompt = self.empty_text.to(self.model.dtype)
        self.model.text_encoder = None

    def uncond_image(self, like: torch.Tensor) -> torch.Tensor:
        if self._uncond_image is None:
            self._uncond_image = self.model.image_tokens(torch.zeros_like(like[:1])).float()
        return self._uncond_image

    @torch.no_grad()
    def __call__(self, batch: dict, device) -> StepInputs:
        model = self.model
        frames = batch["frames"].to(device, torch.float32) * 2 - 1                 # (B, T, 3, H, W) in [-1, 1]
        b, t = frames.shape[:2]
        latents, concats, images = [], [], []
        for i in range(b):
            draws = [d[None] for d in batch["vae_noise"][i]]                       # T draws of (1, 4, h, w)
            z = encode_frames(model.vae, frames[i], noise=ReplayNoise(draws)).float()
            refs = frames[i][[0, t - 1]]
            state = self.backbone.prepare(model, refs, ReplayNoise([draws[0], draws[t - 1]]))
            parts = self.backbone.segment(model, 0, refs, None, t, None, state)
            latents.append(z.permute(1, 0, 2, 3))                                 # (4, T, h, w)
            concats.append(parts.concat[0].float())
            images.append(parts.image)
        x0 = torch.stack(latents)
        concat = torch.stack(concats)
        image_tokens = model.image_tokens(torch.cat(images)).float()
        text_dropped, image_dropped, structure_kept = self.dropout.masks(batch["drop"].to(device))
        text = torch.where(text_dropped.view(-1, 1, 1), self.empty_text.to(device), self.text.to(device))
        image = torch.where(image_dropped.view(-1, 1, 1), self.uncond_image(frames[:, 0]).to(device), image_tokens)
        timesteps = batch["timestep"].to(device)
        x_t, target = diffuse(x0, batch["noise"].to(device, torch.float32), timesteps, model.schedule)
        return StepInputs(x=torch.cat([x_t, concat], dim=1), target=target, timesteps=timesteps,
                          context=torch.cat([text, image], dim=1), fs=batch["fs"].to(device),
                          points=batch["points"].to(device, torch.float32), structure_kept=structure_kept.float())


class TrainableModel(nn.Module):
    """The networks a stage trains, as one module for accelerate (DDP/FSDP/DeepSpeed wrap it): the UNet (its
    frozen parameters included: requires_grad decides) and the point-cloud encoder."""

    def __init__(self, unet: nn.Module, structure_encoder: nn.Module):
        super().__init__()
        self.unet = unet
        self.structure_encoder = structure_encoder

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, fs: torch.Tensor,
                points: torch.Tensor, structure_kept: torch.Tensor) -> torch.Tensor:
        """v prediction (B, 4, T, h, w); structure_kept (B,) 1/0 keeps / drops each clip's structure tokens."""
        tokens = self.structure_encoder(points)
        tokens = tokens * structure_kept.to(tokens.dtype).view(-1, 1, 1)
        return self.unet(x, timesteps, context, fs=fs, structure=tokens)


def per_sample_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per clip, (B,) float32 (the mean over the batch is the step's loss)."""
    return (prediction.float() - target.float()).square().mean(dim=tuple(range(1, target.dim())))


def step_loss(trainable: nn.Module, inputs: StepInputs) -> torch.Tensor:
    """The micro-batch's loss: the mean of `per_sample_loss` (equal micro-batches, so the mean of the processes'
    and micro-steps' means is the global batch's mean)."""
    prediction = trainable(inputs.x, inputs.timesteps, inputs.context, inputs.fs, inputs.points,
                           inputs.structure_kept)
    return per_sample_loss(prediction, inputs.target).mean()


@torch.no_grad()
def evaluation_losses(model, dataset, timesteps=(100, 300, 500, 700, 900, 999), entries=None, batch: int = 6,
                      device="cpu") -> dict:
    """Mean denoising loss of `model` on a fixed set: every entry of `dataset` (a TrainingClips; or `entries`, a
    list of indices into it) at every timestep, noise and VAE draws from the dataset's sample n = entry index, no
    condition dropped. Three ways of giving the structure: "own" (the clip's cloud), "none" (no tokens), "mirror"
    (the clip's cloud mirrored in x: a wrong but plausible geometry). Returns {"own", "none", "mirror"} floats and
    "per_timestep": {mode: [loss per timestep]}."""
    from .data import collate, read_cloud, subsample_points

    conditioner = Conditioner(model, "")
    trainable = TrainableModel(model.unet, model.structure_encoder)
    was_training = [m.training for m in (model.unet, model.structure_encoder)]
    trainable.eval()
    items = []
    for i in (range(len(dataset)) if entries is None else entries):
        entry = dataset.entries[i]
        cloud = read_cloud(entry.cloud)
        points = cloud.points[subsample_points(cloud.points.shape[0], dataset.points)]
        frames = dataset.load_frames(entry)
        for t in timesteps:
            item = {"frames": frames, "points": points, "fs": torch.tensor(dataset.fs_for(entry)),
                    **dataset.randomness(i)}
            item.update(timestep=torch.tensor(int(t)), drop=torch.ones(2))
            items.append(item)
    losses = {"own": [], "none": [], "mirror": []}
    mirror = torch.tensor([-1.0, 1.0, 1.0], device=device)
    for start in range(0, len(items), batch):
        inputs = conditioner(collate(items[start:start + batch]), device)
        for mode in losses:
            points = inputs.points * mirror if mode == "mirror" else inputs.points
            kept = torch.zeros_like(inputs.structure_kept) if mode == "none" else inputs.structure_kept
            prediction = trainable(inputs.x, inputs.timesteps, inputs.context, inputs.fs, points, kept)
            losses[mode].append(per_sample_loss(prediction, inputs.target))
    for module, mode in zip((model.unet, model.structure_encoder), was_training):
        module.train(mode)
    per = {mode: torch.cat(v).view(-1, len(timesteps)) for mode, v in losses.items()}
    out = {mode: float(v.mean()) for mode, v in per.items()}
    out["per_timestep"] = {mode: v.mean(0).tolist() for mode, v in per.items()}
    return out
