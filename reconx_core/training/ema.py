"""Exponential moving average of the trained parameters (optional; the exported weights are the average's)."""

from __future__ import annotations

import contextlib
from typing import Iterable, List

import torch


class EMA:
    """shadow = decay * shadow + (1 - decay) * param after every optimizer step, in float32.

    params: the trained parameters (their order is the state's order). state_dict / load_state_dict make it a
    checkpointable object for accelerate (`register_for_checkpointing`).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float):
        self.params: List[torch.nn.Parameter] = list(params)
        self.decay = float(decay)
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self):
        """Within the block the parameters hold the average; their own values come back afterwards."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for v, p in zip(saved, self.params):
                    p.copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow):
            raise ValueError(f"EMA state has {len(state['shadow'])} tensors, the run trains {len(self.shadow)}")
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        self.shadow = [s.to(p.device, torch.float32) for s, p in zip(state["shadow"], self.params)]
