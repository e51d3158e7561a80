"""The model files users already have: Hugging Face DUSt3R folders, MASt3R, damaged vs unsafe files, wrong models.

Data (tests/data, made with the official naver/mast3r + dust3r + croco code and huggingface_hub 0.23.4's
PyTorchModelHubMixin; the generator is described in mast3r_tiny.json):
- dust3r_hf_config_*.json: config.json exactly as the mixin writes it (json.dumps(sort_keys=True, indent=2), with
  `Infinity`). For the public models they come from the constructor call `load_model` makes; their byte sizes
  (450 for 512_dpt, 453 for 512_linear) equal those of the files published on huggingface.co/naver.
- mast3r_manifest_<NAME>.json: the public MASt3R's state-dict keys and shapes, built on the meta device.
- mast3r_tiny*.{safetensors,json}: a tiny random-weight AsymmetricMASt3R and its official outputs on the shared
  dust3r_tiny_img0/1.png pair (both pair orders, one symmetric batch).
"""

import argparse
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file, save_model

from reconx_core.dust3r import infer_pairs, load_dust3r, parse_constructor_call, prepare_images, read_config_json
from reconx_core.errors import CheckpointError
from tests.bad_files import RunsACommand
from tests.fixtures import fixture_path, load_json, load_tensors

pytestmark = pytest.mark.numeric  # float32 parity: CI runs it again on a second numeric path (make test-numeric)

DATA = Path(__file__).resolve().parent / "data"
MAST3R_NAME = "MASt3R_ViTLarge_BaseDecoder_512_catmlpdpt_metric"
PICK_INSTEAD = "DUSt3R_ViTLarge_BaseDecoder_512_dpt.pth"

# Tolerance for parity with the official outputs, relative to each output's largest magnitude.
# A float32 result differs between CPUs / instruction sets by rounding only: the deepest chain here is ~30
# sequential layers whose reductions have at most 144 terms (3x3 convs over 16 channels), i.e. about
# sqrt(144) * 2**-24 ~ 7e-7 relative per layer and ~sqrt(30) * 7e-7 ~ 4e-6 over the chain (exp() and the
# descriptor normalisation keep relative errors relative). Measured: bitwise equal on this machine, at most
# 7.1e-7 relative under MKL_CBWR=COMPATIBLE / AVX2 / ATEN_CPU_CAPABILITY=avx2 or =default. 2e-5 leaves ~5x over the
# estimate; a wrong mode, channel split or head count moves the outputs by more than 1e-2 relative.
REL_TOL = 2e-5


def _close(ours, ref, rel=REL_TOL):
    return float((ours - ref).abs().max()) <= rel * float(ref.abs().max())


def _symmetric_batch(io):
    """The fixtures' batch: element 0 is (img1, img0), element 1 is (img0, img1)."""
    return torch.cat([io["img1"], io["img0"]]), torch.cat([io["img0"], io["img1"]])


def _forward(model, io):
    img1, img2 = _symmetric_batch(io)
    with torch.no_grad():
        return model(img1, img2)


# ============================================================================ 1. DUSt3R as Hugging Face publishes it
def test_published_config_json_parses_with_infinity():
    cfg = read_config_json(DATA / "dust3r_hf_config_DUSt3R_ViTLarge_BaseDecoder_512_dpt.json")
    assert cfg["depth_mode"] == ["exp", float("-inf"), float("inf")] and cfg["conf_mode"] == ["exp", 1, float("inf")]
    assert cfg["head_type"] == "dpt" and cfg["img_size"] == [512, 512] and cfg["landscape_only"] is False
    # the published files are 450 and 453 bytes: the same text the mixin writes from load_model's call
    assert (DATA / "dust3r_hf_config_DUSt3R_ViTLarge_BaseDecoder_512_dpt.json").stat().st_size == 450
    assert (DATA / "dust3r_hf_config_DUSt3R_ViTLarge_BaseDecoder_512_linear.json").stat().st_size == 453


def _hf_folder(tmp_path, name):
    """A folder as PyTorchModelHubMixin.save_pretrained writes it for the shared tiny fixture `name`.

    model.safetensors comes from safetensors' save_model, the function the mixin calls: of each tied tensor it keeps
    the alphabetically first name, so the DPT's `scratch.layer_rn.N` aliases are dropped (as in naver's files).
    """
    folder = tmp_path / f"{name}_hf"
    folder.mkdir()
    shutil.copy(DATA / f"dust3r_hf_config_{name}.json", folder / "config.json")
    save_model(load_dust3r(str(fixture_path(f"{name}.safetensors"))), str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("name", ["tiny_dpt", "tiny_linear"])
def test_hf_folder_loads_each_way_bitwise_equal_to_the_fixture_file(tmp_path, name):
    folder = _hf_folder(tmp_path, name)
    keys = set(load_file(str(folder / "model.safetensors")))
    fixture_keys = set(load_file(str(fixture_path(f"{name}.safetensors"))))
    dropped = {f"downstream_head{h}.dpt.scratch.layer_rn.{n}.weight" for h in (1, 2) for n in range(4)}
    assert keys == (fixture_keys - dropped if name == "tiny_dpt" else fixture_keys)
    io = load_tensors(f"{name}_io.safetensors")
    reference = _forward(load_dust3r(str(fixture_path(f"{name}.safetensors"))), io)
    for way in (folder, folder / "config.json", folder / "model.safetensors", str(folder)):
        model = load_dust3r(way)
        assert model.config.enc_num_heads == 4 and model.config.dec_num_heads == 4
        assert model.image_size == 64  # img_size (64, 64) in the config, not the 512 default
        pred1, pred2 = _forward(model, io)
        # Same float32 tensors (safetensors stores the bytes; a dropped alias is the same tensor as the name kept),
        # the same architecture read from them and the same code: the same operations in the same order on this
        # machine, hence bitwise equal outputs.
        for ours, ref in ((pred1, reference[0]), (pred2, reference[1])):
            assert all(torch.equal(ours[k], ref[k]) for k in ref)
        # and parity with the official outputs (fixture made with torch 2.13; the official code under this torch
        # differs from them by up to 1.1e-5 on values up to ~4.5)
        assert _close(pred1["pts3d"], io["pred1_pts3d"]) and _close(pred2["conf"], io["pred2_conf"])
        assert _close(pred2["pts3d_in_other_view"], io["pred2_pts3d_in_other_view"])
    meta = load_dust3r(folder, device="meta")
    assert meta.patch_embed.proj.weight.is_meta and meta.config.head_type == name.split("_")[1]


@pytest.mark.parametrize("name", ["224_linear", "512_linear", "512_dpt"])
def test_public_hf_layouts_build_on_meta(name):
    """naver's model.safetensors layout (DPT aliases dropped by save_model) with its config.json."""
    man = load_json(f"dust3r_manifest_DUSt3R_ViTLarge_BaseDecoder_{name}.json")
    sd = {k: torch.empty(shape, dtype=getattr(torch, dt), device="meta") for k, (shape, dt) in man["state_dict"].items()
          if ".scratch.layer_rn." not in k}
    cfg = read_config_json(DATA / f"dust3r_hf_config_DUSt3R_ViTLarge_BaseDecoder_{name}.json")
    model = load_dust3r(sd, device="meta", config=cfg)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == \
        {k: shape for k, (shape, _) in man["state_dict"].items()}
    assert model.image_size == int(name[:3]) and model.config.enc_num_heads == 16 and model.config.dec_num_heads == 12
    assert model.config.conf_mode == ("exp", 1.0, float("inf"))


def test_config_that_contradicts_the_tensors_is_refused(tmp_path):
    folder = _hf_folder(tmp_path, "tiny_dpt")
    cfg = json.loads((folder / "config.json").read_text())
    for change, words in (({"head_type": "linear"}, "head_type='linear' (tensors: 'dpt'"),
                          ({"enc_depth": 24, "dec_embed_dim": 768}, "enc_depth=24 (tensors: 2); dec_embed_dim=768"),
                          ({"output_mode": "pts3d+desc24"}, "output_mode='pts3d+desc24'"),
                          ({"enc_num_heads": 5}, "enc_num_heads=5 does not fit width 96")):
        (folder / "config.json").write_text(json.dumps(dict(cfg, **change)))
        with pytest.raises(CheckpointError) as err:
            load_dust3r(folder)
        msg = str(err.value)
        assert words in msg and "tiny_dpt_hf" in msg, msg
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable JSON"):
        load_dust3r(folder / "model.safetensors")


def test_config_json_beside_other_file_names_is_not_used(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"head_type": "linear", "enc_depth": 99}))
    shutil.copy(fixture_path("tiny_dpt.safetensors"), tmp_path / "my_dust3r.safetensors")
    assert load_dust3r(tmp_path / "my_dust3r.safetensors").config.head_type == "dpt"


def test_folder_without_weights_says_what_it_needs(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_dust3r(tmp_path)
    with pytest.raises(CheckpointError, match="no model.safetensors lies beside it"):
        load_dust3r(tmp_path / "config.json")


def test_constructor_string_is_parsed_as_literals_only(tmp_path):
    marker = tmp_path / "ran"
    text = (f"AsymmetricMASt3R(depth_mode=('exp', -inf, inf), two_confs=True, img_size=(512, 512), "
            f"output_mode='pts3d+desc24', evil=__import__('os').system('touch {marker}'))")
    kw = parse_constructor_call(text)
    assert kw["depth_mode"] == ["exp", float("-inf"), float("inf")] and kw["two_confs"] is True
    assert kw["img_size"] == [512, 512] and kw["__class__"] == "AsymmetricMASt3R"
    assert kw["evil"].startswith("__import__") and not marker.exists()  # kept as text, never run
    assert parse_constructor_call("not a call(") == {}


# ====================================================================================================== 2. MASt3R
@pytest.fixture(scope="module")
def mast3r_io():
    return {**load_file(str(DATA / "mast3r_tiny_io_pred1.safetensors")),
            **load_file(str(DATA / "mast3r_tiny_io_pred2.safetensors"))}


def _mast3r_ways(tmp_path):
    """The tiny MASt3R in the three forms users have: official .pth (args string), HF folder, bare + config."""
    info = json.loads((DATA / "mast3r_tiny.json").read_text())
    sd = load_file(str(DATA / "mast3r_tiny.safetensors"))
    pth = tmp_path / "MASt3R_tiny.pth"
    torch.save({"model": sd, "args": argparse.Namespace(model=info["checkpoint_args_string"])}, pth)
    folder = tmp_path / "mast3r_hf"
    folder.mkdir()
    shutil.copy(DATA / "mast3r_hf_config_tiny.json", folder / "config.json")
    cfg = json.loads((folder / "config.json").read_text())
    save_model(load_dust3r(sd, config=cfg), str(folder / "model.safetensors"))
    return {"pth_with_args": (pth, None), "hf_folder": (folder, None),
            "safetensors_with_config": (DATA / "mast3r_tiny.safetensors", cfg)}


MAST3R_OUT = [("pred1", "pts3d", "pred1_pts3d"), ("pred1", "conf", "pred1_conf"), ("pred1", "desc", "pred1_desc"),
              ("pred1", "desc_conf", "pred1_desc_conf"),
              ("pred2", "pts3d_in_other_view", "pred2_pts3d_in_other_view"), ("pred2", "conf", "pred2_conf"),
              ("pred2", "desc", "pred2_desc"), ("pred2", "desc_conf", "pred2_desc_conf")]


def test_mast3r_tiny_parity_with_the_official_outputs(tmp_path, mast3r_io):
    errors = {}
    for way, (path, cfg) in _mast3r_ways(tmp_path).items():
        model = load_dust3r(path, config=cfg)
        c = model.config
        assert model.is_mast3r and (c.desc_dim, c.two_confs, c.dec_num_heads) == (24, True, 2), way
        assert c.desc_conf_mode == ("exp", 0.0, float("inf")) and c.conf_mode == ("exp", 1.0, float("inf"))
        pred1, pred2 = _forward(model, mast3r_io)
        preds = {"pred1": pred1, "pred2": pred2}
        assert set(pred1) == {"pts3d", "conf", "desc", "desc_conf"}
        assert set(pred2) == {"pts3d_in_other_view", "conf", "desc", "desc_conf"}
        for p, k, ref in MAST3R_OUT:
            errors[way, ref] = float((preds[p][k] - mast3r_io[ref]).abs().max())
            assert _close(preds[p][k], mast3r_io[ref]), (way, ref, errors[way, ref])
        assert torch.allclose(pred1["desc"].norm(dim=-1), torch.ones(()), atol=1e-5)
        assert bool((pred1["conf"] >= 1).all()) and bool((pred1["desc_conf"] >= 0).all())
        # each pair order alone (batch of one, no symmetric-batch shortcut)
        for b, (a, c2) in enumerate([(mast3r_io["img1"], mast3r_io["img0"]), (mast3r_io["img0"], mast3r_io["img1"])]):
            with torch.no_grad():
                q1, q2 = model(a, c2)
            assert _close(q1["pts3d"][0], mast3r_io["pred1_pts3d"][b])
            assert _close(q1["desc"][0], mast3r_io["pred1_desc"][b])
            assert _close(q2["desc_conf"][0], mast3r_io["pred2_desc_conf"][b])
    print("max abs errors:", max(errors.values()))


def test_mast3r_bare_file_uses_the_public_defaults_and_needs_head_counts(mast3r_io):
    path = DATA / "mast3r_tiny.safetensors"
    # without arguments: two_confs / desc24 / ('exp', 0, inf) are the public model's, dec heads default to 4
    assert load_dust3r(path, device="meta").config.desc_dim == 24
    wrong_heads, _ = _forward(load_dust3r(path), mast3r_io)
    assert not _close(wrong_heads["pts3d"], mast3r_io["pred1_pts3d"], rel=1e-2)
    right, _ = _forward(load_dust3r(path, dec_num_heads=2), mast3r_io)
    assert all(_close(right[k], mast3r_io[f"pred1_{k}"]) for k in ("pts3d", "conf", "desc", "desc_conf"))


def test_mast3r_config_contradiction(mast3r_io):
    cfg = json.loads((DATA / "mast3r_hf_config_tiny.json").read_text())
    with pytest.raises(CheckpointError, match=r"output_mode='pts3d\+desc16'.*17 local-feature channels.*hold 25"):
        load_dust3r(DATA / "mast3r_tiny.safetensors", config=dict(cfg, output_mode="pts3d+desc16"))
    with pytest.raises(CheckpointError, match="head_type='dpt'"):
        load_dust3r(DATA / "mast3r_tiny.safetensors", config=dict(cfg, head_type="dpt"))


def test_mast3r_public_layout_from_manifest_on_meta():
    man = json.loads((DATA / f"mast3r_manifest_{MAST3R_NAME}.json").read_text())
    sd = {k: torch.empty(shape, dtype=getattr(torch, dt), device="meta")
          for k, (shape, dt) in man["state_dict"].items()}
    model = load_dust3r(sd, device="meta")
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == \
        {k: shape for k, (shape, _) in man["state_dict"].items()}
    assert sum(p.numel() for p in model.parameters()) == man["total_params_parameters"]
    assert sum(v.numel() for v in model.state_dict().values()) == man["total_params_state_dict"]
    c = model.config
    assert (c.head_type, c.desc_dim, c.two_confs, c.mlp_hidden, c.hooks()) == ("catmlp+dpt", 24, True, 7168,
                                                                               (0, 6, 9, 12))
    assert (c.dpt_feature_dim, c.dpt_last_dim, c.dpt_layer_dims) == (256, 128, (96, 192, 384, 768))
    # the Hugging Face layout: aliases dropped by save_model, constructor kwargs from config.json
    hf = {k: v for k, v in sd.items() if k not in set(man["hf_model_safetensors_keys_dropped"])}
    cfg = read_config_json(DATA / f"mast3r_hf_config_{MAST3R_NAME}.json")
    model = load_dust3r(hf, device="meta", config=cfg)
    assert model.config.desc_conf_mode == ("exp", 0.0, float("inf")) and model.image_size == 512
    assert len(model.state_dict()) == man["num_keys"]
    # the official .pth form: the README's constructor string, parsed as literals
    args = parse_constructor_call(man["checkpoint_args_string"])
    model = load_dust3r(sd, device="meta", config=args)
    assert (model.config.enc_num_heads, model.config.dec_num_heads, model.config.two_confs) == (16, 12, True)


def test_mast3r_runs_through_infer_pairs_and_alignment(mast3r_io):
    from PIL import Image
    from reconx_core.align import align_views
    model = load_dust3r(DATA / "mast3r_tiny.safetensors", config=DATA / "mast3r_hf_config_tiny.json")
    views = prepare_images([Image.open(fixture_path(f"dust3r_tiny_img{k}.png")) for k in (0, 1)], size=96)
    views = torch.cat([views, views[:1].flip(-1)])  # a third view
    pairs = infer_pairs(model, views, "complete", batch_size=4)
    first = next(e for e, (i, j) in enumerate(pairs.edges.tolist()) if (i, j) == (1, 0))
    assert _close(pairs.pts_i[first], mast3r_io["pred1_pts3d"][0])
    assert _close(pairs.conf_j[first], mast3r_io["pred2_conf"][0])
    scene = align_views(pairs, niter=5)
    assert len(scene) == 3 and bool(torch.isfinite(scene.pts3d).all()) and np.isfinite(scene.info["loss"])


# ============================================================================== 3. damaged files vs unsafe pickles
def _video_loader(path):
    from reconx_core.video.checkpoint import read_state_dict
    return read_state_dict(path)


LOADERS = {"dust3r": load_dust3r, "video": _video_loader}


def _damaged_files(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": load_file(str(fixture_path("tiny_linear.safetensors")))}, good)
    data = good.read_bytes()
    files = {"random.pth": os.urandom(4096), "truncated.pth": data[: len(data) // 2], "empty.ckpt": b"",
             "page.pth": b"<!DOCTYPE html><html><body>Sign in</body></html>",
             "pointer.ckpt": b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 2\n",
             "cut.safetensors": fixture_path("tiny_linear.safetensors").read_bytes()[:5000]}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return files


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_damaged_files_are_called_damaged(tmp_path, loader):
    reasons = {"random.pth": "neither a zip archive nor a pickle", "truncated.pth": "zip archive is cut off",
               "empty.ckpt": "empty (0 bytes)", "page.pth": "web page (HTML)", "pointer.ckpt": "Git LFS pointer",
               "cut.safetensors": "not a .safetensors file"}
    for name in _damaged_files(tmp_path):
        with pytest.raises(CheckpointError) as err:
            LOADERS[loader](tmp_path / name)
        msg = str(err.value)
        assert name in msg and "truncated or corrupt" in msg and "again" in msg, msg
        assert reasons[name] in msg, msg
        assert "other than tensors" not in msg


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_pickles_of_other_objects_are_refused_for_safety(tmp_path, loader):
    marker = tmp_path / "command_ran"
    sd = load_file(str(fixture_path("tiny_linear.safetensors")))
    torch.save({"model": sd, "extra": RunsACommand(marker)}, tmp_path / "evil_zip.pth")
    with open(tmp_path / "evil_plain.pth", "wb") as f:
        pickle.dump({"model": RunsACommand(marker)}, f, protocol=5)
    torch.save({"model": sd, "best": np.float64(0.5)}, tmp_path / "numpy_scalar.pth")
    for name, asks_for in (("evil_zip.pth", "system"), ("evil_plain.pth", "system"), ("numpy_scalar.pth", "numpy")):
        with pytest.raises(CheckpointError) as err:
            LOADERS[loader](tmp_path / name)
        msg = str(err.value)
        assert name in msg and "Python objects other than tensors" in msg and asks_for in msg, msg
        assert ".safetensors" in msg and "truncated or corrupt" not in msg
    assert not marker.exists()


# ======================================================================================= 4. the wrong file picked
def test_state_dict_of_no_consistent_size_names_file_finding_and_fix(tmp_path):
    sd = load_file(str(fixture_path("tiny_dpt.safetensors")))
    other = load_file(str(fixture_path("tiny_linear.safetensors")))  # decoder 64 wide x 4 blocks (tiny_dpt: 32 x 10)
    mixed = {k: v for k, v in sd.items() if not k.startswith("dec_blocks2.")}
    mixed.update({"dec_blocks2." + k[len("dec_blocks."):]: v for k, v in other.items() if k.startswith("dec_blocks.")})
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_dust3r(tmp_path / "mixed.safetensors")
    msg = str(err.value)
    for words in ("mixed.safetensors", "not one consistent", "decoder 32 wide x 10 blocks",
                  "dec_blocks has 10 blocks but dec_blocks2 has 4", "(192, 64), needs (96, 32)", PICK_INSTEAD):
        assert words in msg, (words, msg)
    # an encoder block of another width
    wide = dict(sd, **{k: torch.zeros(v.shape[0] * 2, *v.shape[1:]) for k, v in sd.items()
                       if k.startswith("enc_blocks.1.mlp.fc1.")})
    with pytest.raises(CheckpointError, match=r"enc_blocks\.1\.mlp\.fc1\.weight is \(768, 96\), needs \(384, 96\)"):
        load_dust3r(wide)


def _tiny_dynamicrafter(tmp_path):
    from reconx_core.video import build_video_model, export_official_state_dict, tiny_config
    state = export_official_state_dict(build_video_model(tiny_config(), seed=0))
    torch.save({"state_dict": state}, tmp_path / "dynamicrafter_512_interp.ckpt")
    return tmp_path / "dynamicrafter_512_interp.ckpt"


def test_dynamicrafter_file_in_the_dust3r_loader_and_back(tmp_path):
    with pytest.raises(CheckpointError) as err:
        load_dust3r(_tiny_dynamicrafter(tmp_path))
    msg = str(err.value)
    for words in ("dynamicrafter_512_interp.ckpt", "DynamiCrafter video-diffusion checkpoint",
                  "model.diffusion_model.", "ReconX Video Model Loader", PICK_INSTEAD):
        assert words in msg, (words, msg)
    for path, family in ((fixture_path("tiny_dpt.safetensors"), "DUSt3R point-map network"),
                         (DATA / "mast3r_tiny.safetensors", "MASt3R point-map and descriptor network")):
        with pytest.raises(CheckpointError) as err:
            _video_loader(path)
        msg = str(err.value)
        for words in (path.name, family, "it is not a DynamiCrafter checkpoint", "ReconX DUSt3R Loader",
                      "dynamicrafter_512_interp.ckpt"):
            assert words in msg, (words, msg)


def test_croco_pretraining_checkpoint_is_named(tmp_path):
    sd = load_file(str(fixture_path("tiny_linear.safetensors")))
    croco = {k.replace("downstream_head1.proj", "prediction_head.0"): v for k, v in sd.items()
             if not k.startswith(("downstream_head2.", "dec_blocks2."))}
    torch.save({"model": croco}, tmp_path / "CroCo_V2_ViTLarge_BaseDecoder.pth")
    with pytest.raises(CheckpointError, match="CroCo_V2_ViTLarge_BaseDecoder.pth is a CroCo pre-training checkpoint.*"
                                              + PICK_INSTEAD):
        load_dust3r(tmp_path / "CroCo_V2_ViTLarge_BaseDecoder.pth")
