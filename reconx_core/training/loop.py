"""The training loop on Hugging Face Accelerate (DDP, FSDP or DeepSpeed ZeRO-2, chosen by `accelerate config`).

    train(config, data_roots, output_dir, max_steps=None, resume_from=None, device=None) -> summary dict
    run_steps(config, steps, device, stage=None) -> figures of a few steps on in-memory data (scripts/gpu_check.py)

Output folder:
    train_log.jsonl                one JSON object per optimizer step: step, loss (the global batch's mean), lr,
                                   world_size, global_batch, accumulation, gates (tanh of every alpha_struct),
                                   gate_mean, gate_max_abs, seconds
    run.json                       the config and the process layout of the run (of its latest start)
    checkpoints/step_NNNNNNN/      accelerate's save_state (trained parameters only, optimizer, scheduler, EMA,
                                   every process's RNG) + training_state.json (the step = the data position)
    logs/                          tensorboard: loss, lr, gate values, sample videos
    reconx_structure_stageN.safetensors   the export (reconx_core.training.export), written at the end

Every process builds the same model from the same seed; the data of optimizer step s is the global batch
n = s*G .. s*G+G-1 (reconx_core.training.data), split evenly over processes and micro-steps, so the parameters after
N steps do not depend on the number of processes (up to float summation order), and a resumed run continues
exactly. This needs backbone_dropout False: with the UNet's dropout layers active every process draws its own masks
(the official training does keep them active; the result is then equal in distribution, not bitwise).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..errors import InputError
from .config import TrainConfig, merge
from .data import SyntheticSamples, StepBatches, TrainingClips, collate, open_training_data
from .ema import EMA
from .export import DTYPES, export_structure_branch
from .objective import ConditionDropout, Conditioner, TrainableModel, step_loss
from .stages import count_stage_parameters, freeze_for_stage

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
STATE_FILE = "training_state.json"
LOG_FILE = "train_log.jsonl"
# What must not change between a run and its resumption (the data order and the meaning of a step depend on them).
RESUME_KEYS = ("stage", "seed", "global_batch_size", "frames", "resolution", "points")


def export_name(stage: int) -> str:
    return f"reconx_structure_stage{stage}.safetensors"


# -------------------------------------------------------------------------------------------------- the model
def build_training_model(config: TrainConfig, device: Union[str, torch.device] = "cpu"):
    """The VideoModel to train, with a structure encoder, on the CPU (tiny / checkpoint) or `device` (official).

    architecture "checkpoint": load_video_model(config.model.checkpoint) configured as its backbone, the branch
    initialised as the loader does (default Linear init, alpha_struct 0) under config.model.seed; "official" /
    "tiny": random weights of that architecture from config.model.seed. init_branch: load that structure-branch
    file (stage 2 starts from stage 1's export).
    """
    from ..structure import PointCloudEncoder
    from ..video import (OFFICIAL_512_INTERP, build_video_model, load_backbone, load_structure_branch,
                         load_video_model, tiny_config)

    mc = config.model
    torch.manual_seed(mc.seed)
    if mc.architecture == "checkpoint":
        if not mc.checkpoint:
            raise InputError("model.checkpoint is not set: give the DynamiCrafter-512-interp file "
                             "(models/reconx/dynamicrafter_512_interp.ckpt) in the config or with --checkpoint")
        path = Path(mc.checkpoint)
        if not path.is_file():
            raise InputError(f"the video model {path} does not exist; download dynamicrafter_512_interp.ckpt "
                             "(README, Model files) or set model.checkpoint")
        model = load_video_model(path, device="cpu", clip_vision=mc.clip_vision, text_encoder=mc.text_encoder)
        load_backbone(model, path)
        torch.manual_seed(mc.seed)
        model.structure_encoder = PointCloudEncoder(**model.config["structure"])
    else:
        base = tiny_config() if mc.architecture == "tiny" else OFFICIAL_512_INTERP
        build_on = device if mc.architecture == "official" and torch.device(device).type == "cuda" else "cpu"
        model = build_video_model(merge(base, mc.overrides), structure_encoder=True, seed=mc.seed, device=build_on)
        if build_on != "cpu":
            model.reset_buffers()
        calibrate_random_vae(model.vae, mc.seed)
    if mc.init_branch:
        load_structure_branch(model, mc.init_branch)
    model.float()
    return model


@torch.no_grad()
def calibrate_random_vae(vae, seed: int = 0) -> float:
    """Give a random-weight VAE the latent statistics of the real one: unit-scale latents (after the 0.18215
    factor) and a near-deterministic posterior (std e^-5). A random VAE's latents are ~0.05 and its posterior
    noise ~0.2, so its v-targets would be almost pure noise and no condition could lower the loss. Scales the
    mean half of `quant_conv` by one factor measured on fixed smooth random images; returns that factor."""
    from ..video.vae import SCALE_FACTOR

    conv = vae.quant_conv
    half = conv.weight.shape[0] // 2
    conv.weight[half:] = 0
    conv.bias[half:] = -10.0
    g = torch.Generator().manual_seed(7919 + int(seed))
    images = torch.nn.functional.interpolate(torch.rand(4, 3, 8, 8, generator=g), size=(64, 64), mode="bilinear",
                                             align_corners=False) * 2 - 1
    device = conv.weight.device
    mean = vae.encode(images.to(device, conv.weight.dtype)).latent_dist.mean * SCALE_FACTOR
    gain = 1.0 / float(mean.float().std().clamp_min(1e-8))
    conv.weight[:half] *= gain
    conv.bias[:half] *= gain
    return gain


def set_train_mode(module: nn.Module, dropout: bool) -> None:
    """Train mode; with dropout False every Dropout layer stays in eval mode (identity)."""
    module.train()
    if not dropout:
        for m in module.modules():
            if isinstance(m, nn.Dropout):
                m.eval()


def gate_values(unet: nn.Module) -> list:
    """tanh(alpha_struct) of every spatial cross-attention, in named_parameters() order."""
    return [float(torch.tanh(p.detach().float())) for n, p in unet.named_parameters() if n.endswith("alpha_struct")]


# ------------------------------------------------------------------------------------------------ accelerate
def _fresh_accelerate_state() -> None:
    """Forget an earlier Accelerator of this process (tests, gpu_check's two stages) unless a launcher started a
    process group, which must live on."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


def make_accelerator(config: TrainConfig, output_dir: Path, device: Optional[str] = None):
    """(Accelerator, accumulation steps). On a machine without CUDA (or device "cpu") the processes form a gloo
    group on the CPU (`accelerate launch --multi_gpu --num_processes N` starts N of them) and run in float32."""
    try:
        from accelerate import Accelerator, PartialState
        from accelerate.utils import ProjectConfiguration
    except ImportError:
        raise InputError("training needs Hugging Face Accelerate: pip install accelerate tensorboard") from None
    cpu = device == "cpu" or not torch.cuda.is_available()
    _fresh_accelerate_state()
    world = PartialState(cpu=cpu).num_processes
    accumulation = config.accumulation_steps(world)
    log_with = None
    if config.log_with == "tensorboard":
        if _tensorboard_available():
            log_with = "tensorboard"
        else:
            log.warning("tensorboard is not installed: no tensorboard logs (pip install tensorboard); "
                        "train_log.jsonl is written anyway")
    elif config.log_with:
        log_with = config.log_with
    mixed = "no" if cpu else config.mixed_precision
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed, gradient_accumulation_steps=accumulation,
                              log_with=log_with, project_config=ProjectConfiguration(
                                  project_dir=str(output_dir), logging_dir=str(output_dir / "logs")))
    return accelerator, accumulation


def _register_trainable_state_hooks(accelerator, trainable: nn.Module) -> None:
    """Checkpoints hold the trained parameters only (not the frozen billions): accelerate's model file gets them
    and they are loaded back by name, strictly."""
    from safetensors.torch import load_file

    def trained(module):
        module = accelerator.unwrap_model(module)
        return {n: p for n, p in module.named_parameters() if p.requires_grad}

    def save_hook(models, weights, output_dir):
        for i, module in enumerate(models):
            if i < len(weights):
                weights[i] = {n: p.detach().cpu().contiguous() for n, p in trained(module).items()}

    def load_hook(models, input_dir):
        while models:
            module = models.pop(0)
            state = load_file(str(Path(input_dir) / "model.safetensors"))
            params = trained(module)
            if set(state) != set(params):
                raise InputError(f"the checkpoint {input_dir} trained other parameters ({len(set(state) ^ set(params))}"
                                 " differ): was it written by another stage or model?")
            with torch.no_grad():
                for name, value in state.items():
                    params[name].copy_(value)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def resolve_checkpoint(resume_from: PathLike, output_dir: Path) -> Path:
    """A checkpoint folder: `resume_from` itself, the latest one under it, or under output_dir for "latest"."""
    root = output_dir / "checkpoints" if str(resume_from) == "latest" else Path(resume_from)
    if (root / STATE_FILE).is_file():
        return root
    found = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file()) if root.is_dir() else []
    if not found:
        raise InputError(f"no training checkpoint in {root} (a folder with {STATE_FILE}, or checkpoints/step_*)")
    return found[-1]


# ------------------------------------------------------------------------------------------------------ train
def train(config: TrainConfig, data_roots: Sequence[PathLike] = (), output_dir: PathLike = "runs/structure",
          max_steps: Optional[int] = None, resume_from: Optional[PathLike] = None, device: Optional[str] = None,
          export: bool = True, checkpoint_at_end: bool = True) -> dict:
    """Train the structure branch (and the stage's layers) of config.stage; see the module docstring.

    data_roots: dataset folders (RealEstate10K / ACID chunk layout, DL3DV) with their point-cloud caches; none
    with config.data.synthetic. max_steps: stop after this optimizer step (default config.steps). resume_from: a
    checkpoint folder, a folder of them, or "latest" (output_dir's). device: "cpu" forces the CPU.
    Returns {"start_step", "steps", "losses" (this run's steps), "world_size", "accumulation", "export",
    "step_seconds", "peak_memory_bytes", "parameters", "model" (the trained VideoModel, for in-process callers)};
    every process returns (only the main one writes files). A run on data.synthetic writes neither checkpoints
    nor an export.
    """
    config.check()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator, accumulation = make_accelerator(config, output_dir, device)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    dev = accelerator.device
    total = config.steps if max_steps is None else int(max_steps)
    dc = config.data

    model = build_training_model(config, dev)
    trained_names = freeze_for_stage(model, config.stage)
    counts = count_stage_parameters(model, config.stage)
    if accelerator.mixed_precision != "no" and config.model.frozen_dtype != "fp32":
        frozen = DTYPES[config.model.frozen_dtype]
        with torch.no_grad():
            for p in model.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(frozen)
    model.to(dev)
    model.device = dev
    conditioner = Conditioner(model, dc.prompt, ConditionDropout(config.conditioning.uncond_prob,
                                                                 config.conditioning.structure_drop_prob))
    conditioner.drop_text_encoder()
    model.unet.gradient_checkpointing = bool(config.gradient_checkpointing)
    trainable = TrainableModel(model.unet, model.structure_encoder)
    named = [(n, p) for n, p in trainable.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    oc = config.optim
    new = [p for n, p in named if "_struct" in n or n.startswith("structure_encoder.")]
    base = [p for n, p in named if not ("_struct" in n or n.startswith("structure_encoder."))]
    groups = [{"params": new, "lr": oc.lr * oc.branch_lr_scale}] + ([{"params": base, "lr": oc.lr}] if base else [])
    optimizer = torch.optim.AdamW(groups, lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps, weight_decay=oc.weight_decay)
    warmup = int(oc.warmup_steps)
    # not given to accelerate.prepare: its wrapper would step it once per process per call
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    trainable, optimizer = accelerator.prepare(trainable, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    ema = EMA(params, config.ema_decay) if config.ema_decay else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    _register_trainable_state_hooks(accelerator, trainable)

    if dc.synthetic:
        dataset = SyntheticSamples(dc.frames, dc.resolution, dc.points, seed=config.seed,
                                   num_timesteps=model.schedule.num_timesteps)
    else:
        if not data_roots:
            raise InputError("give --data-root (a RealEstate10K/ACID chunk folder or DL3DV scenes with their "
                             "point-cloud cache), or set data.synthetic for a run on random in-memory data")
        datasets, caches = open_training_data(data_roots, dc.split, dc.cache_dir)
        dataset = TrainingClips(datasets, caches, dc.frames, dc.resolution, dc.points, seed=config.seed,
                                num_timesteps=model.schedule.num_timesteps, frame_stride=dc.frame_stride,
                                max_frame_stride=dc.max_frame_stride)

    start_step = 0
    layout = {"stage": config.stage, "seed": config.seed, "global_batch_size": config.global_batch_size,
              "frames": dc.frames, "resolution": list(dc.resolution), "points": dc.points}
    if resume_from is not None:
        ckpt = resolve_checkpoint(resume_from, output_dir)
        saved = json.loads((ckpt / STATE_FILE).read_text())
        changed = {k: (saved.get(k), layout[k]) for k in RESUME_KEYS if saved.get(k) != layout[k]}
        if changed:
            raise InputError(f"cannot resume {ckpt} with another {sorted(changed)} ({changed}); use its config")
        if saved.get("entries") not in (None, len(dataset)):
            log.warning("the data has %d clips, the checkpoint's run had %s: the sample order differs from the "
                        "interrupted run's", len(dataset), saved.get("entries"))
        accelerator.load_state(str(ckpt))
        start_step = int(saved["step"])
        log.info("resumed from %s at step %d", ckpt, start_step)

    if main:
        (output_dir / "run.json").write_text(json.dumps({"config": config.to_dict(), "world_size": world,
                                                         "accumulation": accumulation, "start_step": start_step,
                                                         "device": str(dev), "parameters": counts,
                                                         "mixed_precision": accelerator.mixed_precision}, indent=1))
        _trim_log(output_dir / LOG_FILE, start_step)
        if accelerator.log_with:
            accelerator.init_trackers("reconx_structure", config=_flat(config.to_dict()))
    log.info("process %d/%d on %s: stage %d, %d trainable parameters (%d tensors), %d frozen; steps %d..%d, global "
             "batch %d = %d micro x %d processes x %d accumulation", rank, world, dev, config.stage,
             counts["trainable"], len(trained_names), counts["frozen"], start_step, total, config.global_batch_size,
             config.micro_batch_size, world, accumulation)

    sampler = StepBatches(start_step, total, config.global_batch_size, config.micro_batch_size, accumulation, rank,
                          world)
    # its own generator: creating the iterator would otherwise draw from the global RNG, which a resumed run has
    # just restored (the samples themselves depend only on their numbers)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=dc.num_workers, generator=torch.Generator().manual_seed(0))
    unwrapped = accelerator.unwrap_model(trainable)
    set_train_mode(unwrapped, config.backbone_dropout)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    step, micro_losses, losses, seconds = start_step, [], [], []
    t0 = time.perf_counter()
    for batch in loader:
        inputs = conditioner(batch, dev)
        with accelerator.accumulate(trainable):
            with accelerator.autocast():
                loss = step_loss(trainable, inputs)
            accelerator.backward(loss)
            if accelerator.sync_gradients and oc.grad_clip:
                accelerator.clip_grad_norm_(params, oc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        micro_losses.append(loss.detach().float())
        if not accelerator.sync_gradients:
            continue
        lr = scheduler.get_last_lr()[-1]  # the base layers' rate this step used (the branch's alone in stage 1)
        scheduler.step()
        if ema is not None:
            ema.update()
        step += 1
        step_loss_value = float(accelerator.reduce(torch.stack(micro_losses).mean(), reduction="mean"))
        micro_losses = []
        dt = time.perf_counter() - t0
        losses.append(step_loss_value)
        seconds.append(dt)
        if main:
            gates = gate_values(unwrapped.unet)
            record = {"step": step, "loss": step_loss_value, "lr": lr, "world_size": world,
                      "global_batch": config.global_batch_size, "accumulation": accumulation, "gates": gates,
                      "gate_mean": sum(gates) / len(gates), "gate_max_abs": max(abs(g) for g in gates),
                      "seconds": round(dt, 4)}
            with open(output_dir / LOG_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
            if accelerator.log_with and config.log_every and (step % config.log_every == 0 or step == total):
                values = {"loss": step_loss_value, "lr": record["lr"], "gates/mean_tanh": record["gate_mean"],
                          "gates/max_abs_tanh": record["gate_max_abs"]}
                values.update({f"gates/layer_{i:02d}": g for i, g in enumerate(gates)})
                accelerator.log(values, step=step)
        if config.sample_every and step % config.sample_every == 0:
            _log_samples(accelerator, model, conditioner, dataset, config, step, ema)
            set_train_mode(unwrapped, config.backbone_dropout)
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total:
            save_checkpoint(accelerator, output_dir, step, layout, len(dataset), config.keep_checkpoints)
        t0 = time.perf_counter()

    if dc.synthetic:  # random data: nothing worth keeping but the log
        checkpoint_at_end = export = False
    if checkpoint_at_end and step > start_step:
        save_checkpoint(accelerator, output_dir, step, layout, len(dataset), config.keep_checkpoints)
    exported = None
    if export and main:
        with (ema.applied() if ema is not None else contextlib.nullcontext()):
            exported = export_structure_branch(model, output_dir / export_name(config.stage), config.stage, step,
                                               config.to_dict(), config.export_dtype)
        log.info("exported %s", exported)
    accelerator.wait_for_everyone()
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    if accelerator.log_with:
        accelerator.end_training()
    return {"start_step": start_step, "steps": step, "losses": losses, "world_size": world,
            "accumulation": accumulation, "export": None if exported is None else str(exported),
            "step_seconds": seconds, "peak_memory_bytes": peak, "parameters": counts, "model": model}


def save_checkpoint(accelerator, output_dir: Path, step: int, layout: dict, entries: int, keep: int) -> Path:
    """accelerate's save_state into checkpoints/.step_N.partial, then (main process) training_state.json and a
    rename to checkpoints/step_N: a checkpoint folder exists only once it is complete. Keeps the last `keep`."""
    root = output_dir / "checkpoints"
    final = root / f"step_{step:07d}"
    partial = root / f".step_{step:07d}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps({"step": step, "entries": entries, **layout}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        done = sorted(p for p in root.glob("step_*") if p.is_dir())
        for old in done[:max(0, len(done) - max(1, keep))]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _trim_log(path: Path, start_step: int) -> None:
    """Keep the log lines of steps <= start_step (a resumed run rewrites what came after its checkpoint)."""
    if start_step == 0 or not path.is_file():
        path.write_text("")
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()
             and json.loads(line).get("step", 0) <= start_step]
    path.write_text("".join(line + "\n" for line in lines))


def _flat(values: dict, prefix: str = "") -> dict:
    """A nested config as flat scalars for tensorboard's hparams (lists and None as strings)."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out


def _log_samples(accelerator, model, conditioner, dataset, config: TrainConfig, step: int, ema) -> None:
    """A short DDIM sample of the run's first clip (its references, its cloud) next to the real frames, to
    tensorboard. Main process only; the others wait."""
    if accelerator.is_main_process and accelerator.log_with:
        from ..video import interpolate

        item = dataset[0]
        frames = item["frames"]
        model.eval()
        with torch.no_grad(), accelerator.autocast(), \
                (ema.applied() if ema is not None else contextlib.nullcontext()):
            gates = gate_values(model.unet)
            tokens = None
            if any(g != 0 for g in gates):
                tokens = model.structure_encoder(item["points"][None].to(model.device))
            video = interpolate(model, frames[[0, -1]].to(model.device), structure=tokens, prompt="",
                                steps=config.sample_steps, frames=frames.shape[0], seed=0,
                                frame_stride=int(item["fs"]))
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        if hasattr(writer, "add_images"):
            writer.add_images("samples/generated", video.float().cpu(), global_step=step)
            writer.add_images("samples/real", frames.float(), global_step=step)
    accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------------- a few steps
def run_steps(config: TrainConfig, steps: int = 3, device: Optional[str] = None, stage: Optional[int] = None) -> dict:
    """A few optimizer steps of `config` (optionally another stage) on random in-memory clips, in this process:
    what scripts/gpu_check.py calls to time stage 1 and stage 2 (e.g. with configs/train/gpu_check.yaml: the real
    architecture at random weights, 32 x 320 x 512, bf16, gradient checkpointing). Nothing is exported or
    checkpointed. Returns {"stage", "steps", "losses", "step_seconds" (the first includes warm-up),
    "peak_memory_bytes" (CUDA) , "parameters", "world_size"}."""
    overrides = {"data": {"synthetic": True, "num_workers": 0}, "sample_every": 0, "checkpoint_every": 0,
                 "log_with": None}
    if stage is not None:
        overrides["stage"] = int(stage)
    from .config import config_from_dict

    cfg = config_from_dict(merge(config.to_dict(), overrides))
    with tempfile.TemporaryDirectory(prefix="reconx_run_steps_") as tmp:
        result = train(cfg, (), tmp, max_steps=steps, device=device, export=False, checkpoint_at_end=False)
    result.pop("model", None)
    return {"stage": cfg.stage, **{k: result[k] for k in ("steps", "losses", "step_seconds", "peak_memory_bytes",
                                                          "parameters", "world_size")}}
