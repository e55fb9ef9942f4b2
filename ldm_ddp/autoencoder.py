"""Stage 1 of an LDM: train the AutoencoderKL on the same config, data stream, DDP and checkpoints.

Loss: L1 + L2 reconstruction plus a small KL term (Rombach et al. 2022 without the GAN and
LPIPS parts, which a flat synthetic set does not need). At the end the latent scaling factor
is measured (1 / std of the latents, as SD's 0.18215 was) and a model bundle is written:
<out>/bundle/{vae,text_encoder,tokenizer}, the layout `model.pretrained` reads.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from . import checkpoint, dist, faults
from .config import Config, ConfigError, resolve_batch
from .data.shapes import vocabulary
from .data.sources import build_source
from .data.stream import ShardedStream, make_loader
from .data.transforms import ImageTransform, to_unit_range
from .metrics import Metrics
from .models import PRESET_DIR, write_demo_text_encoder
from .resume import architecture_from, check_resumable, record_resume, resume_point
from .train_loop import lr_at, step_generator


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
    # --- Distributed setup and run folder
    device = dist.init(cfg.train.device, cfg.train.startup_timeout_s)
    rank, world = dist.rank(), dist.world_size()
    grad_accum, global_batch = resolve_batch(cfg, world)
    preemption = faults.Preemption()  # SIGTERM / SIGUSR1: save at the next step and exit 75, as train_loop
    out_dir, ckpt_dir = Path(cfg.train.out_dir), Path(cfg.train.out_dir) / "checkpoints"
    if dist.is_main():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.toml").write_text(cfg.to_toml())

    # --- Model and optimizer (same init on every rank)
    torch.manual_seed(cfg.train.seed)
    vae = AutoencoderKL.from_config(vae_config(cfg.model.vae_config)).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    names = {id(p): n for n, p in vae.named_parameters()}
    source = build_source(cfg.data)
    step = 0
    arch = architecture_from({"vae": dict(vae.config)})
    resume_path = resume_point(cfg, ckpt_dir)
    if resume_path is not None:
        tensors, meta = checkpoint.load_checkpoint(resume_path)
        # The same refusals as the UNet trainer's (architecture, global batch, data fingerprint and seed).
        changes = check_resumable(meta, cfg, arch, global_batch, source.fingerprint(), resume_path)
        vae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("vae.")})
        checkpoint.load_optimizer_tensors(optimizer, dict(vae.named_parameters()), tensors, meta["optim"],
                                          live_hyperparameters=True)
        step = int(meta["step"])
        record_resume(out_dir, resume_path, step, changes)
    start_step = step
    if dist.is_main():
        checkpoint.set_aside_after(ckpt_dir, start_step)

    # --- Data and logging
    stream = ShardedStream(source, no_tokens, cfg.data.resolution, cfg.data.batch_per_gpu, grad_accum,
                           rank, world, cfg.data.seed, start_step, ImageTransform.from_config(cfg.data),
                           cfg.data.shuffle_window)
    batches = iter(make_loader(stream, cfg.data.num_workers, cfg.data.prefetch_batches, device.type == "cuda",
                               faults.shield_worker))
    model = dist.wrap_ddp(Reconstruction(vae), cfg.train.ddp_static_graph, cfg.train.ddp_bucket_cap_mb)
    metrics = Metrics(out_dir, device, 1, cfg.train.max_steps, global_batch, cfg.log.progress)

    def save() -> None:
        if dist.is_main():
            tensors = {f"vae.{k}": v for k, v in vae.state_dict().items()}
            optim_tensors, groups = checkpoint.optimizer_tensors(optimizer, names)
            meta = {"samples_seen": step * global_batch, "config": cfg.to_dict(), "optim": groups, "architecture": arch,
                    "world_size": world, "versions": checkpoint.versions(),
                    "data": {"samples_seen": step * global_batch, "seed": cfg.data.seed,
                             "global_batch": global_batch, "fingerprint": source.fingerprint(),
                             "shuffle_window": cfg.data.shuffle_window}}
            path = checkpoint.save_checkpoint(ckpt_dir, step, {**tensors, **optim_tensors}, meta)
            checkpoint.prune_checkpoints(ckpt_dir, cfg.ckpt.keep, just_saved=path)
        dist.barrier()

    # --- The loop: upkeep first, then one optimizer step
    while True:
        done = step >= cfg.train.max_steps
        if step == start_step + 1:  # the first step is done: a peer that dies or hangs stops us soon
            dist.set_timeout(cfg.train.collective_timeout_s)
        stop = preemption.agreed(step, checkpoint.checkpoint_path(ckpt_dir, step))
        if step > start_step and (step % cfg.log.every == 0 or done or stop is not None):
            metrics.flush(step, lr_at(cfg.optim, step - 1, cfg.train.max_steps))
        if (step > start_step and (step % cfg.ckpt.every == 0 or done)) or stop is not None:
            save()
        if stop is not None:
            metrics.close()
            preemption.ignore()
            raise stop
        if done:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg.optim, step, cfg.train.max_steps)
        data_wait, step_loss = 0.0, 0.0
        for micro in range(grad_accum):
            t0 = time.perf_counter()
            images = next(batches)["images"].to(device, non_blocking=True)
            data_wait += time.perf_counter() - t0
            images = to_unit_range(images)  # uint8 pixels -> [-1, 1], on the device
            gen = step_generator(cfg.train.seed, step, rank, micro, device)
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            noise = torch.randn(images.shape[0], vae.config.latent_channels, images.shape[2] // factor,
                                images.shape[3] // factor, generator=gen, device=device)
            sync = micro == grad_accum - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                recon, kl = model(images, noise)
                loss = F.l1_loss(recon, images) + F.mse_loss(recon, images) + cfg.model.vae_kl_weight * kl.mean()
                (loss / grad_accum).backward()
            step_loss = step_loss + loss.detach() / grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.optim.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        metrics.add_step(step_loss, grad_norm, data_wait, [])
    metrics.close()

    # --- Export: the bundle that `model.pretrained` points at
    vae.eval()
    scaling = measure_scaling_factor(vae, batches, 8, device)
    bundle = out_dir / "bundle"
    if dist.is_main():
        vae.register_to_config(scaling_factor=scaling)
        vae.save_pretrained(bundle / "vae")
        write_demo_text_encoder(bundle, vocabulary(), seed=cfg.train.seed)
        print(f"wrote {bundle} (latent scaling factor {scaling:.4f})", flush=True)
    dist.barrier()
    preemption.restore()
    return bundle
