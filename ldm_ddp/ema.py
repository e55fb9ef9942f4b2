"""Exponential moving average of the UNet weights: an fp32 shadow updated with foreach ops."""
from __future__ import annotations

import torch

from .config import EMAConfig


class EMA:
    """fp32 shadow copies of a module's parameters (buffers are copied, not averaged)."""

    def __init__(self, module: torch.nn.Module, cfg: EMAConfig):
        self.cfg = cfg
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.shadow = [params[n].detach().float().clone() for n in self.names]
        self.num_updates = 0  # EMA updates applied so far (drives the decay warmup)

    def decay(self) -> float:
        """Decay for the next update; with warmup min(decay, (1 + n) / (10 + n)) (as in diffusers' EMAModel)."""
        if not self.cfg.warmup:
            return self.cfg.decay
        n = self.num_updates
        return min(self.cfg.decay, (1 + n) / (10 + n))

    def wants_update(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based count of updates done) updates the EMA."""
        return step >= self.cfg.start_step and step % self.cfg.update_every == 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * weights, or a copy before ema.start_step."""
        params = dict(module.named_parameters())
        current = [params[n].detach().float() for n in self.names]  # no copy for fp32; lerp needs one dtype
        # lerp_(w, 1 - d) == d * shadow + (1 - d) * w, in one foreach kernel per dtype group.
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay())
        self.num_updates += 1

    @torch.no_grad()
    def copy_from(self, module: torch.nn.Module) -> None:
        """Reset the shadow to the module's weights (before ema.start_step)."""
        params = dict(module.named_parameters())
        torch._foreach_copy_(self.shadow, [params[n].detach() for n in self.names])

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        """Write the shadow into `module` (e.g. a sampling copy of the UNet)."""
        params = dict(module.named_parameters())
        for name, value in zip(self.names, self.shadow):
            params[name].copy_(value)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"ema.{n}": t for n, t in zip(self.names, self.shadow)}

    def state_meta(self) -> dict:
        return {"num_updates": self.num_updates, "decay": self.cfg.decay, "warmup": self.cfg.warmup,
                "update_every": self.cfg.update_every, "start_step": self.cfg.start_step}

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        missing = [n for n in self.names if f"ema.{n}" not in tensors]
        if missing:
            raise KeyError(f"checkpoint lacks EMA weights for {missing[0]} (and {len(missing) - 1} more)")
        for name, value in zip(self.names, self.shadow):
            value.copy_(tensors[f"ema.{name}"])
        self.num_updates = int(meta["num_updates"])
