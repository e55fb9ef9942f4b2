"""Training objectives: one micro-batch -> per-sample loss.

An objective draws what it needs (timesteps, noise) from the step's generator, runs the model, and returns
the per-sample loss to minimize and what the metrics bucket it by. A new objective (e.g. Diffusion-DPO on
image pairs with a frozen reference) is a new class here with the same call; the loop does not change.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .schedule import NoiseSchedule, sample_noise


@dataclass
class Loss:
    """weighted [B]: the per-sample loss the step minimizes (its mean); plain [B]: the unweighted loss and
    t [B] its timesteps, for the metrics' loss by timestep bucket."""
    weighted: torch.Tensor
    plain: torch.Tensor
    t: torch.Tensor


class VPredictionLoss:
    """The v-prediction diffusion loss (Salimans & Ho 2022): x_t = sqrt(alphas_cumprod) x_0 + sqrt(1 -
    alphas_cumprod) noise, the UNet predicts v_target = sqrt(alphas_cumprod) noise - sqrt(1 - alphas_cumprod)
    x_0, loss = ||v_pred - v_target||^2 per sample, optionally weighted by min-SNR-gamma
    (Hang et al. 2023)."""

    def __init__(self, schedule: NoiseSchedule, min_snr_gamma: float = 0.0, offset_noise: float = 0.0):
        self.schedule, self.min_snr_gamma, self.offset_noise = schedule, min_snr_gamma or None, offset_noise

    def __call__(self, model, latents: torch.Tensor, cond: dict, generator: torch.Generator,
                 autocast: bool) -> Loss:
        """latents [B, C, h, w] fp32, cond: the UNet's conditioning kwargs -> Loss.
        Draws t, then the noise."""
        device = latents.device
        t = torch.randint(0, self.schedule.num_train_timesteps, (len(latents),), generator=generator,
                          device=device)
        noise = sample_noise(latents.shape, generator, device, self.offset_noise)
        x_t = self.schedule.add_noise(latents, noise, t)
        v_target = self.schedule.v_target(latents, noise, t)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            v_pred = model(x_t, t, **cond).sample
        plain = F.mse_loss(v_pred.float(), v_target, reduction="none").mean(dim=(1, 2, 3))
        return Loss(plain * self.schedule.loss_weights(t, self.min_snr_gamma), plain, t)
