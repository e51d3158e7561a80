"""A small adaptive density control (clone / split / prune) in the spirit of 3DGS and gsplat's DefaultStrategy.

State is explicit (this dataclass) and separate from the optimiser loop; `step` edits the parameter dict and the
Adam state in place. Off by default in `fit_gaussians` (ReconX fits without it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .project import quat_to_rotmat


@dataclass
class Densifier:
    """Clone small / split large Gaussians whose projected means move a lot; prune transparent ones.

    grad_threshold: mean norm of d(loss)/d(means2d) in NDC units (pixels * size/2), as in 3DGS (2e-4).
    scale_threshold: fraction of the scene extent separating "small" (clone) from "large" (split).
    start, stop, every: steps between which, and how often, to act.  min_opacity: prune below this.
    """

    extent: float
    start: int = 100
    stop: int = 700
    every: int = 100
    grad_threshold: float = 2e-4
    scale_threshold: float = 0.01
    min_opacity: float = 0.005
    max_gaussians: int = 1_000_000
    grad_sum: Optional[torch.Tensor] = field(default=None, repr=False)
    count: Optional[torch.Tensor] = field(default=None, repr=False)

    def accumulate(self, means2d: torch.Tensor, radii: torch.Tensor, width: int, height: int) -> None:
        """Record one view's projected-mean gradients. means2d: (G, 2) with .grad; radii: (G, 2) int."""
        if means2d.grad is None:
            return
        g = means2d.grad.detach() * torch.tensor([width / 2, height / 2], device=means2d.device)
        seen = (radii > 0).all(-1)
        if self.grad_sum is None or self.grad_sum.shape[0] != g.shape[0]:
            self.grad_sum = torch.zeros(g.shape[0], device=g.device)
            self.count = torch.zeros(g.shape[0], device=g.device)
        self.grad_sum[seen] += g[seen].norm(dim=-1)
        self.count[seen] += 1

    @torch.no_grad()
    def step(self, step: int, params: dict, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> bool:
        """Densify/prune at the scheduled steps. params: name -> leaf tensor (first dim = Gaussians)."""
        if not (self.start <= step < self.stop and step % self.every == 0) or self.grad_sum is None:
            return False
        avg = self.grad_sum / self.count.clamp_min(1)
        big_grad = avg > self.grad_threshold
        if len(params["means"]) >= self.max_gaussians:
            big_grad[:] = False
        max_scale = params["log_scales"].exp().max(-1).values
        clone = big_grad & (max_scale <= self.scale_threshold * self.extent)
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
        self.grad_sum = self.count = None
        return True


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
