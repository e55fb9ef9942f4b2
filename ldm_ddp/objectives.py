"""Training objectives: one micro-batch -> per-sample loss.

An objective draws what it needs (timesteps, noise) from the step's generator, runs the model, and returns
the per-sample loss to minimize and what the metrics bucket it by. Kinds: the v-prediction diffusion loss,
and Diffusion-DPO on preference pairs against a frozen reference (`make_objective` picks by
train.objective); the loop does not change.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .conditioning import map_cond
from .config import Config
from .schedule import NoiseSchedule, sample_noise


@dataclass
class Loss:
    """weighted [B]: the per-sample loss the step minimizes (its mean); plain [B]: the unweighted loss and
    t [B] its timesteps, for the metrics' loss by timestep bucket."""
    weighted: torch.Tensor
    plain: torch.Tensor
    t: torch.Tensor
    figures: dict[str, torch.Tensor] = field(default_factory=dict)  # [B] each, averaged per log interval


def make_objective(cfg: Config, schedule: NoiseSchedule, unet, autocast: bool):
    """The objective of train.objective; for dpo, `unet` holds the starting weights (before any resume):
    they become the frozen reference."""
    d = cfg.diffusion
    if cfg.train.objective == "dpo":
        source, weights = cfg.model.unet_init, cfg.model.init_weights
        reference = {"path": source, "weights": weights if source.endswith(".safetensors") else "",
                     "sha256": tensors_sha256(unet)}
        return DiffusionDPOLoss(schedule, unet, cfg.train.dpo_beta, autocast, reference)
    return VPredictionLoss(schedule, d.min_snr_gamma, d.offset_noise)


class VPredictionLoss:
    """The v-prediction diffusion loss (Salimans & Ho 2022): x_t = sqrt(alphas_cumprod) x_0 + sqrt(1 -
    alphas_cumprod) noise, the UNet predicts v_target = sqrt(alphas_cumprod) noise - sqrt(1 - alphas_cumprod)
    x_0, loss = ||v_pred - v_target||^2 per sample, optionally weighted by min-SNR-gamma
    (Hang et al. 2023)."""

    images_per_sample = 1  # images a sample of the batch holds
    flops_factor = 1.0  # UNet FLOPs of a sample against one image's forward and backward
    identity: dict = {}  # nothing a resume must find unchanged beyond the run's own checks
    reference = None  # no frozen model of its own (Diffusion-DPO's reference; speed.prepare_unet compiles it)

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


def tensors_sha256(module: torch.nn.Module) -> str:
    """sha256 of a module's tensors (names, dtypes, shapes and bytes, in name order): which weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class DiffusionDPOLoss:
    """Diffusion-DPO (Wallace et al. 2023) on preference pairs. The batch's latents are [2B]: B preferred
    images, then their B rejected ones; each pair shares its caption, timestep and noise. With per-image
    v-prediction errors err (the trained model) and ref (the frozen reference, the starting weights):

        inside = -(beta / 2) * ((err_w - err_l) - (ref_w - ref_l)),   loss = -log sigmoid(inside)

    inside > 0 where the model prefers the preferred image more than the reference does (the implicit
    reward accuracy). The reference is held in bf16 under bf16 autocast (fp32 otherwise), never updated and
    never saved: a checkpoint records where it came from and the sha256 of its fp32 tensors, and a resume
    against other weights is refused.
    """

    images_per_sample = 2
    flops_factor = 2 + 2 / 3  # two images forward and backward, and two reference forwards (a third each)

    def __init__(self, schedule: NoiseSchedule, start, beta: float, autocast: bool, reference: dict):
        """`start`: the UNet at its starting weights (copied: the reference); `reference`: where they came
        from ({"path", "weights", "sha256"}), for the checkpoint."""
        self.schedule, self.beta = schedule, beta
        self.identity = {"dpo_reference": reference}
        dtype = torch.bfloat16 if autocast else torch.float32
        self.reference = copy.deepcopy(start).to(dtype).eval().requires_grad_(False)
        # The forward the loss calls: the reference, compiled by speed.prepare_unet with train.compile=full
        # (the live samples draw with the eager module: their shapes would compile graphs of their own)
        self.run_reference = self.reference

    def __call__(self, model, latents: torch.Tensor, cond: dict, generator: torch.Generator,
                 autocast: bool) -> Loss:
        """latents [2B, C, h, w] (preferred, then rejected), cond: the B captions' conditioning kwargs -> Loss
        [B] per pair; plain is the preferred image's diffusion loss. Draws t, then the noise, per pair."""
        device, b = latents.device, len(latents) // 2
        t = torch.randint(0, self.schedule.num_train_timesteps, (b,), generator=generator, device=device)
        noise = sample_noise((b, *latents.shape[1:]), generator, device, 0.0)
        t2, noise2 = torch.cat([t, t]), torch.cat([noise, noise])
        cond2 = map_cond(lambda c: torch.cat([c, c]), cond)
        x_t = self.schedule.add_noise(latents, noise2, t2)
        v_target = self.schedule.v_target(latents, noise2, t2)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            v_pred = model(x_t, t2, **cond2).sample
            with torch.no_grad():
                v_ref = self.run_reference(x_t, t2, **cond2).sample
        err = F.mse_loss(v_pred.float(), v_target, reduction="none").mean(dim=(1, 2, 3))
        ref = F.mse_loss(v_ref.float(), v_target, reduction="none").mean(dim=(1, 2, 3))
        model_diff, ref_diff = err[:b] - err[b:], ref[:b] - ref[b:]
        inside = -0.5 * self.beta * (model_diff - ref_diff)
        figures = {"dpo_reward_accuracy": (inside > 0).float(), "dpo_reward_margin": inside.detach(),
                   "dpo_model_minus_reference": (err - ref).detach().view(2, b).mean(0)}
        return Loss(-F.logsigmoid(inside), err[:b].detach(), t, figures)
