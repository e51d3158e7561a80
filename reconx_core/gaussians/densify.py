"""Adaptive density control (clone / split / prune) as a strategy object, in the manner of gsplat's DefaultStrategy.

The strategy is configuration only; its state lives in a separate `DensifyState` that `initialize_state` returns,
and the fit loop calls two hooks around the backward pass:

    state = strategy.initialize_state(extent)
    ...render...
    strategy.step_pre_backward(state, render_out)           # ask autograd to keep the screen-space gradients
    loss.backward()
    strategy.step_post_backward(state, params, optimizer, step, render_out, width, height, generator)

`step_post_backward` edits the parameter dict and the Adam state in place. Off by default in `fit_gaussians`
(ReconX fits without densification).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..geometry import quat_to_rotmat


@dataclass
class DensifyState:
    """What densification accumulates between its steps.

    extent: the scene extent (world units) that `scale_threshold` is a fraction of.
    grad_sum, count: (G,) running sum of projected-mean gradient norms and how many views saw each Gaussian.
    events: how many times the set of Gaussians changed.
    """

    extent: float
    grad_sum: Optional[torch.Tensor] = field(default=None, repr=False)
    count: Optional[torch.Tensor] = field(default=None, repr=False)
    events: int = 0


@dataclass
class DensifyStrategy:
    """Clone small / split large Gaussians whose projected means move a lot; prune transparent ones (3DGS).

    start, stop, every: densify at steps start <= step < stop with step % every == 0.
    grad_threshold: mean norm of d(loss)/d(means2d) in NDC units (pixels * size / 2), as in 3DGS (2e-4).
    scale_threshold: fraction of the scene extent separating "small" (cloned) from "large" (split).
    min_opacity: prune below this.  max_gaussians: no growth beyond this many.
    """

    start: int = 100
    stop: int = 700
    every: int = 100
    grad_threshold: float = 2e-4
    scale_threshold: float = 0.01
    min_opacity: float = 0.005
    max_gaussians: int = 1_000_000

    @classmethod
    def for_steps(cls, steps: int, **overrides) -> "DensifyStrategy":
        """The schedule `fit_gaussians(densify=True)` uses: every tenth of the run, from 10 % to 70 %."""
        every = max(1, steps // 10)
        return cls(**{"start": every, "stop": int(steps * 0.7), "every": every, **overrides})

    def initialize_state(self, extent: float) -> DensifyState:
        return DensifyState(extent=float(extent))

    def step_pre_backward(self, state: DensifyState, render_out) -> None:
        """Keep the gradient of the projected means (render_out.means2d[0], torch backend) for the statistics."""
        if render_out.means2d and render_out.means2d[0].requires_grad:
            render_out.means2d[0].retain_grad()

    @torch.no_grad()
    def step_post_backward(self, state: DensifyState, params: dict, optimizer: torch.optim.Optimizer, step: int,
                           render_out, width: int, height: int, generator: torch.Generator) -> bool:
        """Accumulate this view's gradient statistics, then clone/split/prune on the scheduled steps.

        params: name -> leaf tensor (first dim = Gaussians), the same tensors the optimiser's groups hold.
        Returns True when the set of Gaussians changed.
        """
        if render_out.means2d:
            self._accumulate(state, render_out.means2d[0], render_out.radii[0], width, height)
        if not (self.start <= step < self.stop and step % self.every == 0) or state.grad_sum is None:
            return False
        avg = state.grad_sum / state.count.clamp_min(1)
        big_grad = avg > self.grad_threshold
        if len(params["means"]) >= self.max_gaussians:
            big_grad[:] = False
        max_scale = params["log_scales"].exp().max(-1).values
        clone = big_grad & (max_scale <= self.scale_threshold * state.extent)
        split = big_grad & ~clone
        # New Gaussians: clones are copies; split children are sampled inside the parent, scales / 1.6.
        new = {k: v[clone] for k, v in params.items()}
        if split.any():
            scales = params["log_scales"][split].exp()
            R = quat_to_rotmat(params["quats"][split])
            for _ in range(2):
                offs = (R @ (torch.randn(scales.shape, generator=generator).to(scales) * scales)[..., None])[..., 0]
                child = {k: v[split] for k, v in params.items()}
                child["means"] = child["means"] + offs
                child["log_scales"] = (scales / 1.6).log()
                new = {k: torch.cat([new[k], child[k]]) for k in params}
        keep = ~split & (torch.sigmoid(params["opacity_logits"]) >= self.min_opacity)
        _rebuild(params, optimizer, keep, new)
        state.grad_sum = state.count = None
        state.events += 1
        return True

    @staticmethod
    def _accumulate(state: DensifyState, means2d: torch.Tensor, radii: torch.Tensor, width: int, height: int) -> None:
        """Record one view's projected-mean gradients. means2d: (G, 2) with .grad; radii: (G, 2) int."""
        if means2d.grad is None:
            return
        g = means2d.grad.detach() * torch.tensor([width / 2, height / 2], device=means2d.device)
        seen = (radii > 0).all(-1)
        if state.grad_sum is None or state.grad_sum.shape[0] != g.shape[0]:
            state.grad_sum = torch.zeros(g.shape[0], device=g.device)
            state.count = torch.zeros(g.shape[0], device=g.device)
        state.grad_sum[seen] += g[seen].norm(dim=-1)
        state.count[seen] += 1


def _rebuild(params: dict, optimizer: torch.optim.Optimizer, keep: torch.Tensor, new: dict) -> None:
    """Replace every parameter by cat(p[keep], new), carrying Adam moments (zeros for the new rows)."""
    for group in optimizer.param_groups:
        old = group["params"][0]
        name = group["name"]
        fresh = torch.cat([old.detach()[keep], new[name]]).requires_grad_(True)
        state = optimizer.state.pop(old, None)
        if state:
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = torch.cat([state[key][keep], torch.zeros_like(new[name])])
            optimizer.state[fresh] = state
        group["params"][0] = fresh
        params[name] = fresh
