"""Render guidance with an oracle: a velocity model that predicts zero, and a known latent for the renders.

With v = 0 the model's clean-latent prediction at step t is x0 = sqrt(a_t) x_t, so everything the guidance does is
visible exactly: fused steps must give the render latent where the mask is 1, leave x0 untouched where it is 0 (and
then the whole trajectory there is bitwise the unguided one), mix linearly in between, take the DDIM step from the
fused x0 with the noise it implies, and stop at the stated step.
"""

import pytest
import torch

from reconx_core.errors import InputError
from reconx_core.video.guidance import GuidanceSettings, RenderFusion, latent_mask
from reconx_core.video.sampler import ReplayNoise, ddim_sample
from reconx_core.video.schedule import DiffusionSchedule

SHAPE = (1, 4, 3, 4, 6)   # (B, C, T, h, w)
STEPS = 10


def zero_velocity(x, t):
    return torch.zeros_like(x)


def scene():
    """Render latents, and a mask: left third uncovered (0), middle half-covered (0.5), right third covered (1)."""
    g = torch.Generator().manual_seed(0)
    z_r = torch.randn(SHAPE, generator=g)
    mask = torch.zeros(1, 1, 3, 4, 6)
    mask[..., 2:4], mask[..., 4:] = 0.5, 1.0
    return z_r, mask


def draws(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g) for _ in range(n)]


class Recorder:
    """Wraps a hook, keeping (step, x0 in, x0 out) of every call."""

    def __init__(self, hook):
        self.hook, self.calls = hook, []

    def __call__(self, x0, i, total):
        out = self.hook(x0, i, total)
        self.calls.append((i, x0.clone(), None if out is None else out.clone()))
        return out


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_fused_steps_reproduce_the_render_and_stop_on_time(eta):
    sched = DiffusionSchedule.official()
    z_r, mask = scene()
    settings = GuidanceSettings(mode="x0 fusion", strength=1.0, until=0.6)
    stop = settings.stop_step(STEPS)
    assert stop == 6
    hook = Recorder(RenderFusion(z_r, mask, settings.strength, stop))
    inputs = []

    def velocity(x, t):
        inputs.append((int(t[0]), x.clone()))
        return torch.zeros_like(x)

    noise = draws(STEPS + 1)
    guided = ddim_sample(velocity, SHAPE, sched, steps=STEPS, eta=eta, noise=ReplayNoise(noise), x0_hook=hook)
    plain = ddim_sample(zero_velocity, SHAPE, sched, steps=STEPS, eta=eta, noise=ReplayNoise(noise))
    covered, half, uncovered = (mask == 1).expand(SHAPE), (mask == 0.5).expand(SHAPE), (mask == 0).expand(SHAPE)

    assert [i for i, _, _ in hook.calls] == list(range(STEPS))
    for i, x0, fused in hook.calls:
        if i >= stop:
            assert fused is None                                  # the guidance has stopped
            continue
        assert torch.equal(fused[covered], z_r[covered])          # the render latent, exactly
        assert torch.equal(fused[uncovered], x0[uncovered])       # the model's own prediction, untouched
        torch.testing.assert_close(fused[half], 0.5 * (x0[half] + z_r[half]), rtol=0, atol=1e-6)
    # uncovered latents follow the unguided trajectory bit for bit (the oracle mixes no pixels)
    assert torch.equal(guided[uncovered], plain[uncovered])
    assert not torch.allclose(guided[covered], plain[covered])

    # each fused step is the DDIM step from the fused x0 with the noise it implies: eps' = (x - sqrt(a) x0') / sqrt(1-a)
    ddim = sched.ddim(STEPS, eta)
    for i in range(stop):
        index = STEPS - 1 - i
        t, x = inputs[i]
        a, a_prev, sigma = ddim.alphas[index], ddim.alphas_prev[index], ddim.sigmas[index]
        fused = hook.calls[i][2]
        eps = (x - a.sqrt() * fused) / (1 - a).sqrt()
        step_noise = sigma * noise[i + 1]
        expect = a_prev.sqrt() * fused + (1 - a_prev - sigma ** 2).clamp_min(0).sqrt() * eps + step_noise
        nxt = inputs[i + 1][1] if i + 1 < STEPS else guided
        # float32 rounding of the two formulas (values ~3, a few operations): 1e-5 absolute
        torch.testing.assert_close(nxt[covered], expect[covered], rtol=0, atol=1e-5)


def test_render_latents_come_out_where_guided_to_the_end():
    """Guided through the last step with eta 0: the covered latents land on the render latents, up to the
    sqrt(1 - a_0) ~ 0.029 share of noise DDIM keeps at t = 0 (times the implied eps, |eps| < 4.5 here)."""
    sched = DiffusionSchedule.official()
    z_r, mask = scene()
    out = ddim_sample(zero_velocity, SHAPE, sched, steps=STEPS, eta=0.0, noise=ReplayNoise(draws(STEPS + 1)),
                      x0_hook=RenderFusion(z_r, mask, 1.0, STEPS))
    covered = (mask == 1).expand(SHAPE)
    keep = float((1 - sched.ddim(STEPS, 0.0).alphas_prev[0]).sqrt())
    assert (out[covered] - z_r[covered]).abs().max() < 5 * keep


def test_render_init_starts_from_the_noised_renders():
    sched = DiffusionSchedule.official()
    z_r, _ = scene()
    settings = GuidanceSettings(mode="render init", init_strength=0.5)
    start = settings.start_step(STEPS)
    assert start == 5 and settings.stop_step(STEPS) == 0 and not settings.fuses
    seen, progress = [], []
    noise = draws(STEPS - start + 1)
    ddim_sample(lambda x, t: seen.append((int(t[0]), x.clone())) or torch.zeros_like(x), SHAPE, sched, steps=STEPS,
                noise=ReplayNoise(noise), start_step=start, start_latents=z_r,
                callback=lambda i, n: progress.append(i))
    t0 = int(sched.ddim(STEPS).timesteps[STEPS - 1 - start])
    assert [t for t, _ in seen][0] == t0 and len(seen) == STEPS - start
    expect = sched.sqrt_alphas_cumprod[t0] * z_r + sched.sqrt_one_minus_alphas_cumprod[t0] * noise[0]
    assert torch.equal(seen[0][1], expect)
    assert progress == list(range(start, STEPS + 1))       # the skipped steps count once, then every step


def test_latent_mask_averages_blocks_and_erodes():
    cover = torch.zeros(1, 32, 48)
    cover[:, :, 16:] = 1.0                 # right two thirds covered
    cover[:, 0:8, 8:16] = 0.25             # one block a quarter covered
    m = latent_mask(cover, 8, 0)
    assert m.shape == (1, 4, 6)
    assert torch.equal(m[0, :, 2:], torch.ones(4, 4)) and float(m[0, 0, 1]) == 0.25 and float(m[0, 1, 0]) == 0
    eroded = latent_mask(cover, 8, 1)
    assert torch.equal(eroded[0, :, 3:], torch.ones(4, 3))  # one latent pixel trimmed at the edge of the region
    assert float(eroded[0, :, 2].max()) == 0.0
    with pytest.raises(InputError, match="multiple of the latent factor"):
        latent_mask(torch.ones(1, 30, 48))


def test_settings_are_checked():
    with pytest.raises(InputError, match="unknown guidance mode"):
        GuidanceSettings(mode="magic")
    with pytest.raises(InputError, match="strength"):
        GuidanceSettings(mode="x0 fusion", strength=1.5)
    assert not GuidanceSettings(mode="x0 fusion", strength=0.0).active
    both = GuidanceSettings(mode="render init + x0 fusion", until=0.3, init_strength=0.9)
    assert both.fuses and both.initialises and both.start_step(50) == 5 and both.stop_step(50) == 15


def test_fusion_with_nothing_covered_is_plain_sampling():
    """Through the whole pipeline: renders that cover nothing change nothing, bit for bit; covered ones do."""
    from reconx_core.video import interpolate
    from reconx_core.video.model import build_video_model, tiny_config

    model = build_video_model(tiny_config(), seed=0)
    g = torch.Generator().manual_seed(2)
    views = torch.rand(2, 3, 32, 32, generator=g)
    renders = torch.rand(4, 3, 32, 32, generator=g)
    fusion = GuidanceSettings(mode="x0 fusion", erosion=0)
    plain = interpolate(model, views, steps=3, frames=4, seed=5)
    empty = torch.zeros(4, 32, 32)
    empty[[0, -1]] = 1.0     # the ends are the reference views themselves (pinned: their latents are fixed anyway)
    nothing = interpolate(model, views, steps=3, frames=4, seed=5, renders=renders, render_masks=empty, guidance=fusion)
    assert torch.equal(nothing, plain)
    full = interpolate(model, views, steps=3, frames=4, seed=5, renders=renders, render_masks=torch.ones(4, 32, 32),
                       guidance=fusion)
    assert (full[1:3] - plain[1:3]).abs().max() > 1e-3
