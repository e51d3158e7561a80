"""DynamiCrafter as ComfyUI users have it: the fp16 pruned file, clip_vision files, OpenCLIP text towers.

Manifests (tests/data): the real files' key sets, derived in each manifest's "derivation" and checked against the
published byte sizes here. Tiny files in each layout are written from one tiny model through the inverse key maps
and loaded back; the transformers layout is also checked against transformers' own CLIPVisionModel.
"""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from reconx_core.errors import CheckpointError, ResourceError
from reconx_core.video.checkpoint import export_official_state_dict, load_video_model, official_to_internal
from reconx_core.video.comfy_layouts import (EMPTY_PROMPT_FILE, internal_to_openclip, internal_to_transformers_vision,
                                             load_empty_prompt, openclip_key, tower_state, transformers_vision_key,
                                             transformers_vision_to_internal)
from reconx_core.video.model import build_video_model, tiny_config
from tests.fixtures import REPO

DATA = REPO / "tests" / "data"
_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "I64": 8}


def _manifest(name):
    return json.loads((DATA / name).read_text())


def _safetensors_size(state, metadata):
    """Bytes of a safetensors file holding `state` {key: [shape, dtype]}: 8-byte length, the JSON header as
    safetensors writes it (compact, tensors sorted by dtype size then name, padded to 8 bytes), then the data."""
    order = sorted(state, key=lambda k: (-_BYTES[state[k][1]], k))
    header, offset = {"__metadata__": metadata}, 0
    for key in order:
        shape, dtype = state[key]
        n = math.prod(shape) * _BYTES[dtype]
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    length = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + length + (-length) % 8 + offset


@pytest.mark.parametrize("name", ["dynamicrafter512_interp_fp16_pruned_manifest.json",
                                  "clip_vision_vit_h14_transformers_manifest.json", "openclip_vit_h14_manifest.json"])
def test_manifests_reproduce_the_published_file_sizes(name):
    """A wrong key, shape or dtype anywhere changes the header or the data size by at least a byte."""
    manifest = _manifest(name)
    assert len(manifest["state_dict"]) == manifest["num_keys"]
    assert _safetensors_size(manifest["state_dict"], manifest["safetensors_metadata"]) == manifest["size_bytes"]


@pytest.fixture(scope="module")
def meta_model():
    return build_video_model(device="meta")


def test_pruned_file_maps_onto_everything_but_the_clip_towers(meta_model):
    ours = {k: list(v.shape) for k, v in meta_model.state_dict().items()}
    mapped = {}
    for key, (shape, dtype) in _manifest("dynamicrafter512_interp_fp16_pruned_manifest.json")["state_dict"].items():
        assert dtype == "F16"
        name = official_to_internal(key)
        if name is None:
            assert "." not in key  # the 13 schedule buffers
            continue
        assert name not in mapped
        mapped[name] = key
        assert shape == ours[name] or (shape == ours[name] + [1, 1] and ".attn_1." in key), key
    rest = set(ours) - set(mapped)
    assert {k.split(".")[0] for k in rest if "_struct" not in k} == {"text_encoder", "image_encoder"}


def test_clip_vision_file_maps_onto_the_image_tower(meta_model):
    image = {k: list(v.shape) for k, v in meta_model.image_encoder.visual.state_dict().items()}
    fused, unused = {}, set()
    for key, (shape, _) in _manifest("clip_vision_vit_h14_transformers_manifest.json")["state_dict"].items():
        mapped = transformers_vision_key(key)
        if mapped is None:
            unused.add(key)
            continue
        name, part = mapped
        if part is None:
            assert shape == image[name], key
            fused[name] = shape
        else:
            fused.setdefault(name, [0, *shape[1:]])
            fused[name][0] += shape[0]
    assert unused == {"vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias",
                      "visual_projection.weight", "vision_model.embeddings.position_ids"}
    assert fused == image  # every tensor of the tower, q/k/v fused to in_proj shapes


def test_openclip_file_maps_onto_both_towers(meta_model):
    ours = {k: list(v.shape) for k, v in meta_model.state_dict().items()
            if k.startswith(("text_encoder.", "image_encoder."))}
    mapped, unused = {}, set()
    for key, (shape, _) in _manifest("openclip_vit_h14_manifest.json")["state_dict"].items():
        name = openclip_key(key)
        if name is None:
            unused.add(key)
            continue
        assert shape == ours[name], key
        mapped[name] = key
    assert set(mapped) == set(ours)
    assert unused == {"visual.proj", "visual.ln_post.weight", "visual.ln_post.bias", "text_projection", "logit_scale"}


@pytest.mark.numeric
@torch.no_grad()
def test_transformers_layout_gives_the_tokens_of_transformers_clip_vision():
    """Same weights in transformers' CLIPVisionModelWithProjection and in our ImageTower (through the key map):
    DynamiCrafter's tokens are transformers' last_hidden_state (all 257 tokens, before post_layernorm).

    Tolerance: 8 float32 eps x sqrt(width) relative to the output's largest magnitude (6.6e-6 relative): the two
    differ only in summation order (fused vs separate q/k/v, attention kernels). Measured 2.5e-7 relative, the
    same under the AVX2/MKL-compatible numeric path.
    """
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(hidden_size=48, intermediate_size=192, num_hidden_layers=2,
                                           num_attention_heads=4, patch_size=14, image_size=224, hidden_act="gelu",
                                           layer_norm_eps=1e-5, projection_dim=32)
    torch.manual_seed(0)
    reference = transformers.CLIPVisionModelWithProjection(config).eval()
    g = torch.Generator().manual_seed(1)
    for p in reference.parameters():  # break the constant inits (LayerNorm 1/0) so every tensor matters
        p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model = build_video_model(tiny_config(), seed=0)
    tower = model.image_encoder
    state = transformers_vision_to_internal(reference.state_dict())
    tower.load_state_dict({k[len("image_encoder."):]: v for k, v in state.items()}, strict=True)
    images = torch.rand(2, 3, 96, 128, generator=g) * 2 - 1
    ours = tower(images)
    theirs = reference(pixel_values=tower.preprocess(images)).last_hidden_state
    assert ours.shape == theirs.shape == (2, 257, 48)
    tolerance = 8 * torch.finfo(torch.float32).eps * 48 ** 0.5 * theirs.abs().max()
    assert (ours - theirs).abs().max() <= tolerance
    # and back: the inverse map gives transformers' own tensors
    back = internal_to_transformers_vision(state)
    for key, value in reference.state_dict().items():
        if key.startswith("vision_model.") and "post_layernorm" not in key:
            assert torch.equal(back[key], value), key


# ----------------------------------------------------------------------------------- tiny files in each layout
@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """One tiny model written as: the ComfyUI pruned fp16 file, a transformers clip_vision file (fp32, with the
    projection and position_ids as the real file has), an OpenCLIP whole-model file and an OpenCLIP text file."""
    root = tmp_path_factory.mktemp("comfy_files")
    src = build_video_model(tiny_config(), seed=0)
    official = export_official_state_dict(src)
    pruned = {k: v.half() for k, v in official.items() if not k.startswith(("cond_stage_model.", "embedder."))}
    save_file(pruned, str(root / "dynamicrafter_512_interp_fp16_pruned.safetensors"), metadata={"format": "pt"})
    visual = {k: v for k, v in src.state_dict().items() if k.startswith("image_encoder.visual.")}
    clip_vision = internal_to_transformers_vision(visual, with_projection=32)
    clip_vision["vision_model.embeddings.position_ids"] = torch.arange(257)[None]
    save_file(clip_vision, str(root / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"), metadata={"format": "pt"})
    towers = {k: v for k, v in src.state_dict().items() if k.startswith(("image_encoder.", "text_encoder."))}
    openclip = internal_to_openclip(towers)
    openclip.update({"visual.proj": torch.randn(48, 32), "visual.ln_post.weight": torch.ones(48),
                     "visual.ln_post.bias": torch.zeros(48), "text_projection": torch.randn(32, 32),
                     "logit_scale": torch.tensor(4.6)})
    save_file(openclip, str(root / "open_clip_pytorch_model.safetensors"))
    text_only = {k: v for k, v in openclip.items() if not k.startswith("visual.")}
    torch.save(text_only, root / "open_clip_text.bin")
    return src, root


@torch.no_grad()
def _outputs(model, prompt=""):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77 + 64, 32, generator=g)
    img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    return {"unet": model.unet(x, torch.tensor([500]), ctx, fs=torch.tensor([5])), "text": model.encode_text([prompt]),
            "image": model.image_tokens(img),
            "vae": model.vae.decode(torch.randn(1, 4, 4, 4, generator=g)).sample}


def _rounded_to_half(model):
    """The source model with the UNet, VAE and Resampler rounded through float16, as the pruned file stores them."""
    ref = build_video_model(tiny_config(), seed=0)
    ref.load_state_dict(model.state_dict())
    for net in (ref.unet, ref.vae, ref.image_proj):
        for p in net.parameters():
            p.data = p.data.half().float()
    return ref


def test_pruned_file_with_clip_vision_and_text_files_loads_the_same_model(tiny_files, tmp_path):
    src, root = tiny_files
    loaded = load_video_model(root / "dynamicrafter_512_interp_fp16_pruned.safetensors", config=tiny_config(),
                              clip_vision=root / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
                              text_encoder=root / "open_clip_text.bin")
    assert loaded.dtype == torch.float32
    ref, got = _outputs(_rounded_to_half(src)), _outputs(loaded)
    for name in ref:  # identical weights (fp16 values, the CLIP towers exactly) -> identical outputs
        assert torch.equal(ref[name], got[name]), name


def test_openclip_file_gives_both_towers(tiny_files):
    src, root = tiny_files
    loaded = load_video_model(root / "dynamicrafter_512_interp_fp16_pruned.safetensors", config=tiny_config(),
                              clip_vision=root / "open_clip_pytorch_model.safetensors")
    assert loaded.text_encoder is not None
    ref, got = _outputs(_rounded_to_half(src)), _outputs(loaded)
    assert torch.equal(ref["text"], got["text"]) and torch.equal(ref["image"], got["image"])


def test_comfyui_clip_vision_state_dict_is_accepted_and_left_untouched(tiny_files):
    """A loaded CLIP_VISION's state dict (transformers names, as comfy.clip_model has them) in fp16."""
    src, root = tiny_files
    visual = {k: v for k, v in src.state_dict().items() if k.startswith("image_encoder.visual.")}
    comfy_sd = {k: v.half() for k, v in internal_to_transformers_vision(visual, with_projection=32).items()}
    before = {k: v.clone() for k, v in comfy_sd.items()}
    loaded = load_video_model(root / "dynamicrafter_512_interp_fp16_pruned.safetensors", config=tiny_config(),
                              clip_vision=comfy_sd, dtype=torch.float32)
    assert all(torch.equal(before[k], comfy_sd[k]) and comfy_sd[k].dtype == torch.float16 for k in before)
    ref = _rounded_to_half(src)  # the pruned file's Resampler is float16 too
    for p in ref.image_encoder.parameters():
        p.data = p.data.half().float()
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert torch.equal(ref.image_tokens(img), loaded.image_tokens(img))


def test_fp16_pruned_file_loads_to_the_requested_dtype(tiny_files):
    src, root = tiny_files
    loaded = load_video_model(root / "dynamicrafter_512_interp_fp16_pruned.safetensors", config=tiny_config(),
                              clip_vision=root / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
                              dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and loaded.image_encoder.visual.conv1.weight.dtype == torch.bfloat16


def test_missing_or_wrong_towers_are_named(tiny_files, tmp_path):
    src, root = tiny_files
    pruned = root / "dynamicrafter_512_interp_fp16_pruned.safetensors"
    with pytest.raises(CheckpointError, match="no CLIP image encoder.*clip_vision"):
        load_video_model(pruned, config=tiny_config())
    wrong = build_video_model(dict(tiny_config(), image=dict(tiny_config()["image"], width=64)), seed=1)
    visual = {k: v for k, v in wrong.state_dict().items() if k.startswith("image_encoder.visual.")}
    save_file(internal_to_transformers_vision(visual), str(tmp_path / "clip_vit_other.safetensors"))
    with pytest.raises(CheckpointError, match="not the CLIP ViT-H/14 image tower"):
        load_video_model(pruned, config=tiny_config(), clip_vision=tmp_path / "clip_vit_other.safetensors")
    with pytest.raises(CheckpointError, match="holds no CLIP text tower"):
        load_video_model(pruned, config=tiny_config(), clip_vision=root / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
                         text_encoder=root / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")
    with pytest.raises(CheckpointError, match="transformers CLIPTextModel layout"):
        tower_state({"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(1)}, "text")


def test_without_text_encoder_empty_prompts_use_the_stored_features(tiny_files, tmp_path):
    """No text tower: empty prompts only, from the features saved once when a text tower was loaded."""
    src, root = tiny_files
    pruned = root / "dynamicrafter_512_interp_fp16_pruned.safetensors"
    clip_vision = root / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
    cache = tmp_path / EMPTY_PROMPT_FILE
    bare = load_video_model(pruned, config=tiny_config(), clip_vision=clip_vision, empty_prompt_cache=cache)
    assert bare.text_encoder is None and not cache.exists()
    with pytest.raises(ResourceError, match="pick an OpenCLIP ViT-H-14 text encoder once"):
        bare.encode_text([""])
    load_video_model(pruned, config=tiny_config(), clip_vision=clip_vision, text_encoder=root / "open_clip_text.bin",
                     empty_prompt_cache=cache)
    assert cache.is_file()
    bare = load_video_model(pruned, config=tiny_config(), clip_vision=clip_vision, empty_prompt_cache=cache)
    reference = src.encode_text([""])
    stored = load_empty_prompt(cache, reference.shape[-1])
    # Both empty prompts are the stored (1, 77, D) features exactly: nothing is recomputed.
    assert torch.equal(bare.encode_text(["", "  "]), stored.expand(2, -1, -1))
    # The stored features are the text tower's output for "": the loader ran the same float32 weights (an exact
    # copy through open_clip's layout) on the same batch of one in this process, so the same kernels in the same
    # order: bitwise by construction. (Comparing with a batch of two is not: the GEMM shapes change the float32
    # summation order on some SIMD paths, e.g. AVX2.)
    assert torch.equal(stored, reference)
    with pytest.raises(ResourceError, match="only an empty prompt works"):
        bare.encode_text(["a cat"])
    # a stored file of another width (another model size) is not used
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    other = load_video_model(pruned, config=tiny_config(), clip_vision=clip_vision,
                             empty_prompt_cache=tmp_path / "other.safetensors")
    assert other.empty_prompt is None


# ------------------------------------------------------------------------------------------------ the node
class _ComfyClipVision:
    """Stands in for comfy.clip_vision.ClipVisionModel: get_sd() is its model's state dict (transformers names)."""

    def __init__(self, state):
        self.state = state

    def get_sd(self):
        return self.state


def test_video_loader_node_takes_comfyui_files_and_objects(tiny_files, tmp_path, monkeypatch):
    from nodes import comfy_bridge as bridge
    from nodes.loader_nodes import NO_TEXT, ReconXVideoModelLoader
    from nodes.video_nodes import ReconXInterpolate
    from reconx_core.testing import TINY_VIDEO, write_tiny_models
    from reconx_core.video.checkpoint import CONFIG_METADATA_KEY
    from tests.scene_factory import plane_scene

    src, root = tiny_files
    models = tmp_path / "models"
    write_tiny_models(models)  # the full tiny checkpoint (both towers) in models/reconx
    (models / "clip_vision").mkdir()
    pruned = {k: v.half() for k, v in export_official_state_dict(src).items()
              if not k.startswith(("cond_stage_model.", "embedder."))}
    # the real pruned file has no config; the tiny one carries its (non-official) size in the metadata
    save_file(pruned, str(models / "reconx" / "tiny_pruned_fp16.safetensors"),
              metadata={"format": "pt", CONFIG_METADATA_KEY: json.dumps(tiny_config())})
    (models / "clip_vision" / "vit_h.safetensors").write_bytes(
        (root / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors").read_bytes())
    monkeypatch.setattr(bridge, "_FALLBACK_MODELS_DIR", models)
    loader, interpolate, scene = ReconXVideoModelLoader(), ReconXInterpolate(), plane_scene(2, 48, 64)

    (model,) = loader.load("tiny_pruned_fp16.safetensors", "none", "fp32", "cpu", True,
                           clip_vision_name="vit_h.safetensors")
    assert model.module.text_encoder is None
    with pytest.raises(ResourceError, match="pick an OpenCLIP ViT-H-14 text encoder once"):
        interpolate.interpolate(model, scene, "", 2, 7.5, 1.0, 4, 5, 0)
    # a model with a text tower saves the empty-prompt features beside the models; "none" then drops the tower
    (full,) = loader.load(TINY_VIDEO, "none", "fp32", "cpu", True, text_encoder_name=NO_TEXT)
    assert full.module.text_encoder is None and (models / "reconx" / EMPTY_PROMPT_FILE).is_file()
    (model,) = loader.load("tiny_pruned_fp16.safetensors", "none", "fp32", "cpu", True,
                           clip_vision=_ComfyClipVision(internal_to_transformers_vision(
                               {k: v for k, v in src.state_dict().items() if k.startswith("image_encoder.visual.")},
                               with_projection=32)))
    frames, _ = interpolate.interpolate(model, scene, "", 2, 7.5, 1.0, 4, 5, 0)
    assert frames.shape == (4, 64, 64, 3) and torch.isfinite(frames).all()  # 2 views, one segment of 4
    with pytest.raises(ResourceError, match="only an empty prompt works"):
        interpolate.interpolate(model, scene, "a street", 2, 7.5, 1.0, 4, 5, 0)
