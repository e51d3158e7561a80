"""Parity of the DynamiCrafter UNet / Resampler / schedule with the official fixtures, and the ReconX branch."""

import pytest
import torch

from reconx_core.errors import CheckpointError, InputError
from reconx_core.video.resampler import build_resampler
from reconx_core.video.schedule import DiffusionSchedule
from reconx_core.video.unet import build_unet
from tests.fixtures import load_json, load_tensors

pytestmark = pytest.mark.numeric  # float32 parity: CI runs it again on a second numeric path (Makefile test-numeric)

# Schedule buffers: float64 formulas stored in float32, values <= 1; 1e-5 (84 eps) is ample (measured: bitwise
# equal but for one sigma, 0.5 eps, on five numeric paths).
TOL = 1e-5
# Network outputs, relative to the output's magnitude (float32 differs from CPU to CPU: ../shared/ENV.md). The longest
# reduction is the decoder's first 3x3 convolution over 64 + 64 skip-concatenated channels, 1152 terms: float32
# rounding grows like eps * sqrt(1152) = 4.0e-6 of the magnitude; x2 for the layers in series: 8.1e-6 (5.9e-6 at the
# UNet output's 0.73). Measured under five numeric paths (default, MKL_CBWR=COMPATIBLE, MKL/oneDNN AVX2, those +
# ATEN avx2, ATEN default): UNet <= 15.8 eps (1.9e-6, 4.3x margin), resampler <= 3.7 eps. Still caught: GELU's tanh
# approximation in the GEGLU 2.6e-5, GroupNorm eps x10 1.1e-3, output bias sign 9.7e-2, a temporal conv dropped 0.23;
# the fs embedding changes the output by 2.1e-2.
EPS32 = torch.finfo(torch.float32).eps
NET_REL = 2 * EPS32 * 1152 ** 0.5


def assert_parity(actual, expected, rel=NET_REL):
    """|actual - expected| <= rel * max|expected| everywhere."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * float(expected.abs().max()))


@pytest.fixture(scope="module")
def tiny():
    return load_json("dc_tiny.json"), load_tensors("dc_tiny_io.safetensors"), load_tensors("dc_tiny_unet.safetensors")


def _unet(tiny, learnable=False):
    cfg, _, weights = tiny
    config = dict(cfg["unet"]["constructor_kwargs"], image_cross_attention_scale_learnable=learnable)
    unet = build_unet(config).eval()
    state = {k: v for k, v in weights.items() if learnable or not k.endswith("attn2.alpha")}
    result = unet.load_state_dict(state)
    # only the 3 ReconX tensors of each of the 4 spatial transformers are absent from the official weights
    assert sorted(result.missing_keys) == sorted(unet.structure_parameter_names())
    assert len(result.missing_keys) == 12
    return unet


def _inputs(io):
    return io["unet_in_x"], io["unet_in_timesteps"], io["unet_in_context"]


@torch.no_grad()
def test_unet_matches_official_outputs(tiny):
    _, io, _ = tiny
    plain = _unet(tiny)
    assert sum(p.numel() for k, p in plain.named_parameters() if "_struct" not in k) == 1361028
    out = plain(*_inputs(io), fs=io["unet_in_fs"])
    assert out.shape == (1, 4, 4, 16, 16)
    assert_parity(out, io["unet_out"])
    out_default = plain(*_inputs(io))  # fs=None -> default_fs=24
    assert_parity(out_default, io["unet_out_fs_none_default24"])
    assert (out_default - io["unet_out"]).abs().max() > 100 * NET_REL * io["unet_out"].abs().max()  # fs matters

    learnable = _unet(tiny, learnable=True)
    out_l = learnable(*_inputs(io), fs=io["unet_in_fs"])
    assert_parity(out_l, io["unet_out_learnable_alpha0p3"])


@torch.no_grad()
def test_resampler_matches_official_output(tiny):
    cfg, io, _ = tiny
    resampler = build_resampler(cfg["resampler"]["constructor_kwargs"]).eval()
    resampler.load_state_dict(load_tensors("dc_tiny_resampler.safetensors"))
    out = resampler(io["resampler_in_clip_tokens"])
    assert out.shape == (1, 64, 32)
    assert_parity(out, io["resampler_out_img_tokens"])


def test_schedule_matches_official_buffers():
    ref = load_tensors("dc_schedule.safetensors")
    sched = DiffusionSchedule.official()
    for name in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "scale_arr"):
        assert (getattr(sched, name) - ref[name]).abs().max() <= TOL, name
    assert sched.alphas_cumprod[-1] == 0  # zero terminal SNR
    ddim = sched.ddim(50, eta=1.0, spacing="uniform_trailing")
    assert torch.equal(ddim.timesteps, ref["ddim50_uniform_trailing_timesteps"])
    assert ddim.timesteps[0] == 19 and ddim.timesteps[-1] == 999
    for ours, theirs in (("alphas", "ddim50_alphas"), ("alphas_prev", "ddim50_alphas_prev"),
                         ("sigmas", "ddim50_eta1_sigmas"), ("scale", "ddim50_scale_arr")):
        assert (getattr(ddim, ours) - ref[theirs]).abs().max() <= TOL, ours


@torch.no_grad()
def test_structure_branch_is_exact_noop_at_alpha_zero(tiny):
    _, io, _ = tiny
    unet = _unet(tiny)
    g = torch.Generator().manual_seed(3)
    for name, p in unet.named_parameters():
        if "to_k_struct" in name or "to_v_struct" in name:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    structure = torch.randn(1, 10, 32, generator=g)
    base = unet(*_inputs(io), fs=io["unet_in_fs"])
    with_struct = unet(*_inputs(io), fs=io["unet_in_fs"], structure=structure)
    assert torch.equal(base, with_struct)


def test_structure_branch_changes_output_and_gets_gradients(tiny):
    _, io, _ = tiny
    unet = _unet(tiny)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith("alpha_struct"):
                p.fill_(0.5)
    structure = torch.randn(1, 10, 32, generator=g, requires_grad=True)
    base = unet(*_inputs(io), fs=io["unet_in_fs"]).detach()
    out = unet(*_inputs(io), fs=io["unet_in_fs"], structure=structure)
    assert (out - base).abs().max() > 1e-4
    out.square().sum().backward()
    for name in unet.structure_parameter_names():
        grad = unet.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert structure.grad.abs().sum() > 0


def test_bad_inputs_and_checkpoints_raise_clear_errors(tiny):
    cfg, io, weights = tiny
    unet = _unet(tiny)
    with pytest.raises(InputError, match="structure tokens"):
        unet(*_inputs(io), structure=torch.zeros(1, 5, 7))
    with pytest.raises(InputError, match="UNet input"):
        unet(io["unet_in_x"][:, :4], io["unet_in_timesteps"], io["unet_in_context"])
    broken = {k: v for k, v in weights.items() if not k.startswith("out.")}
    with pytest.raises(CheckpointError, match="missing"):
        build_unet(cfg["unet"]["constructor_kwargs"]).load_state_dict(broken)
    with pytest.raises(InputError, match="unknown UNet option"):
        build_unet(dict(cfg["unet"]["constructor_kwargs"], bogus=1))
