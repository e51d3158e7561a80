"""Checkpoint layout (meta build vs the official manifest), loading round trips, structure-branch files, CLIP parts."""

import gzip

import pytest
import torch
from safetensors.torch import save_file

from reconx_core.errors import CheckpointError, ResourceError
from reconx_core.video.checkpoint import (export_official_state_dict, internal_to_official, is_unused_key,
                                          load_structure_branch, load_video_model, official_to_internal,
                                          save_structure_branch)
from reconx_core.video.model import build_video_model, tiny_config
from reconx_core.video.tokenizer import EOT, SOT, ClipTokenizer
from tests.fixtures import load_json

EXPECTED_UNUSED = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "scale_arr",
    "cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale",
    "embedder.model.positional_embedding", "embedder.model.text_projection", "embedder.model.logit_scale",
    "embedder.model.token_embedding.weight", "embedder.model.ln_final.weight", "embedder.model.ln_final.bias",
    "embedder.model.visual.proj", "embedder.model.visual.ln_post.weight", "embedder.model.visual.ln_post.bias"}


def test_meta_build_matches_the_official_manifest_exactly():
    manifest = load_json("dynamicrafter512_interp_manifest.json")
    model = build_video_model(device="meta")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    mapped, unused = {}, set()
    for key, (shape, _dtype) in manifest["state_dict"].items():
        name = official_to_internal(key)
        if name is None:
            unused.add(key)
            continue
        assert name in ours, key
        assert name not in mapped, f"{key} and {mapped.get(name)} map to the same tensor"
        mapped[name] = key
        if ".attn_1." in key and len(shape) == 4:  # LDM VAE attention: 1x1 conv vs Linear
            assert shape == ours[name] + [1, 1], key
        else:
            assert shape == ours[name], key
        assert internal_to_official(name) == key
    assert unused == EXPECTED_UNUSED
    extra = set(ours) - set(mapped)
    # the only tensors the official checkpoint lacks are the 16 spatial cross-attentions' ReconX branches
    assert all("_struct" in k for k in extra) and len(extra) == 16 * 3
    for prefix, stats in manifest["per_prefix_state_dict"].items():
        n = sum(torch.Size(s).numel() for k, (s, _) in manifest["state_dict"].items()
                if k.startswith(prefix) and not is_unused_key(k))
        ours_n = sum(torch.Size(ours[official_to_internal(k)]).numel() for k in manifest["state_dict"]
                     if k.startswith(prefix) and not is_unused_key(k))
        assert n == ours_n
        assert stats["num_keys"] == sum(1 for k in manifest["state_dict"] if k.startswith(prefix))
    unet_params = sum(p.numel() for k, p in model.unet.named_parameters() if "_struct" not in k)
    assert unet_params == manifest["per_prefix_parameters"]["model.diffusion_model."]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    src = build_video_model(tiny_config(), seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    torch.save({"state_dict": export_official_state_dict(src), "epoch": 3, "global_step": 10}, path)
    return src, path


@torch.no_grad()
def _outputs(model, unet_only=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77 + 64, 32, generator=g)
    img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    unet = model.unet(x, torch.tensor([500]), ctx, fs=torch.tensor([5]))
    if unet_only:
        return {"unet": unet}
    return {"unet": unet, "text": model.encode_text([""]), "image": model.image_tokens(img),
            "vae": model.vae.decode(torch.randn(1, 4, 4, 4, generator=g).to(model.dtype)).sample}


def test_ckpt_round_trip_loads_the_same_model(tiny_pair):
    src, path = tiny_pair
    loaded = load_video_model(path, "cpu", config=tiny_config())
    a, b = _outputs(src), _outputs(loaded)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert all(float(p.detach()) == 0 for n, p in loaded.unet.named_parameters() if n.endswith("alpha_struct"))


def test_bf16_safetensors_variant_loads(tiny_pair, tmp_path):
    src, path = tiny_pair
    state = {k: v.to(torch.bfloat16) for k, v in torch.load(path, weights_only=True)["state_dict"].items()}
    save_file(state, str(tmp_path / "dc_bf16.safetensors"))
    loaded = load_video_model(tmp_path / "dc_bf16.safetensors", "cpu", dtype=torch.bfloat16, config=tiny_config())
    assert loaded.dtype == torch.bfloat16
    w_src = src.unet.input_blocks[1][0].in_layers[2].weight.to(torch.bfloat16)
    assert torch.equal(loaded.unet.input_blocks[1][0].in_layers[2].weight, w_src)
    out = _outputs(loaded, unet_only=True)
    ref = _outputs(src, unet_only=True)
    assert (out["unet"].float() - ref["unet"]).abs().max() < 0.1 * ref["unet"].abs().max()


class _NotATensor:
    pass


def test_unsafe_or_incomplete_checkpoints_are_refused(tiny_pair, tmp_path):
    src, path = tiny_pair
    state = torch.load(path, weights_only=True)["state_dict"]
    torch.save({"state_dict": state, "callback": _NotATensor()}, tmp_path / "pickled.ckpt")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_video_model(tmp_path / "pickled.ckpt", config=tiny_config())
    partial = {k: v for k, v in state.items() if not k.startswith("first_stage_model.")}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match="vae"):
        load_video_model(tmp_path / "partial.safetensors", config=tiny_config())
    bad_schedule = dict(state, alphas_cumprod=state["alphas_cumprod"] * 0.5)
    save_file(bad_schedule, str(tmp_path / "schedule.safetensors"))
    with pytest.raises(CheckpointError, match="schedule"):
        load_video_model(tmp_path / "schedule.safetensors", config=tiny_config())
    with pytest.raises(CheckpointError, match="not found"):
        load_video_model(tmp_path / "missing.ckpt")


def test_structure_branch_file_round_trip(tiny_pair, tmp_path):
    src, path = tiny_pair
    model = build_video_model(tiny_config(), structure_encoder=True, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if "_struct" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 if p.dim() else torch.tensor(0.3))
    save_structure_branch(model, tmp_path / "branch.safetensors")
    loaded = load_video_model(path, config=tiny_config(), structure_path=tmp_path / "branch.safetensors")
    params = dict(loaded.unet.named_parameters())
    for name, p in model.unet.named_parameters():
        if "_struct" in name:
            assert torch.equal(params[name], p), name
    pts = torch.randn(1, 50, 3, generator=g)
    with torch.no_grad():
        assert torch.equal(loaded.structure_encoder(pts), model.structure_encoder(pts))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not a ReconX structure-branch"):
        load_structure_branch(loaded, tmp_path / "other.safetensors")


@torch.no_grad()
def test_clip_towers_behave_like_openclip():
    model = build_video_model(tiny_config(), seed=0)
    text = model.text_encoder
    tokens = torch.randint(0, 49408, (1, 77), generator=torch.Generator().manual_seed(0))
    out = text(tokens)
    assert out.shape == (1, 77, 32)
    changed = tokens.clone()
    changed[0, 40] = (changed[0, 40] + 1) % 49408
    out2 = text(changed)
    assert torch.equal(out[:, :40], out2[:, :40])  # causal mask: earlier positions cannot see later tokens
    assert not torch.equal(out[:, 40:], out2[:, 40:])
    text.transformer.resblocks[-1].mlp.c_fc.weight.mul_(3.0)
    assert torch.equal(text(tokens), out)  # penultimate layer: the last block is never run
    image = model.image_encoder
    assert image(torch.zeros(2, 3, 40, 60)).shape == (2, 257, 48)
    pre = image.preprocess(torch.ones(1, 3, 50, 70))
    expected = (1 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor([0.26862954, 0.26130258, 0.27577711])
    assert pre.shape == (1, 3, 224, 224)
    assert torch.allclose(pre[0, :, 100, 100], expected, atol=1e-5)


def test_tokenizer(tmp_path):
    """Checked once by hand against open_clip 2.22.0's tokenizer with the real vocab (identical ids for several
    prompts, incl. accents and truncation); the vocab is not shipped, so this test uses a miniature one."""
    empty = ClipTokenizer(vocab_path=tmp_path / "absent.txt.gz")([""])
    assert empty[0, :3].tolist() == [SOT, EOT, 0] and empty.shape == (1, 77)
    with pytest.raises(ResourceError, match="bpe_simple_vocab"):
        ClipTokenizer(vocab_path=tmp_path / "absent.txt.gz")(["a cat"])
    # a miniature merges file: header line, then merges in rank order
    merges = ["#version", "h e", "l l", "he ll", "hell o</w>", "c a", "ca t</w>"]
    with gzip.open(tmp_path / "mini.txt.gz", "wt") as f:
        f.write("\n".join(merges) + "\n")
    tok = ClipTokenizer(vocab_path=tmp_path / "mini.txt.gz")
    ids = tok(["Hello  CAT!", "x " * 100])
    base = 512  # 256 byte symbols + 256 end-of-word symbols come first, printable ASCII from "!" (id 0) on
    word_end = lambda c: 256 + ord(c) - ord("!")  # noqa: E731
    assert ids[0, :5].tolist() == [SOT, base + 3, base + 5, word_end("!"), EOT]  # hello</w>, cat</w>, !</w>
    assert ids[1, 76] == EOT and ids[1, 0] == SOT and (ids[1, 1:76] == word_end("x")).all()


def test_damaged_safetensors_give_checkpoint_errors(tmp_path):
    from reconx_core.errors import CheckpointError
    from reconx_core.video import build_video_model, load_structure_branch, load_video_model, tiny_config

    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_video_model(bad)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_structure_branch(build_video_model(tiny_config()), bad)
