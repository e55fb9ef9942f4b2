"""`train(cfg)`: the training loop of the UNet, top to bottom.

Setup blocks first (run, models, resume, data, fast path, logging), then `while True:` with upkeep (log,
sample, save) before compute, so the final save needs no special case. What a model is conditioned on
(conditioning.py) and what it minimizes (objectives.py) are objects the step calls; the run's lifecycle
(start, resume, agreement on stops, saves and their error policy) is run.py's.
"""
from __future__ import annotations

import time

import torch

from . import dist, faults, speed
from .checkpoint import TrainingState
from .conditioning import make_conditioning
from .config import Config, ConfigError
from .data.buckets import resolve_buckets
from .data.latents import cache_fingerprint
from .data.sources import build_source
from .data.stream import ShardedStream, end_workers, make_loader
from .data.transforms import ImageTransform
from .ema import EMA
from .metrics import Metrics, count_train_flops, start_tensorboard, start_wandb
from .models import add_lora, build_unet, load_frozen
from .objectives import make_objective
from .resume import architecture
from .run import Run, lr_at, step_generator
from .sampling import LiveSamples
from .schedule import NoiseSchedule
from .sharded_adamw import make_optimizer
from .validation import Validation


def train(cfg: Config) -> dict:
    """Train until cfg.train.max_steps; resumes from the newest valid checkpoint. -> last metrics."""
    # --- Run: process group, run folder, step counter ----------------------------------------------------
    run = Run(cfg)
    device, autocast = run.device, cfg.train.precision == "bf16"

    # --- Models: frozen VAE + text encoder, trainable UNet (same init on every rank) ------------------------
    frozen = load_frozen(cfg.model.pretrained, cfg.model.frozen_dtype, device, cfg.model.kind)
    if cfg.data.resolution % frozen.downsample:
        raise ConfigError(f"data.resolution: {cfg.data.resolution} is not a multiple of the VAE's "
                          f"downsampling factor {frozen.downsample}")
    buckets = resolve_buckets(cfg.data.buckets, cfg.data.resolution, 8 * frozen.downsample)  # None: square
    conditioning = make_conditioning(frozen, cfg.train.caption_dropout)
    square = (cfg.data.resolution, cfg.data.resolution)  # (width, height) px
    torch.manual_seed(cfg.train.seed)
    unet = build_unet(cfg.model, cfg.data.resolution // frozen.downsample, conditioning.width, device,
                      conditioning.pooled_width)
    d = cfg.diffusion
    schedule = NoiseSchedule(d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end,
                             d.zero_terminal_snr)
    objective = make_objective(cfg, schedule, unet, autocast)  # dpo: the reference is the UNet as it starts
    if cfg.model.lora_rank:  # only the adapters train (and have moments and an EMA)
        add_lora(unet, cfg.model.lora_rank)
    # Fused AdamW (CPU and GPU) skips a non-finite step on the device,
    # without a host sync (faults.optimizer_step).
    # train.shard_optimizer: each rank updates 1/world of the weights (sharded_adamw.py; no DDP then).
    optimizer = make_optimizer(unet, cfg)
    ema = EMA(unet, cfg.ema)
    state = TrainingState("unet", unet, optimizer, ema)
    # for MFU; before the DDP wrap
    per_sample = objective.images_per_sample  # 2 for preference pairs
    flops_per_image = (count_train_flops(unet, conditioning.unconditional(1, square), autocast)
                       * objective.flops_factor / per_sample)
    samples = LiveSamples(unet, frozen, schedule, cfg.sample, run.out_dir, autocast, conditioning,
                          reference=objective.reference)

    # --- Resume: weights, optimizer moments, EMA and the step; data and draws follow from the step ----------
    source = build_source(cfg.data, is_main=dist.is_main())
    if source.latent:  # a cache made for another VAE, tokenizer or image rule is refused
        source.check_matches(cache_fingerprint(frozen, cfg.data, cfg.model.frozen_dtype))
    if source.pairs != (per_sample == 2):  # a latent cache of pairs (or not) said so only now
        raise ConfigError(f"data.source: {source.where()} {'holds' if source.pairs else 'does not hold'} "
                          f"preference pairs, and train.objective is {cfg.train.objective}")
    run.resume(state, architecture(unet, frozen, cfg.model.lora_rank), source.fingerprint(),
               objective.identity)

    # --- Data: this rank's slice of the global order, from the resumed step on -----------------------------
    stream = ShardedStream(source, conditioning.tokenize, cfg.data.resolution, cfg.data.batch_per_gpu,
                           grad_accum=run.grad_accum, rank=run.rank, world_size=run.world, seed=cfg.data.seed,
                           start_step=run.start_step, transform=ImageTransform.from_config(cfg.data),
                           shuffle_window=cfg.data.shuffle_window, buckets=buckets)
    if dist.is_main() and buckets:
        print(stream.bucket_lines(), flush=True)
    # faults.shield_worker: torchrun's and SLURM's SIGTERM reach the workers too; only the parent acts on it.
    batches = iter(make_loader(stream, cfg.data.num_workers, prefetch_batches=4,
                               pin_memory=device.type == "cuda", worker_init_fn=faults.shield_worker))

    # --- Fast path and logging ------------------------------------------------------------------------------
    if cfg.data.source != "latents":  # the latent cache encodes nothing
        speed.compile_vae_encoder(frozen.vae, device, cfg.train.compile_vae,
                                  cfg.data.batch_per_gpu * per_sample, square, shapes=len(buckets or [None]))
    if cfg.train.compile_text_encoder == "on":
        speed.compile_text_encoders(frozen)
    model = speed.prepare_unet(unet, cfg, device, run.world,
                               conditioning.unconditional(cfg.data.batch_per_gpu * per_sample, square),
                               autocast, objective, shapes=len(buckets or [None]))
    metrics = Metrics(run.out_dir, device, schedule.num_train_timesteps, cfg.train.max_steps,
                      run.global_batch * per_sample, cfg.log.progress,
                      wandb_run=start_wandb(cfg.log.wandb, run.out_dir, cfg.to_dict()),
                      tensorboard=start_tensorboard(cfg.log.tensorboard, run.out_dir, run.start_step,
                                                    cfg.to_toml()),
                      train_flops_per_image=flops_per_image, wandb_checkpoints=cfg.log.wandb_checkpoints,
                      divergence_ratio=cfg.log.divergence_ratio)
    validation = (Validation(cfg, frozen, conditioning, schedule, samples.unet, device, autocast)
                  if cfg.val.every else None)  # held-out loss on the sampling copy of the UNet
    profiler = speed.StepProfiler(cfg.log.profile_at, 3, run.out_dir / "profile", run.rank, device)
    last_record = None
    # Aspect-ratio buckets, compiled: a shape's first batch compiles its graph (the latents' height, width).
    # Buckets without a full micro-batch never come.
    compiled = speed.compile_mode(cfg.train.compile, device) != "off"
    f = frozen.downsample
    shapes_to_meet = {(h // f, w // f) for (w, h), n in zip(buckets, stream.order.counts)
                      if n >= cfg.data.batch_per_gpu} if compiled and buckets else set()

    # --- The loop: upkeep first, then one optimizer step ----------------------------------------------------
    while True:
        due = run.upkeep()
        if due.log:
            lr_then = lr_at(cfg.optim, run.step - 1, cfg.train.max_steps)
            extra = {**(validation(unet, ema) if due.validate else {}), **run.take_save_figures()}
            last_record = metrics.flush(run.step, lr_then, extra) or last_record
        if due.sample:
            samples(run.step, unet, ema, metrics)
        if due.save:
            run.save(state, must_commit=due.done or due.stop is not None, on_commit=metrics.log_checkpoint)
        if due.stop is not None or due.done:
            profiler.close(run.step)  # a record open when the run ends keeps the steps it has
        if due.stop is not None:
            metrics.close()
            end_workers(batches)  # at once: freed with the stop, they would take 5 s each
            run.stop(due.stop)
        if due.done:
            break

        # One optimizer step: grad_accum micro-batches, gradients all-reduced on the last
        # (DDP's no_sync before).
        profiler.before_step(run.step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg.optim, run.step, cfg.train.max_steps)
        data_wait, bad, keys, step_loss = 0.0, [], [], 0.0
        for micro in range(run.grad_accum):
            t0 = time.perf_counter()
            batch = next(batches)
            data_wait, bad, keys = (data_wait + time.perf_counter() - t0, bad + batch["bad"],
                                    keys + batch["keys"])
            gen = step_generator(cfg.train.seed, run.step, run.rank, micro, device)
            # draws in this order
            latents, cond = frozen.latents_of(batch, gen), conditioning.encode(batch, gen)
            shapes_to_meet.discard(tuple(latents.shape[-2:]))
            with dist.accumulating(model, sync=micro == run.grad_accum - 1):
                loss = objective(model, latents, cond, gen, autocast)
                mean = loss.weighted.mean()
                (mean / run.grad_accum).backward()
            step_loss = step_loss + mean.detach() / run.grad_accum
            # a skipped step's share is dropped in add_step
            metrics.add_micro_batch(loss.plain, loss.t, loss.figures)
        grad_norm, norms = speed.grad_norms(unet, optimizer)  # one pass of norms for both
        metrics.add_grad_norms(unet, norms)  # per block group, before clipping; stays on the device
        # A NaN or Inf on any rank makes the all-reduced gradients' norm non-finite on every rank:
        # the update is skipped on the device (weights, moments, EMA untouched);
        # nobody waits for the decision on the host.
        ok = torch.isfinite(grad_norm)
        faults.optimizer_step(optimizer, ok, speed.clip_divisor(grad_norm, cfg.optim.grad_clip))
        optimizer.zero_grad(set_to_none=True)
        run.count_step(~ok, bad, keys)
        run.shapes_pending = bool(shapes_to_meet)  # the start-up timeout until none is left on any rank
        if ema.wants_update(run.step):
            ema.update(unet, ok)  # a skipped step leaves every EMA as it was, on the device
        metrics.add_step(torch.where(ok, step_loss, 0.0), torch.where(ok, grad_norm, 0.0), data_wait, bad,
                         skipped=~ok)

    run.close(metrics.close)
    return last_record or {}
