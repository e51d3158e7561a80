"""reconx_core.dust3r: parity with the official network on the tiny fixtures, checkpoint layouts, bad input.

The fixtures (shared/fixtures, README section A) were made with the official naver/dust3r code; the tiny models'
outputs for the symmetric batch (img1, img0) / (img0, img1) are the reference.
"""

import argparse
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from reconx_core.dust3r import infer_pairs, load_dust3r, make_pair_edges, prepare_images
from reconx_core.dust3r import model as dust3r_model
from reconx_core.errors import CheckpointError, InputError
from tests.fixtures import fixture_path, load_json, load_tensors

pytestmark = pytest.mark.numeric  # float32 parity: CI runs it again on a second numeric path (Makefile test-numeric)

TINY = ["tiny_linear", "tiny_dpt"]
PRED_KEYS = [("pred1", "pts3d", "pred1_pts3d"), ("pred1", "conf", "pred1_conf"),
             ("pred2", "pts3d_in_other_view", "pred2_pts3d_in_other_view"), ("pred2", "conf", "pred2_conf")]
MANIFESTS = ["224_linear", "512_linear", "512_dpt"]


@pytest.fixture(scope="module")
def tiny():
    """name -> (model, io tensors, state dict)."""
    out = {}
    for name in TINY:
        out[name] = (load_dust3r(str(fixture_path(f"{name}.safetensors"))),
                     load_tensors(f"{name}_io.safetensors"), load_file(str(fixture_path(f"{name}.safetensors"))))
    return out


# Parity tolerance, relative to the reference tensor's largest magnitude (float32 differs from CPU to CPU:
# ../shared/ENV.md). The longest reduction in the forward is the patch embedding's 3*16*16 = 768-term sum, whose
# float32 rounding error grows like eps * sqrt(768) = 3.3e-6 of the magnitude (random walk); x2 for the ~50 layers
# in series: 6.6e-6. Measured, max |ours - official| / max |official| over all outputs, intermediates and pair
# orders, under five numeric paths (default, MKL_CBWR=COMPATIBLE, MKL/oneDNN AVX2, those + ATEN avx2,
# ATEN default): 1.16e-6 (tiny_linear), 5.0e-7 (tiny_dpt), 1.5e-6 (fused attention); the bound has 4x margin.
# Still caught (same metric): GELU tanh approximation 4.1e-5 (dpt) / 2.2e-4 (linear), one bias's sign 2.1e-4,
# dec_blocks2 copied from dec_blocks 2.3e-2, wrong RoPE sign 5.4e-2, a dropped decoder block 4.8e-3.
EPS32 = torch.finfo(torch.float32).eps
PARITY_REL = 2 * EPS32 * 768 ** 0.5
# The fused kernel is another algorithm (online softmax): twice the bound, 1.3e-5, as the old 1e-4 absolute.
SDPA_REL = 2 * PARITY_REL


def assert_parity(actual, expected, rel=PARITY_REL, msg=None):
    """|actual - expected| <= rel * max|expected| everywhere (a tolerance relative to the tensor's magnitude)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * float(expected.abs().max()), msg=msg)


def _symmetric_batch(io):
    """The fixture's batch: element 0 is (img1, img0), element 1 is (img0, img1)."""
    return torch.cat([io["img1"], io["img0"]]), torch.cat([io["img0"], io["img1"]])


def _rel_err(model, io):
    """max |output - official| / max |official| over the four outputs of the fixture's symmetric batch."""
    img1, img2 = _symmetric_batch(io)
    with torch.no_grad():
        pred1, pred2 = model(img1, img2)
    preds = {"pred1": pred1, "pred2": pred2}
    return max(float((preds[p][k] - io[ref]).abs().max() / io[ref].abs().max()) for p, k, ref in PRED_KEYS)


def _assert_same_state(model, state):
    """Every tensor of `state` is in the model's state dict, bit for bit (loading copies; it never computes)."""
    ours = model.state_dict()
    for key, value in state.items():
        assert torch.equal(ours[key], value), key


# ---------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", TINY)
def test_tiny_fixture_forward_parity_both_orders(tiny, name):
    model, io, _ = tiny[name]
    img1, img2 = _symmetric_batch(io)
    with torch.no_grad():
        pred1, pred2 = model(img1, img2, torch.tensor([[64, 96]] * 2), torch.tensor([[64, 96]] * 2))
    assert pred1["pts3d"].shape == (2, 64, 96, 3) and pred2["conf"].shape == (2, 64, 96)
    preds = {"pred1": pred1, "pred2": pred2}
    for p, k, ref in PRED_KEYS:
        assert_parity(preds[p][k], io[ref], msg=lambda m, ref=ref: f"{name} {ref}: {m}")
    assert bool((pred1["conf"] >= 1).all())
    # each pair order on its own (batch of 1, no symmetric-batch shortcut)
    for b, (a, c) in enumerate([(io["img1"], io["img0"]), (io["img0"], io["img1"])]):
        with torch.no_grad():
            q1, q2 = model(a, c)
        assert_parity(q1["pts3d"][0], io["pred1_pts3d"][b])
        assert_parity(q2["pts3d_in_other_view"][0], io["pred2_pts3d_in_other_view"][b])
        assert_parity(q2["conf"][0], io["pred2_conf"][b])


@pytest.mark.parametrize("name", TINY)
def test_tiny_fixture_intermediates(tiny, name):
    model, io, _ = tiny[name]
    img1, _ = _symmetric_batch(io)
    with torch.no_grad():
        feat, pos = model.encode(img1)
        # the symmetric batch's view-2 features are view-1's swapped
        feat2, pos2 = feat.flip(0), pos.flip(0)
        dec1, dec2 = model.decode(feat, pos, feat2, pos2)
    assert torch.equal(pos, io["enc_pos1"]) and torch.equal(pos2, io["enc_pos2"])
    assert_parity(feat, io["enc_feat1"])
    depth = model.config.dec_depth
    assert len(dec1) == depth + 1
    for k in (0, 1, depth // 2, depth):
        assert_parity(dec1[k], io[f"dec1_out{k:02d}"], msg=lambda m, k=k: f"dec1 {k}: {m}")
        assert_parity(dec2[k], io[f"dec2_out{k:02d}"], msg=lambda m, k=k: f"dec2 {k}: {m}")


def test_fused_attention_backend_agrees(tiny):
    model, io, _ = tiny["tiny_dpt"]
    try:
        dust3r_model.set_attention_backend("sdpa")
        err = _rel_err(model, io)
    finally:
        dust3r_model.set_attention_backend("auto")
    assert err <= SDPA_REL
    with pytest.raises(InputError):
        dust3r_model.set_attention_backend("flash3")


def test_infer_pairs_matches_fixture_on_the_png_views(tiny):
    """From the PNG files through prepare_images and infer_pairs to the official outputs (edges (1,0), (0,1))."""
    from PIL import Image
    model, io, _ = tiny["tiny_dpt"]
    pngs = [Image.open(fixture_path(f"dust3r_tiny_img{k}.png")) for k in (0, 1)]
    views = prepare_images(pngs, size=96)  # no resize at 96: exactly the official load_images(size=96)
    assert torch.equal((views[0:1] - 0.5) / 0.5, io["img0"]) and torch.equal((views[1:2] - 0.5) / 0.5, io["img1"])
    steps = []
    pairs = infer_pairs(model, views, "complete", batch_size=1, callback=lambda s, t: steps.append((s, t)))
    assert pairs.edges.tolist() == [[1, 0], [0, 1]]
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]  # 2 encoder batches, 2 pair batches
    assert_parity(pairs.pts_i, io["pred1_pts3d"])
    assert_parity(pairs.pts_j_in_i, io["pred2_pts3d_in_other_view"])
    assert_parity(pairs.conf_i, io["pred1_conf"])
    assert_parity(pairs.conf_j, io["pred2_conf"])
    assert torch.equal(pairs.images, views)


def test_infer_pairs_three_views_each_edge_equals_a_direct_forward(tiny):
    model, io, _ = tiny["tiny_linear"]
    views = torch.cat([io["img0"], io["img1"], io["img0"].flip(-1)]) * 0.5 + 0.5
    pairs = infer_pairs(model, views, "swin-1-noncyclic", batch_size=3)
    assert sorted(map(tuple, pairs.edges.tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1)]
    for e, (i, j) in enumerate(pairs.edges.tolist()):
        with torch.no_grad():
            p1, p2 = model(views[i:i + 1] * 2 - 1, views[j:j + 1] * 2 - 1)
        # batched vs one pair at a time: the same math, other kernel blockings
        assert_parity(pairs.pts_i[e], p1["pts3d"][0])
        assert_parity(pairs.pts_j_in_i[e], p2["pts3d_in_other_view"][0])
        assert_parity(pairs.conf_j[e], p2["conf"][0])


def test_callback_exception_stops_inference(tiny):
    model, io, _ = tiny["tiny_linear"]
    views = torch.cat([io["img0"], io["img1"]] * 2) * 0.5 + 0.5
    calls = []

    def interrupt(step, total):
        calls.append(step)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        infer_pairs(model, views, batch_size=1, callback=interrupt)
    assert calls == [1]


def test_bfloat16_model_runs_with_float32_heads(tiny):
    _, io, sd = tiny["tiny_dpt"]
    model = load_dust3r(sd, dtype=torch.bfloat16)
    assert model.compute_dtype == torch.bfloat16
    assert model.downstream_head1.dpt.head[0].weight.dtype == torch.float32
    img1, img2 = _symmetric_batch(io)
    with torch.no_grad():
        pred1, _ = model(img1, img2)
    assert pred1["pts3d"].dtype == torch.float32
    rel = (pred1["pts3d"] - io["pred1_pts3d"]).norm(dim=-1) / io["pred1_pts3d"].norm(dim=-1)
    assert float(rel.median()) < 0.05


# ------------------------------------------------------------------------------------------ checkpoint layouts
def test_pth_with_argparse_namespace_loads_weights_only(tiny, tmp_path):
    _, io, sd = tiny["tiny_linear"]
    args = ("AsymmetricCroCo3DStereo(pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', img_size=(224, 224), "
            "head_type='linear', output_mode='pts3d', depth_mode=('exp', -inf, inf), conf_mode=('exp', 1, inf), "
            "enc_embed_dim=96, enc_depth=2, enc_num_heads=4, dec_embed_dim=64, dec_depth=4, dec_num_heads=4)")
    path = tmp_path / "tiny.pth"
    torch.save({"model": sd, "args": argparse.Namespace(model=args, lr=1e-4)}, path)
    model = load_dust3r(str(path))
    assert model.image_size == 224 and model.config.enc_num_heads == 4 and model.config.head_type == "linear"
    assert (model.config.enc_depth, model.config.dec_embed_dim, model.config.dec_depth,
            model.config.dec_num_heads) == (2, 64, 4, 4)
    # loading copies tensors: the weights are the fixture's bit for bit (the forward parity is tested above)
    _assert_same_state(model, sd)
    # the head counts come from the args string (the weights cannot tell them): 2 heads give other outputs
    torch.save({"model": sd, "args": argparse.Namespace(model=args.replace("enc_num_heads=4", "enc_num_heads=2"))},
               path)
    two_heads = load_dust3r(str(path))
    assert two_heads.config.enc_num_heads == 2
    _assert_same_state(two_heads, sd)
    assert _rel_err(two_heads, io) > 100 * PARITY_REL


def test_dpt_alias_variants_and_missing_dec_blocks2(tiny):
    _, io, sd = tiny["tiny_dpt"]
    only_list = {k: v for k, v in sd.items() if not any(f"layer{n}_rn" in k for n in range(1, 5))}
    only_named = {k: v for k, v in sd.items() if ".layer_rn." not in k}
    assert len(only_list) == len(only_named) == len(sd) - 8
    no_dec2 = {k: v for k, v in sd.items() if not k.startswith("dec_blocks2.")}
    for variant in (only_list, only_named):
        _assert_same_state(load_dust3r(variant), sd)  # both alias names filled from the one present
    # without dec_blocks2 the second decoder is a copy of the first (the official loader's rule)
    model = load_dust3r(no_dec2)
    # (the fixture's own dec_blocks2 biases differ from dec_blocks': they got their own perturbation)
    assert not torch.equal(sd["dec_blocks2.3.mlp.fc1.bias"], sd["dec_blocks.3.mlp.fc1.bias"])
    assert torch.equal(model.dec_blocks2[3].mlp.fc1.bias, sd["dec_blocks.3.mlp.fc1.bias"])
    assert model.dec_blocks2[3].mlp.fc1.bias.data_ptr() != model.dec_blocks[3].mlp.fc1.bias.data_ptr()
    state = model.state_dict()
    assert all(torch.equal(state["dec_blocks2." + k[len("dec_blocks."):]], v)
               for k, v in sd.items() if k.startswith("dec_blocks."))
    _assert_same_state(model, {k: v for k, v in sd.items() if not k.startswith("dec_blocks2.")})
    # the fixture's own dec_blocks2 matter: measured 2.3e-2 relative, 3500x the parity bound
    assert _rel_err(model, io) > 100 * PARITY_REL


@pytest.mark.parametrize("name", MANIFESTS)
def test_public_checkpoint_layouts_build_on_meta(name):
    man = load_json(f"dust3r_manifest_DUSt3R_ViTLarge_BaseDecoder_{name}.json")
    sd = {k: torch.empty(shape, dtype=getattr(torch, dt), device="meta")
          for k, (shape, dt) in man["state_dict"].items()}
    model = load_dust3r(sd, device="meta")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: shape for k, (shape, _) in man["state_dict"].items()}
    assert sum(p.numel() for p in model.parameters()) == man["total_params_parameters"]
    assert sum(v.numel() for v in model.state_dict().values()) == man["total_params_state_dict"]
    kw = man["resolved_constructor_kwargs"]
    cfg = model.config
    assert (cfg.enc_embed_dim, cfg.enc_depth, cfg.enc_num_heads) == (kw["enc_embed_dim"], kw["enc_depth"],
                                                                     kw["enc_num_heads"])
    assert (cfg.dec_embed_dim, cfg.dec_depth, cfg.dec_num_heads) == (kw["dec_embed_dim"], kw["dec_depth"],
                                                                     kw["dec_num_heads"])
    assert cfg.head_type == kw["head_type"] and cfg.patch_size == kw["patch_size"]
    if cfg.head_type == "dpt":
        assert (cfg.dpt_feature_dim, cfg.dpt_last_dim, cfg.dpt_layer_dims) == (256, 128, (96, 192, 384, 768))
        assert cfg.hooks() == (0, 6, 9, 12)
    # the same layout as it would come in a checkpoint with only one DPT alias and no dec_blocks2
    lean = {k: v for k, v in sd.items() if ".layer_rn." not in k and not k.startswith("dec_blocks2.")}
    assert {k: list(v.shape) for k, v in load_dust3r(lean, device="meta").state_dict().items()} == ours


def test_safetensors_header_only_on_meta_and_size_from_file_name(tmp_path):
    path = tmp_path / "DUSt3R_tiny_224_linear.safetensors"
    shutil.copy(fixture_path("tiny_linear.safetensors"), path)
    model = load_dust3r(str(path), device="meta")
    assert model.patch_embed.proj.weight.is_meta and model.image_size == 224
    assert load_dust3r(str(fixture_path("tiny_linear.safetensors")), device="meta").image_size == 512


# --------------------------------------------------------------------------------------------------- bad input
def test_non_dust3r_file_names_the_missing_keys(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(path))
    with pytest.raises(CheckpointError, match="patch_embed.proj.weight") as e:
        load_dust3r(str(path))
    assert "encoder.conv_in.weight" in str(e.value)


def test_layout_mismatch_names_unexpected_keys(tiny):
    _, _, sd = tiny["tiny_linear"]
    bad = dict(sd, **{"enc_blocks.0.attn.extra.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="enc_blocks.0.attn.extra.weight"):
        load_dust3r(bad)


def test_truncated_and_missing_files(tmp_path):
    data = fixture_path("tiny_linear.safetensors").read_bytes()
    st = tmp_path / "cut.safetensors"
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_dust3r(str(st))
    pth = tmp_path / "cut.pth"
    torch.save({"model": load_file(str(fixture_path("tiny_linear.safetensors")))}, pth)
    pth.write_bytes(pth.read_bytes()[:200_000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_dust3r(str(pth))
    with pytest.raises(CheckpointError, match="not found"):
        load_dust3r(str(tmp_path / "nowhere.pth"))


def test_bad_views_raise_input_errors(tiny):
    model, io, _ = tiny["tiny_linear"]
    views = torch.cat([io["img0"], io["img1"]]) * 0.5 + 0.5
    with pytest.raises(InputError, match="at least 2 views"):
        infer_pairs(model, views[:1])
    with pytest.raises(InputError, match="at least 64"):
        infer_pairs(model, views[:, :, :32, :32])
    with pytest.raises(InputError, match="at least 64"):
        prepare_images(views[:, :, :32, :48])
    nan = views.clone()
    nan[1, 0, 3, 3] = float("nan")
    with pytest.raises(InputError, match=r"views \[1\].*NaN"):
        infer_pairs(model, nan)
    with pytest.raises(InputError, match="NaN"):
        prepare_images(nan)
    with pytest.raises(InputError, match="prepare_images"):
        infer_pairs(model, views[:, :, :, :90])
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        infer_pairs(model, views * 2 - 1)
    with pytest.raises(InputError, match="unknown scene graph"):
        infer_pairs(model, views, graph="star")
    with pytest.raises(InputError, match="multiples of 16"):
        model(io["img0"][..., :90], io["img1"][..., :90])


# ------------------------------------------------------------------------------------------------------ graphs
def _official_window_order(n, k, cyclic):
    """The official swin graph collects unordered pairs in a Python set; its iteration order is the reference."""
    ids = set()
    for i in range(n):
        for d in range(1, k + 1):
            j = (i + d) % n if cyclic else i + d
            if j < n:
                ids.add((min(i, j), max(i, j)))
    return [p for p in ids if p[0] != p[1]]


def test_pair_graphs():
    complete = make_pair_edges(4, "complete").tolist()
    assert complete == load_json("dust3r_globalalign.json")["edges"]
    assert make_pair_edges(2, "complete").tolist() == [[1, 0], [0, 1]]
    assert make_pair_edges(3, "complete", symmetrize=False).tolist() == [[1, 0], [2, 0], [2, 1]]
    assert make_pair_edges(4, "oneref-2").tolist() == [[2, 0], [2, 1], [2, 3], [0, 2], [1, 2], [3, 2]]
    assert make_pair_edges(3, "oneref").tolist() == [[0, 1], [0, 2], [1, 0], [2, 0]]
    swin = make_pair_edges(6, "swin-2", symmetrize=False).tolist()
    assert sorted(map(tuple, swin)) == [(0, 1), (0, 2), (0, 4), (0, 5), (1, 2), (1, 3), (1, 5), (2, 3), (2, 4),
                                        (3, 4), (3, 5), (4, 5)]
    assert list(map(tuple, swin)) == _official_window_order(6, 2, True)
    nc = make_pair_edges(6, "swin-2-noncyclic").tolist()
    fwd = _official_window_order(6, 2, False)
    assert list(map(tuple, nc)) == fwd + [(j, i) for i, j in fwd]
    assert sorted(fwd) == [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (2, 4), (3, 4), (3, 5), (4, 5)]
    # two views: every graph reduces to the one pair both ways; cyclic windows larger than n give no self-pairs
    for g in ("swin-3", "swin-1-noncyclic", "oneref-0", "logwin-2"):
        assert sorted(map(tuple, make_pair_edges(2, g).tolist())) == [(0, 1), (1, 0)], g
    with pytest.raises(InputError):
        make_pair_edges(1)
    with pytest.raises(InputError, match="reference view 5"):
        make_pair_edges(3, "oneref-5")


# ------------------------------------------------------------------------------------------------ preprocessing
def _official_rules(w, h, size, square_ok=False):
    """Output size of the official load_images, derived by hand from its rules (long side / 224 short side,
    centre crop to multiples of 16, 4:3 for squares)."""
    if size == 224:
        long_edge = round(224 * max(w / h, h / w))
    else:
        long_edge = size
    rw, rh = round(w * long_edge / max(w, h)), round(h * long_edge / max(w, h))
    if size == 224:
        side = 2 * min(rw // 2, rh // 2)
        return rw, rh, side, side
    cw, ch = (rw // 2 * 2) // 16 * 16, (rh // 2 * 2) // 16 * 16
    if rw == rh and not square_ok:
        ch = 3 * cw // 4
    return rw, rh, cw, ch


@pytest.mark.parametrize("w,h,size,square_ok,expect", [
    (96, 64, 512, False, (512, 336)), (96, 64, 224, False, (224, 224)), (100, 100, 512, False, (512, 384)),
    (100, 100, 512, True, (512, 512)), (741, 500, 512, False, (512, 336)), (333, 517, 512, False, (320, 512)),
    (1280, 721, 224, False, (224, 224)), (97, 65, 96, False, (96, 64)),
])
def test_prepare_images_matches_the_official_rules(w, h, size, square_ok, expect):
    from PIL import Image
    g = torch.Generator().manual_seed(w * 1000 + h)
    img = (torch.rand(1, 3, h, w, generator=g) * 255).round() / 255
    out = prepare_images(img, size=size, square_ok=square_ok)
    rw, rh, cw, ch = _official_rules(w, h, size, square_ok)
    assert tuple(out.shape) == (1, 3, ch, cw) and (cw, ch) == expect
    # pixel-exact against PIL resize + centre crop done here step by step
    pil = Image.fromarray((img[0].permute(1, 2, 0) * 255).round().byte().numpy())
    pil = pil.resize((rw, rh), Image.LANCZOS if max(w, h) > max(rw, rh) else Image.BICUBIC)
    left, top = rw // 2 - cw // 2, rh // 2 - ch // 2
    ref = torch.from_numpy(np.array(pil.crop((left, top, left + cw, top + ch)))).permute(2, 0, 1)
    assert torch.equal(out[0], ref.float() / 255)
    assert out.dtype == torch.float32 and 0 <= float(out.min()) and float(out.max()) <= 1


def test_prepare_images_rejects_mixed_aspect_ratios():
    with pytest.raises(InputError, match="same aspect ratio"):
        from PIL import Image
        prepare_images([Image.new("RGB", (96, 64)), Image.new("RGB", (64, 96))])
