"""`train(cfg)`: the training loop, top to bottom.

Setup blocks first (distributed, models, optimizer, resume, data, logging), then `while True:`
with upkeep (log, sample, save) before compute, so the final save needs no special case.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint, dist
from .config import Config, ConfigError, OptimConfig, resolve_batch
from .data.sources import build_source
from .data.stream import ShardedStream, make_loader
from .data.transforms import ImageTransform
from .ema import EMA
from .metrics import Metrics, start_wandb
from .models import build_unet, load_frozen
from .sampling import generate, make_grid
from .schedule import NoiseSchedule, sample_noise


def lr_at(cfg: OptimConfig, step: int, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then constant or cosine."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def step_generator(seed: int, step: int, rank: int, micro: int, device: torch.device) -> torch.Generator:
    """The generator for one micro-batch's random draws: a pure function of (seed, step, rank, micro)."""
    state = np.random.SeedSequence([seed, step, rank, micro]).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state) & (2**63 - 1))


def unet_param_names(unet: torch.nn.Module) -> dict:
    return {id(p): n for n, p in unet.named_parameters()}


def resume_point(cfg: Config, ckpt_dir: Path) -> Path | None:
    """The checkpoint to resume from (chosen on rank 0, agreed by all ranks), or None."""
    if cfg.ckpt.resume == "none":
        return None
    if cfg.ckpt.resume != "auto":
        return Path(cfg.ckpt.resume)
    step = -1
    if dist.is_main():
        checkpoint.remove_stale_temp_files(ckpt_dir) if ckpt_dir.exists() else None
        path = checkpoint.find_latest_valid(ckpt_dir) if ckpt_dir.exists() else None
        step = int(checkpoint.read_metadata(path)["step"]) if path else -1
    step = dist.broadcast_int(step)
    return checkpoint.checkpoint_path(ckpt_dir, step) if step >= 0 else None


def check_resumable(meta: dict, global_batch: int, fingerprint: str, path: Path) -> None:
    """Refuse a checkpoint whose data order cannot continue (one line naming the difference)."""
    data = meta["data"]
    if data["global_batch"] != global_batch:
        raise ConfigError(f"{path.name}: global batch {data['global_batch']} in the checkpoint, {global_batch} now "
                          "(train.global_batch must match to continue the same sample sequence)")
    if data["fingerprint"] != fingerprint:
        raise ConfigError(f"{path.name}: data fingerprint {data['fingerprint']} in the checkpoint, {fingerprint} now")


def train(cfg: Config) -> dict:
    """Train until cfg.train.max_steps; resumes from the newest valid checkpoint. -> last metrics."""
    # --- Distributed setup and run folder -------------------------------------------------------
    device = dist.init(cfg.train.device)
    rank, world = dist.rank(), dist.world_size()
    grad_accum, global_batch = resolve_batch(cfg, world)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    out_dir, ckpt_dir = Path(cfg.train.out_dir), Path(cfg.train.out_dir) / "checkpoints"
    if dist.is_main():
        (out_dir / "samples").mkdir(parents=True, exist_ok=True)
        ckpt_dir.mkdir(exist_ok=True)
        (out_dir / "config.toml").write_text(cfg.to_toml())
    use_amp = cfg.train.precision == "bf16"
    on_cuda = device.type == "cuda"

    # --- Models: frozen VAE + text encoder, trainable UNet (same init on every rank) ----------------
    frozen = load_frozen(cfg.model.pretrained, cfg.model.frozen_dtype, device)
    if cfg.data.resolution % frozen.downsample:
        raise ConfigError(f"data.resolution: {cfg.data.resolution} is not a multiple of the VAE's "
                          f"downsampling factor {frozen.downsample}")
    torch.manual_seed(cfg.train.seed)
    unet = build_unet(cfg.model, cfg.data.resolution // frozen.downsample,
                      frozen.text_encoder.config.hidden_size).to(device)
    if on_cuda and cfg.train.channels_last:
        unet.to(memory_format=torch.channels_last)
    schedule = NoiseSchedule(cfg.diffusion.num_train_timesteps, cfg.diffusion.beta_schedule,
                             cfg.diffusion.beta_start, cfg.diffusion.beta_end, cfg.diffusion.zero_terminal_snr)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
                                  fused=on_cuda and cfg.optim.fused)
    ema = EMA(unet, cfg.ema)
    uncond = frozen.encode_prompts(frozen.tokenize([""]))  # [1, L, D]: the dropped-caption context
    sampler_unet = copy.deepcopy(unet).eval().requires_grad_(False)  # live samples; the train copy stays put

    # --- Resume: weights, optimizer moments, EMA and the step; data and draws follow from the step --
    source = build_source(cfg.data)
    step = 0
    resume_path = resume_point(cfg, ckpt_dir)
    if resume_path is not None:
        tensors, meta = checkpoint.load_checkpoint(resume_path)
        check_resumable(meta, global_batch, source.fingerprint(), resume_path)
        unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
        ema.load(tensors, meta["ema"])
        checkpoint.load_optimizer_tensors(optimizer, dict(unet.named_parameters()), tensors, meta["optim"])
        step = int(meta["step"])
        del tensors
        if dist.is_main():
            print(f"resumed from {resume_path} at step {step}", flush=True)
    start_step = step

    # --- Data: this rank's slice of the global order, from the resumed step on ---------------------
    stream = ShardedStream(source, frozen.tokenize, cfg.data.resolution, cfg.data.batch_per_gpu, grad_accum,
                           rank, world, cfg.data.seed, start_step, ImageTransform.from_config(cfg.data))
    batches = iter(make_loader(stream, cfg.data.num_workers, cfg.data.prefetch_batches, pin_memory=on_cuda))

    # --- Training wrapper and logging ---------------------------------------------------------------
    model = dist.wrap_ddp(unet)
    if cfg.train.compile:
        model = torch.compile(model)
    wandb_run = start_wandb(cfg.log.wandb, out_dir, cfg.log.wandb_project,
                            cfg.log.run_name or out_dir.name, cfg.to_dict())
    metrics = Metrics(out_dir, device, schedule.num_train_timesteps, cfg.train.max_steps, global_batch,
                      cfg.log.progress, wandb_run)
    last_record = None

    def save() -> None:
        if dist.is_main():
            tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
            tensors.update(ema.state_tensors())
            optim_tensors, groups = checkpoint.optimizer_tensors(optimizer, unet_param_names(unet))
            tensors.update(optim_tensors)
            meta = {"samples_seen": step * global_batch, "config": cfg.to_dict(), "optim": groups,
                    "lr_schedule": {**vars(cfg.optim), "max_steps": cfg.train.max_steps, "lr_now": lr_at(
                        cfg.optim, step, cfg.train.max_steps)},
                    "ema": ema.state_meta(), "world_size": world, "versions": checkpoint.versions(),
                    "data": {"samples_seen": step * global_batch, "seed": cfg.data.seed, "global_batch": global_batch,
                             "fingerprint": source.fingerprint(), "source": cfg.data.source}}
            path = checkpoint.save_checkpoint(ckpt_dir, step, tensors, meta)
            checkpoint.prune_checkpoints(ckpt_dir, cfg.ckpt.keep, just_saved=path)
        dist.barrier()  # every rank leaves only once the checkpoint is committed

    def sample_grid() -> None:
        """Live samples, prompts split across ranks (seed fixed per prompt, so any world size draws the
        same grid), gathered on rank 0. Every rank samples about len(prompts) / world, so none waits long."""
        prompts = cfg.sample.prompts
        per_rank = math.ceil(len(prompts) / world)
        # This rank's prompts; the last rank pads with repeats of the final prompt so the gather is even.
        mine = [min(i, len(prompts) - 1) for i in range(rank * per_rank, (rank + 1) * per_rank)]
        if cfg.sample.use_ema:
            ema.copy_to(sampler_unet)
        else:
            sampler_unet.load_state_dict(unet.state_dict())
        images = generate(sampler_unet, frozen, schedule, [prompts[i] for i in mine],
                          [cfg.sample.seed + i for i in mine], cfg.sample.steps, cfg.sample.cfg_scale,
                          cfg.sample.guidance_rescale, cfg.sample.spacing, autocast=use_amp)
        images = dist.all_gather_tensor(images.to(device))[:len(prompts)].cpu()
        if dist.is_main():
            path = out_dir / "samples" / f"step_{step:07d}.png"
            make_grid(images, nrow=math.ceil(math.sqrt(len(images)))).save(path)
            metrics.log_image(step, path, " | ".join(prompts))

    # --- The loop: upkeep first, then one optimizer step ----------------------------------------------
    while True:
        done = step >= cfg.train.max_steps
        if step > start_step and (step % cfg.log.every == 0 or done):
            last_record = metrics.flush(step, lr_at(cfg.optim, step - 1, cfg.train.max_steps)) or last_record
        if step > start_step and cfg.sample.every and (step % cfg.sample.every == 0 or done):
            sample_grid()
        if step > start_step and (step % cfg.ckpt.every == 0 or done):
            save()
        if done:
            break

        lr = lr_at(cfg.optim, step, cfg.train.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        data_wait, bad, step_loss = 0.0, [], 0.0
        for micro in range(grad_accum):
            t0 = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - t0
            bad += batch["bad"]
            gen = step_generator(cfg.train.seed, step, rank, micro, device)
            images = batch["images"].to(device, non_blocking=True)
            latents = frozen.encode_images(images, gen)
            context = frozen.encode_prompts(batch["input_ids"])
            drop = torch.rand(len(images), generator=gen, device=device) < cfg.train.caption_dropout
            context = torch.where(drop[:, None, None], uncond, context)
            t = torch.randint(0, schedule.num_train_timesteps, (len(images),), generator=gen, device=device)
            noise = sample_noise(latents.shape, gen, device, cfg.diffusion.offset_noise)
            x_t, v_target = schedule.add_noise(latents, noise, t), schedule.v_target(latents, noise, t)
            # Gradients are all-reduced only on the last micro-batch (DDP's no_sync on the others).
            sync = micro == grad_accum - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    v_pred = model(x_t, t, context).sample
                loss_per_sample = F.mse_loss(v_pred.float(), v_target, reduction="none").mean(dim=(1, 2, 3))
                loss = (loss_per_sample * schedule.loss_weights(t, cfg.diffusion.min_snr_gamma or None)).mean()
                (loss / grad_accum).backward()
            step_loss = step_loss + loss.detach() / grad_accum
            metrics.add_micro_batch(loss_per_sample, t)
        grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.optim.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if ema.wants_update(step):
            ema.update(unet)
        elif step < cfg.ema.start_step:
            ema.copy_from(unet)
        metrics.add_step(step_loss, grad_norm, data_wait, bad)

    metrics.close()
    dist.barrier()
    return last_record or {}
