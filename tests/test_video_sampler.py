"""DDIM sampler, multi-condition guidance and a tiny end-to-end interpolation on the CPU."""

import pytest
import torch

from reconx_core.errors import InputError, ResourceError
from reconx_core.video.model import build_video_model, tiny_config
from reconx_core.video.pipeline import interpolate, reference_frame_indices
from reconx_core.video.sampler import Conditions, ddim_sample, guided_velocity
from reconx_core.video.schedule import DiffusionSchedule
from reconx_core.video.vae import decode_latents, encode_frames


@pytest.mark.parametrize("dynamic_rescale", [False, True])
def test_ddim_with_an_oracle_velocity_lands_on_the_data(dynamic_rescale):
    sched = DiffusionSchedule.official()
    x0 = torch.linspace(-1.5, 1.5, 2 * 4 * 3 * 5 * 5).reshape(2, 4, 3, 5, 5)

    def oracle(x, t):  # the exact v for data x0: x0 = sqrt(a) x - sqrt(1-a) v
        a = sched.alphas_cumprod[t[0]]
        return (a.sqrt() * x - x0) / (1 - a).sqrt()

    out = ddim_sample(oracle, x0.shape, sched, steps=50, eta=1.0, generator=torch.Generator().manual_seed(0),
                      dynamic_rescale=dynamic_rescale)
    # the last step still adds sigma_0 ~ 0.029 of noise, and keeps sqrt(1-a_0) ~ 0.03 of eps
    assert (out - x0).abs().mean() < 0.05
    assert (out - x0).abs().max() < 0.3


def test_ddim_is_seeded_and_reports_every_step():
    sched = DiffusionSchedule.official()
    calls = []
    run = lambda seed: ddim_sample(lambda x, t: torch.zeros_like(x), (1, 4, 2, 3, 3), sched, steps=7,  # noqa
                                   generator=torch.Generator().manual_seed(seed), callback=lambda i, n: calls.append((i, n)))
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert calls[:7] == [(i, 7) for i in range(1, 8)]


class _FakeUNet:
    """v = pattern * (1 for the uncond context, 2 for cond, 3 with structure)."""

    def __call__(self, x, t, context, fs=None, structure=None):
        scale = float(context.mean()) + (1.0 if structure is not None else 0.0)
        return torch.linspace(0.1, 1.0, x[:, :4].numel()).reshape(x[:, :4].shape) * scale


def test_multi_condition_guidance_formula():
    x = torch.zeros(1, 4, 2, 3, 3)
    cond = Conditions(concat=torch.zeros(1, 4, 2, 3, 3), context=torch.full((1, 5, 2), 2.0),
                      uncond_context=torch.full((1, 5, 2), 1.0), fs=torch.tensor([5]),
                      structure=torch.zeros(1, 3, 2))
    p = _FakeUNet()(x, None, torch.ones(1))
    plain = guided_velocity(_FakeUNet(), x, None, Conditions(**{**cond.__dict__, "structure": None}), cfg=7.5,
                            guidance_rescale=0.0)
    assert torch.allclose(plain, p * (1 + 7.5 * (2 - 1)))
    guided = guided_velocity(_FakeUNet(), x, None, cond, cfg=7.5, structure_scale=2.0, guidance_rescale=0.0)
    assert torch.allclose(guided, p * (1 + 7.5 + 2.0 * (3 - 2)))
    rescaled = guided_velocity(_FakeUNet(), x, None, cond, cfg=7.5, structure_scale=2.0, guidance_rescale=0.7)
    # the std of the fully conditioned prediction (3p) replaces the guided one's, mixed 0.7 / 0.3
    assert torch.allclose(rescaled, 0.7 * 3 * p + 0.3 * guided, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_model():
    model = build_video_model(tiny_config(), structure_encoder=True, seed=0)
    return model


def _views(k=3, size=32):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    views = [torch.stack([(xx + 0.3 * i) % 1, yy, 0.5 + 0.4 * torch.sin(6 * xx + i)]) for i in range(k)]
    return torch.stack(views).clamp(0, 1)


def test_tiny_interpolation_end_to_end(tiny_model):
    model = tiny_model
    views = _views(3)
    steps_seen = []
    out = interpolate(model, views, steps=3, frames=4, seed=0, callback=lambda i, n: steps_seen.append((i, n)))
    assert out.shape == (2 * 3 + 1, 3, 32, 32)
    assert out.min() >= 0 and out.max() <= 1
    assert steps_seen == [(i, 6) for i in range(1, 7)]
    short = interpolate(model, views[:2], steps=1, frames=4, seed=0)
    assert torch.equal(short, interpolate(model, views[:2], steps=1, frames=4, seed=0))
    assert not torch.equal(short, interpolate(model, views[:2], steps=1, frames=4, seed=1))

    # the end frames are the references after the VAE round trip (same seed -> same posterior samples)
    with torch.no_grad():
        z = encode_frames(model.vae, views * 2 - 1, torch.Generator().manual_seed(0))
        round_trip = ((decode_latents(model.vae, z) + 1) / 2).clamp(0, 1)
    idx = reference_frame_indices(3, 4)
    assert idx == [0, 3, 6]
    assert (out[idx] - round_trip).abs().max() < 1e-5
    # ... and the frames in between are generated, not copies of the ends
    assert (out[1] - out[0]).abs().mean() > 1e-3 and (out[1] - out[3]).abs().mean() > 1e-3


def test_structure_condition_changes_the_samples(tiny_model):
    model = tiny_model
    views = _views(2)
    tokens = model.structure_encoder(torch.randn(1, 80, 3, generator=torch.Generator().manual_seed(5)))
    assert tokens.shape == (1, 10, 32)
    with pytest.raises(ResourceError, match="alpha_struct"):
        interpolate(model, views, structure=tokens, steps=2, frames=4)
    gates = [p for n, p in model.unet.named_parameters() if n.endswith("alpha_struct")]
    try:
        with torch.no_grad():
            for g in gates:
                g.fill_(0.5)
        base = interpolate(model, views, steps=2, frames=4, seed=3)
        guided = interpolate(model, views, structure=tokens, steps=2, frames=4, seed=3, structure_scale=2.0)
        off = interpolate(model, views, structure=tokens, steps=2, frames=4, seed=3, structure_scale=0.0)
    finally:
        with torch.no_grad():
            for g in gates:
                g.zero_()
    assert (guided[1:3] - base[1:3]).abs().max() > 1e-4
    assert torch.equal(off, base)  # scale 0 drops the structure term entirely


def test_interrupt_stops_within_one_step_and_bad_input_is_rejected(tiny_model):
    calls = []

    def interrupt(i, n):
        calls.append(i)
        if i == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interpolate(tiny_model, _views(2), steps=5, frames=4, callback=interrupt)
    assert calls == [1, 2]
    with pytest.raises(InputError, match="multiple of"):
        interpolate(tiny_model, _views(2, size=40), steps=1, frames=4)
    with pytest.raises(InputError, match="K >= 2"):
        interpolate(tiny_model, _views(1), steps=1, frames=4)
