"""Stage 1 of an LDM: train the AutoencoderKL on the same config, data stream, DDP and checkpoints.

Loss: L1 + L2 reconstruction plus a small KL term (Rombach et al. 2022 without the GAN and
LPIPS parts, which a flat synthetic set does not need). At the end the latent scaling factor
is measured (1 / std of the latents, as SD's 0.18215 was) and a model bundle is written:
<out>/bundle/{vae,text_encoder,tokenizer}, the layout `model.pretrained` reads.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from . import dist, faults, speed
from .checkpoint import TrainingState
from .config import Config, ConfigError
from .data.shapes import vocabulary
from .data.sources import build_source
from .data.stream import ShardedStream, end_workers, make_loader
from .data.transforms import ImageTransform, to_unit_range
from .metrics import Metrics
from .models import PRESET_DIR, write_demo_text_encoder
from .resume import architecture_from
from .run import Run, lr_at, step_generator
from .sharded_adamw import make_optimizer


class Reconstruction(torch.nn.Module):
    """Encode, draw z with the given noise, decode: one forward, so DDP sees the whole step."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, H, W], noise [B, C, h, w] -> (reconstruction [B, 3, H, W], KL [B])."""
        posterior = self.vae.encode(images).latent_dist
        return self.vae.decode(posterior.mean + posterior.std * noise).sample, posterior.kl()


def vae_config(name: str) -> dict:
    path = PRESET_DIR / f"vae_{name}.json"
    path = path if path.exists() else Path(name)
    if not path.is_file():
        raise ConfigError(f"model.vae_config: {name!r} is neither a builtin VAE config nor a config.json")
    return json.loads(path.read_text())


def no_tokens(captions: list[str]) -> torch.Tensor:
    """Stage 1 ignores captions: a [B, 1] placeholder keeps the stream's batch format."""
    return torch.zeros(len(captions), 1, dtype=torch.long)


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, batches, num_batches: int, device: torch.device) -> float:
    """1 / std of the posterior means over a few batches, so scaled latents have unit variance."""
    means = [vae.encode(to_unit_range(next(batches)["images"].to(device))).latent_dist.mean
             for _ in range(num_batches)]
    std = dist.all_reduce_mean(torch.cat(means).float().std().reshape(1))
    return float(1.0 / std.item())


def train_autoencoder(cfg: Config) -> Path:
    """Train the VAE until cfg.train.max_steps (resuming like the UNet trainer); -> the bundle folder."""
    # --- Run: process group, run folder, step counter (the UNet trainer's lifecycle and fault contract)
    run = Run(cfg, sample_grids=False)
    device = run.device

    # --- Model and optimizer (same init on every rank)
    torch.manual_seed(cfg.train.seed)
    vae = AutoencoderKL.from_config(vae_config(cfg.model.vae_config)).to(device).train()
    optimizer = make_optimizer(vae, cfg)  # as the UNet trainer's (train.shard_optimizer: no DDP)
    state = TrainingState("vae", vae, optimizer)
    source = build_source(cfg.data, is_main=dist.is_main())
    if source.latent:
        raise ConfigError("data.source: latents holds VAE latents; the autoencoder trains on images")
    run.resume(state, architecture_from({"vae": dict(vae.config)}), source.fingerprint())

    # --- Data and logging
    stream = ShardedStream(source, no_tokens, cfg.data.resolution, cfg.data.batch_per_gpu,
                           grad_accum=run.grad_accum, rank=run.rank, world_size=run.world, seed=cfg.data.seed,
                           start_step=run.start_step, transform=ImageTransform.from_config(cfg.data),
                           shuffle_window=cfg.data.shuffle_window)
    batches = iter(make_loader(stream, cfg.data.num_workers, prefetch_batches=4,
                               pin_memory=device.type == "cuda", worker_init_fn=faults.shield_worker))
    model = (Reconstruction(vae) if cfg.train.shard_optimizer == "on"
             else dist.wrap_ddp(Reconstruction(vae), grad_reduce=cfg.train.grad_reduce))
    metrics = Metrics(run.out_dir, device, 1, cfg.train.max_steps, run.global_batch, cfg.log.progress)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)

    # --- The loop: upkeep first, then one optimizer step
    while True:
        due = run.upkeep()
        if due.log:
            metrics.flush(run.step, lr_at(cfg.optim, run.step - 1, cfg.train.max_steps))
        if due.save:
            run.save(state, must_commit=due.done or due.stop is not None)
        if due.stop is not None:
            metrics.close()
            end_workers(batches)  # at once: freed with the stop, they would take 5 s each
            run.stop(due.stop)
        if due.done:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg.optim, run.step, cfg.train.max_steps)
        data_wait, bad, keys, step_loss = 0.0, [], [], 0.0
        for micro in range(run.grad_accum):
            t0 = time.perf_counter()
            batch = next(batches)
            data_wait, bad, keys = (data_wait + time.perf_counter() - t0, bad + batch["bad"],
                                    keys + batch["keys"])
            images = to_unit_range(batch["images"].to(device, non_blocking=True))  # uint8 -> [-1, 1],
            # on the device
            gen = step_generator(cfg.train.seed, run.step, run.rank, micro, device)
            noise = torch.randn(images.shape[0], vae.config.latent_channels, images.shape[2] // factor,
                                images.shape[3] // factor, generator=gen, device=device)
            with dist.accumulating(model, sync=micro == run.grad_accum - 1):
                recon, kl = model(images, noise)
                loss = (F.l1_loss(recon, images) + F.mse_loss(recon, images)
                        + cfg.model.vae_kl_weight * kl.mean())
                (loss / run.grad_accum).backward()
            step_loss = step_loss + loss.detach() / run.grad_accum
        grad_norm, _ = speed.grad_norms(vae, optimizer)
        ok = torch.isfinite(grad_norm)  # a non-finite step is skipped on the device, counted, limited
        faults.optimizer_step(optimizer, ok, speed.clip_divisor(grad_norm, cfg.optim.grad_clip))
        optimizer.zero_grad(set_to_none=True)
        run.count_step(~ok, bad, keys)
        metrics.add_step(torch.where(ok, step_loss, 0.0), torch.where(ok, grad_norm, 0.0), data_wait, bad,
                         skipped=~ok)
    run.close(metrics.close)

    # --- Export: the bundle that `model.pretrained` points at
    vae.eval()
    scaling = measure_scaling_factor(vae, batches, 8, device)
    bundle = run.out_dir / "bundle"
    if dist.is_main():
        vae.register_to_config(scaling_factor=scaling)
        vae.save_pretrained(bundle / "vae")
        write_demo_text_encoder(bundle, vocabulary(), seed=cfg.train.seed)
        print(f"wrote {bundle} (latent scaling factor {scaling:.4f})", flush=True)
    dist.barrier()
    return bundle
