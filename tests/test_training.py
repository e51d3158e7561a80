"""Training the structure branch (reconx_core.training, scripts/prepare_pointclouds.py, scripts/train_structure.py)
with tiny random-weight models on synthetic clips in the RealEstate10K chunk layout, on the CPU.

What is checked: the stage parameter selection (names and counts of the real architecture, from meta models);
condition dropout and zero-token structure dropping; the deterministic sample layout; the cache written by the
script with a tiny DUSt3R; a tiny model trains (the loss on a fixed set falls, the gates leave zero, every frozen
parameter is bitwise unchanged, the export loads through the video loader, changes its output, and is refused for
another backbone); two processes (gloo) reach the parameters one process reaches; a resumed run reaches the
uninterrupted run's parameters; the structure condition lowers the loss on clips only the cloud explains; the
memory tracer counts on meta what a real run allocates.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("accelerate")

from reconx_core.errors import CheckpointError, InputError  # noqa: E402
from reconx_core.training import count_stage_parameters, load_config, stage_unet_parameter_names, train  # noqa: E402
from reconx_core.training.data import (TrainingClips, open_training_data, read_cache_index, read_cloud,  # noqa: E402
                                       sample_positions, segment_frames)
from reconx_core.training.export import read_export_info  # noqa: E402
from reconx_core.training.loop import LOG_FILE, build_training_model, export_name  # noqa: E402
from reconx_core.training.objective import ConditionDropout, evaluation_losses  # noqa: E402
from reconx_core.training.stages import unet_parameter_groups  # noqa: E402
from reconx_core.training.synthetic import write_parallax_clips, write_room_clips  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "train" / "tiny.yaml"
NO_LOG = {"log_with": None}


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = str(REPO)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rooms(tmp_path_factory):
    """Four synthetic rooms (12 frames, 64x64) in DIR/train, their cache written by scripts/prepare_pointclouds.py
    with a tiny random DUSt3R (what the script does with the real one, on geometry that means nothing)."""
    from reconx_core.testing import tiny_dust3r

    root = tmp_path_factory.mktemp("rooms")
    write_room_clips(root, n_clips=4, n_frames=12, height=64, width=64, cache=False)
    dust3r = tiny_dust3r(0)
    weights = root / "tiny_dust3r.safetensors"
    save_file({k: v.contiguous() for k, v in dust3r.state_dict().items() if ".scratch.layer_rn." not in k},
              str(weights), metadata={"enc_num_heads": "4", "dec_num_heads": "4"})
    return root, weights


def _prepare(argv):
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_pointclouds", REPO / "scripts" / "prepare_pointclouds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


@pytest.fixture(scope="module")
def cached_rooms(rooms):
    root, weights = rooms
    assert _prepare(["--data-root", str(root), "--dust3r", str(weights), "--cpu"]) == 0
    return root


# ----------------------------------------------------------------------------------------------- unit checks
def test_stage_parameters_of_the_real_architecture():
    """Counted on the meta device: stage 1 = branch + encoder + to_k_ip/to_v_ip (the README's 63.8 M), stage 2 =
    branch + encoder + every spatial layer (927.6 M); temporal layers and the time/fs embeddings never train."""
    from reconx_core.video import OFFICIAL_512_INTERP, build_video_model

    model = build_video_model(OFFICIAL_512_INTERP, structure_encoder=True, device="meta")
    groups = unet_parameter_groups(model.unet)
    names = [n for n, _ in model.unet.named_parameters()]
    assert sorted(sum(groups.values(), [])) == sorted(names)  # a partition
    stage1 = stage_unet_parameter_names(model.unet, 1)
    assert all("_struct" in n or ".attn2.to_k_ip." in n or ".attn2.to_v_ip." in n for n in stage1)
    assert len([n for n in stage1 if "_ip." in n]) == 32 and len([n for n in stage1 if "_struct" in n]) == 48
    stage2 = set(stage_unet_parameter_names(model.unet, 2))
    assert set(stage1) <= stage2
    assert not any("temopral_conv" in n or n.startswith(("time_embed", "fps_embedding", "init_attn")) for n in stage2)
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in stage2
    assert "input_blocks.1.2.transformer_blocks.0.attn1.to_q.weight" not in stage2  # temporal transformer
    assert count_stage_parameters(model, 1)["trainable"] == 63_768_592
    assert count_stage_parameters(model, 2)["trainable"] == 927_640_276
    # the backbone's own parameters: the manifest's 1,438,854,980 UNet elements plus the branch
    assert sum(p.numel() for p in model.unet.parameters()) == \
        1_438_854_980 + 25_559_056


def test_condition_dropout_follows_dynamicrafter():
    """u < 2p drops the text, p <= u < 3p the image (each of text, both, image with probability p); structure
    dropped with probability p_s and always with both. Exact on an even grid of draws."""
    n = 10_000
    u = (torch.arange(n) + 0.5) / n
    drop = torch.stack([u, u[torch.randperm(n, generator=torch.Generator().manual_seed(0))]], 1)
    text, image, kept = ConditionDropout(0.05, 0.1).masks(drop)
    both = text & image
    assert (text & ~image).sum() == 500 and both.sum() == 500 and (image & ~text).sum() == 500
    assert not kept[both].any()
    assert abs(float((~kept).float().mean()) - (0.1 + 0.05 - 0.1 * 0.05)) < 0.01  # independent draws


def test_zero_structure_tokens_are_exactly_no_structure():
    """Dropped structure = zero tokens; to_k/to_v_struct have no bias, so the branch adds exactly 0 and the
    output is bitwise the one without tokens, even with open gates."""
    from reconx_core.video import build_video_model, tiny_config

    model = build_video_model(tiny_config(), structure_encoder=True, seed=0)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if name.endswith("alpha_struct"):
                p.fill_(0.7)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 8, 4, 8, 8, generator=g), torch.randn(2, 141, 32, generator=g)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        plain = model.unet(x, t, ctx)
        zero = model.unet(x, t, ctx, structure=torch.zeros(2, 20, 32))
        real = model.unet(x, t, ctx, structure=torch.randn(2, 20, 32, generator=g))
    assert torch.equal(plain, zero)
    assert not torch.equal(plain, real)


def test_gradient_checkpointing_gives_the_same_gradients():
    """UNet.gradient_checkpointing recomputes blocks in the backward pass: same loss and gradients. Tolerance:
    recomputation repeats the same float32 ops, measured bitwise here; 1e-6 relative leaves room for kernels
    that pick another blocking for another call."""
    from reconx_core.video import build_video_model, tiny_config

    model = build_video_model(tiny_config(), structure_encoder=True, seed=0)
    g = torch.Generator().manual_seed(3)
    x, ctx, s = torch.randn(1, 8, 4, 8, 8, generator=g), torch.randn(1, 141, 32, generator=g), \
        torch.randn(1, 16, 32, generator=g)
    grads = []
    for ck in (False, True):
        model.unet.zero_grad()
        model.unet.gradient_checkpointing = ck
        model.unet(x, torch.tensor([500]), ctx, structure=s).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.unet.parameters() if p.grad is not None]))
    scale = grads[0].abs().max()
    assert (grads[0] - grads[1]).abs().max() <= 1e-6 * scale


def test_sample_layout_does_not_depend_on_processes():
    """The global batch of a step is the same set of sample numbers for any split into processes and micro-steps."""
    layouts = [(1, 4, 1), (2, 2, 1), (2, 1, 2), (4, 1, 1), (1, 1, 4)]  # (world, micro, accumulation)
    for step in (0, 3):
        sets = []
        for world, micro, acc in layouts:
            got = [n for r in range(world) for m in range(acc)
                   for n in sample_positions(step, 4, micro, acc, r, world, m)]
            assert len(got) == 4
            sets.append(sorted(got))
        assert all(s == list(range(4 * step, 4 * step + 4)) for s in sets)
    assert segment_frames(10, 41, 32) == list(range(10, 42))
    assert segment_frames(0, 11, 4) == [0, 4, 7, 11]
    with pytest.raises(InputError, match="not a multiple"):
        load_config(TINY, {"global_batch_size": 3}).accumulation_steps(2)
    with pytest.raises(InputError, match="unknown optim option"):
        load_config(TINY, {"optim": {"learning_rate": 1}})


def test_prepare_pointclouds_writes_a_resumable_cache(rooms, cached_rooms, tmp_path):
    root, weights = rooms
    cache = root / "pointclouds" / "train"
    index = read_cache_index(cache)
    assert len(index) == 4 and all(v["start"] == 0 and v["end"] == 11 for v in index.values())
    cloud = read_cloud(cache / f"{next(iter(index))}.safetensors")
    assert cloud.points.shape[1] == 3 and torch.isfinite(cloud.points).all()
    assert (cloud.conf > 3.0).all() and 0 <= float(cloud.colours.min()) <= float(cloud.colours.max()) <= 1
    assert cloud.meta["dust3r"] == weights.name
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    assert _prepare(["--data-root", str(root), "--dust3r", str(weights), "--cpu"]) == 0  # resume: nothing to do
    assert stamps == {p.name: p.stat().st_mtime_ns for p in cache.glob("*.safetensors")}
    other = tmp_path / "cache"
    assert _prepare(["--data-root", str(root), "--dust3r", str(weights), "--cpu", "--max-clips", "1",
                     "--max-span", "6", "--cache-dir", str(other)]) == 0
    assert sorted(read_cache_index(other)) == [f"{sorted(index)[0]}@0-5", f"{sorted(index)[0]}@6-11"]


# ------------------------------------------------------------------------------------------------- training
def _trained(model, stage):
    names = {f"unet.{n}" for n in stage_unet_parameter_names(model.unet, stage)}
    return {n for n, _ in model.named_parameters() if n in names or n.startswith("structure_encoder.")}


def test_tiny_model_trains_and_exports(cached_rooms, tmp_path):
    """Stage 1, 24 steps on the rooms. Measured: fixed-set loss 1.1595 -> 1.1531, gates tanh(alpha) -0.04 .. 0.02
    (the random backbone is frozen, so only the branch and to_k_ip/to_v_ip move); the bound asks for a fall of
    1e-3 (float32 rounding moves this loss by ~1e-6)."""
    config = load_config(TINY, NO_LOG)
    before = build_training_model(config)
    datasets, caches = open_training_data([cached_rooms])
    fixed = TrainingClips(datasets, caches, 4, [64, 64], 256, seed=99)
    loss_before = evaluation_losses(before, fixed)["own"]
    result = train(config, [cached_rooms], tmp_path / "run", max_steps=24)
    model = result["model"]
    loss_after = evaluation_losses(model, fixed)["own"]
    last = json.loads((tmp_path / "run" / LOG_FILE).read_text().splitlines()[-1])
    print(f"fixed-set loss {loss_before:.4f} -> {loss_after:.4f}; step losses {result['losses'][0]:.4f} .. "
          f"{result['losses'][-1]:.4f}; gates {[round(g, 4) for g in last['gates']]}")
    assert loss_after < loss_before - 1e-3, (loss_before, loss_after)

    log = [json.loads(line) for line in (tmp_path / "run" / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 25)) and all(r["world_size"] == 1 for r in log)
    assert all(r["gate_max_abs"] > 0 for r in log)            # the gates left zero at the first step
    trained = _trained(model, 1)
    reference = dict(before.named_parameters())
    for name, p in model.named_parameters():
        if name.startswith("text_encoder."):
            continue  # dropped after its features were cached
        if name in trained:
            continue
        assert torch.equal(p, reference[name]), f"frozen parameter {name} changed"
    assert all(not torch.equal(dict(model.named_parameters())[n], reference[n]) for n in trained
               if n.endswith("alpha_struct"))

    # the export: a structure-branch file the video loader takes, with its metadata
    path = tmp_path / "run" / export_name(1)
    info = read_export_info(path)
    assert info["backbone"] == "dynamicrafter_512_interp" and info["stage"] == 1 and info["steps"] == 24
    assert info["base_layers"] == 8  # to_k_ip / to_v_ip of the 4 spatial transformers
    from reconx_core.video import load_video_model, save_video_model

    base_file = tmp_path / "tiny_base.safetensors"  # a name that says no backbone, like a renamed model.ckpt
    save_video_model(before, base_file)
    plain = load_video_model(base_file)
    loaded = load_video_model(base_file, structure_path=path)
    params = dict(loaded.unet.named_parameters())
    for name, p in model.unet.named_parameters():
        if f"unet.{name}" in trained:
            assert torch.equal(params[name], p), name
    g = torch.Generator().manual_seed(5)
    x, ctx, t = torch.randn(1, 8, 4, 8, 8, generator=g), torch.randn(1, 141, 32, generator=g), torch.tensor([700])
    points = torch.randn(1, 256, 3, generator=g)
    with torch.no_grad():
        tokens = loaded.structure_encoder(points)
        assert torch.equal(tokens, model.structure_encoder(points))
        assert not torch.allclose(loaded.unet(x, t, ctx, structure=tokens), plain.unet(x, t, ctx), atol=1e-4)

    # a file trained for DynamiCrafter-512-interp is refused by a model running as another backbone
    other = dict(before.config, backbone="viewcrafter_25_512")
    before.config = other
    save_video_model(before, tmp_path / "tiny_viewcrafter.safetensors")
    with pytest.raises(CheckpointError, match="trained for the dynamicrafter_512_interp video backbone"):
        load_video_model(tmp_path / "tiny_viewcrafter.safetensors", structure_path=path)
    from reconx_core.video import load_backbone

    again = load_video_model(base_file, structure_path=path)
    with pytest.raises(CheckpointError, match="trained for the dynamicrafter_512_interp video backbone"):
        load_backbone(again, base_file, "viewcrafter_25_512")


def test_resume_reaches_the_uninterrupted_run(cached_rooms, tmp_path):
    """6 steps at once vs 3 steps, stop, resume to 6: the same parameters (optimizer, scheduler, EMA and every RNG
    restored; the data position is the step). The UNet's dropout is on here, so the restored RNG matters.
    Measured bitwise equal; the bound (1e-6 of the largest parameter) only allows for kernel choice."""
    config = load_config(TINY, {**NO_LOG, "backbone_dropout": True, "ema_decay": 0.9, "optim": {"warmup_steps": 4}})
    whole = train(config, [cached_rooms], tmp_path / "whole", max_steps=6)
    first = train(config, [cached_rooms], tmp_path / "parts", max_steps=3)
    assert first["steps"] == 3
    second = train(config, [cached_rooms], tmp_path / "parts", max_steps=6, resume_from="latest")
    assert second["start_step"] == 3
    a = load_file(str(tmp_path / "whole" / export_name(1)))
    b = load_file(str(tmp_path / "parts" / export_name(1)))
    scale = max(v.abs().max() for v in a.values())
    assert max((a[k] - b[k]).abs().max() for k in a) <= 1e-6 * scale
    log = [json.loads(line) for line in (tmp_path / "parts" / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in log] == pytest.approx(whole["losses"], rel=1e-6)
    with pytest.raises(InputError, match="cannot resume"):
        train(load_config(TINY, {**NO_LOG, "seed": 1}), [cached_rooms], tmp_path / "parts", max_steps=7,
              resume_from="latest")


def test_two_processes_match_one(cached_rooms, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on the CPU: two processes in one gloo group (world_size 2
    in the log), each with half of every global batch, reach the parameters of one process with the whole batch.
    DDP averages the two gradients where one process accumulates halves: the same sum in another order, so the
    bound is float32 rounding carried through 4 AdamW steps, 1e-5 of the largest parameter (measured: equal)."""
    out2 = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(_free_port()), str(REPO / "scripts" / "train_structure.py"), "--config", str(TINY), "--data-root",
           str(cached_rooms), "--output-dir", str(out2), "--max-steps", "4", "--set", "log_with=null"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = [json.loads(line) for line in (out2 / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["world_size"] == 2 for r in log)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched worker (accelerate sets OMP_NUM_THREADS=1): the same summation order
    try:
        one = train(load_config(TINY, NO_LOG), [cached_rooms], tmp_path / "one", max_steps=4)
    finally:
        torch.set_num_threads(threads)
    assert one["world_size"] == 1 and one["accumulation"] == 2
    a = load_file(str(tmp_path / "one" / export_name(1)))
    b = load_file(str(out2 / export_name(1)))
    scale = max(v.abs().max() for v in a.values())
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    print(f"1 vs 2 processes: max parameter difference {float(diffs.max()):.3g} (largest parameter {float(scale):.3g})")
    # Adam divides each gradient by its own running size, so an element whose gradient is at float32 rounding level
    # (the gates start at 0) can move by up to the learning rate per step whichever way rounding tips it: such
    # elements may differ by up to the sum of the 4 steps' rates (8e-3 with tiny.yaml's lr 2e-3), and only they.
    # Every other element agrees to 1e-5 of the largest parameter (measured: all equal, 1 thread each).
    off = diffs > 1e-5 * scale
    assert float(diffs.max()) <= 4 * 2e-3 and float(off.float().mean()) <= 0.01
    assert [r["loss"] for r in log] == pytest.approx(one["losses"], rel=1e-5)


# ---------------------------------------------------------------------------------- the structure condition
# Parallax clips (reconx_core.training.synthetic): one texture, identical end frames for every clip, in-between
# frames set by the plane's slant, which only the cloud shows. A tiny backbone is first fitted to the clips (stage 2
# with the usual 10 % structure dropout: it stands in for the pretrained DynamiCrafter, which a random network is
# not), then stage 1 trains the branch on top, as the paper's stage 1 does. Measured on the fixed set (8 clips x 6
# timesteps, 32x32, 6 frames), for seeds 0 / 1 / 2: own cloud 0.2605 / 0.3010 / 0.2368, no tokens 0.2697 / 0.3052
# / 0.2489, mirrored cloud 0.2700 / 0.3036 / 0.2579, i.e. the own cloud beats both by >= 0.9 % (seed 1's mirror)
# and 3.5 % at seed 0, the one tested. The test asks for 0.3 %.
HELPS_MARGIN = 0.003


def test_structure_condition_lowers_the_loss_where_only_the_cloud_knows(tmp_path):
    root = tmp_path / "parallax"
    write_parallax_clips(root, n_clips=8, n_frames=6, size=32, seed=100, texture_seed=7)
    common = {**NO_LOG, "seed": 0, "micro_batch_size": 2, "model": {"seed": 0},
              "data": {"frames": 6, "resolution": [32, 32], "points": 512}}
    fit = load_config(TINY, {**common, "stage": 2, "optim": {"lr": 3e-3}})
    train(fit, [root], tmp_path / "backbone", max_steps=150, checkpoint_at_end=False)
    branch = load_config(TINY, {**common, "stage": 1, "optim": {"lr": 5e-3}, "model": {
        "seed": 0, "init_branch": str(tmp_path / "backbone" / export_name(2))}})
    model = train(branch, [root], tmp_path / "branch", max_steps=120, export=False,
                  checkpoint_at_end=False)["model"]
    datasets, caches = open_training_data([root])
    losses = evaluation_losses(model, TrainingClips(datasets, caches, 6, [32, 32], 512, seed=12345))
    print("structure condition:", {k: round(v, 4) for k, v in losses.items() if k != "per_timestep"})
    assert losses["own"] < losses["none"] * (1 - HELPS_MARGIN)
    assert losses["own"] < losses["mirror"] * (1 - HELPS_MARGIN)


# ----------------------------------------------------------------------------------------------------- memory
def test_memory_trace_on_meta_counts_what_a_real_run_allocates():
    """The README's memory table traces the real architecture on the meta device. On the tiny one the same
    counter gives the same peak on meta and on real CPU tensors (float32), with and without checkpointing, and
    checkpointing lowers it."""
    from reconx_core.training.memory import meta_training_model, trace_training_step
    from reconx_core.training.stages import freeze_for_stage
    from reconx_core.video import build_video_model, tiny_config

    meta = meta_training_model(tiny_config(), dtype=torch.float32)
    real = build_video_model(tiny_config(), structure_encoder=True, seed=0)
    peaks = {}
    for model in (meta, real):
        freeze_for_stage(model, 2)
        peaks[id(model)] = [trace_training_step(model, 4, 64, 64, 256, ck, dtype=torch.float32) for ck in (0, 1)]
    assert peaks[id(meta)] == peaks[id(real)]
    assert peaks[id(meta)][1] < 0.5 * peaks[id(meta)][0]
