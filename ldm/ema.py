"""The exponential moving average of the weights a training run trains: what it writes as the model."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


@torch.no_grad()
def lerp_towards(shadow: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """shadow <- decay * shadow + (1 - decay) * params, in place, each pair in the shadow's dtype."""
    torch._foreach_lerp_(shadow, [p.detach().to(s.dtype) for s, p in zip(shadow, params)], 1.0 - decay)


class EMA:
    """Exponential moving average of a module's parameters, kept in float32 whatever the module's dtype.

    After each optimizer step, update(): shadow = d * shadow + (1 - d) * weights with d = 0 (a plain copy) for
    the first `start_step` + 1 updates, then d = min(decay, (1 + n) / (10 + n)) after n further updates when
    `warmup` (CompVis' LitEma; the schedule of diffusers' EMAModel), else d = decay.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True, start_step: int = 0):
        self.decay, self.warmup, self.start_step, self.updates = decay, warmup, start_step, 0
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    def current_decay(self) -> float:
        n = self.updates - self.start_step - 1
        if n <= 0:
            return 0.0
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def update(self, model: nn.Module) -> None:
        self.updates += 1
        params = dict(model.named_parameters())
        names = list(self.shadow)
        lerp_towards([self.shadow[n] for n in names], [params[n] for n in names], self.current_decay())

    @contextlib.contextmanager
    def applied_to(self, model: nn.Module):
        """Inside the block the module holds the EMA weights; its own come back after."""
        params = dict(model.named_parameters())
        saved = {n: params[n].detach().clone() for n in self.shadow}
        with torch.no_grad():
            for n, value in self.shadow.items():
                params[n].copy_(value)
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, value in saved.items():
                    params[n].copy_(value)

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "start_step": self.start_step,
            "updates": self.updates,
            "shadow": self.shadow,
        }

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.warmup, self.start_step, self.updates = (
            state["decay"],
            state["warmup"],
            state["start_step"],
            state["updates"],
        )
        for n, value in state["shadow"].items():
            self.shadow[n].copy_(value)
