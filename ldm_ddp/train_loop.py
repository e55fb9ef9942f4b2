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

from . import checkpoint, dist, faults, speed
from .config import Config, ConfigError, OptimConfig, resolve_batch, warnings_for
from .data.latents import cache_fingerprint
from .data.sources import build_source
from .data.stream import ShardedStream, make_loader
from .data.transforms import ImageTransform
from .ema import EMA
from .metrics import Metrics, count_train_flops, start_tensorboard, start_wandb
from .models import build_unet, load_frozen
from .resume import architecture, check_resumable, record_resume, resume_point
from .sampling import generate, make_grid, make_side_by_side
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


def train(cfg: Config) -> dict:
    """Train until cfg.train.max_steps; resumes from the newest valid checkpoint. -> last metrics."""
    # --- Distributed setup and run folder -------------------------------------------------------
    device = dist.init(cfg.train.device, cfg.train.startup_timeout_s)
    rank, world = dist.rank(), dist.world_size()
    grad_accum, global_batch = resolve_batch(cfg, world)
    # From here on SIGTERM / SIGUSR1 mean "save at the next step and exit". Not before: a rendezvous can wait
    # for minutes, and a process that has nothing to save yet may as well end at once.
    preemption = faults.Preemption()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    out_dir, ckpt_dir = Path(cfg.train.out_dir), Path(cfg.train.out_dir) / "checkpoints"
    if dist.is_main():
        (out_dir / "samples").mkdir(parents=True, exist_ok=True)
        ckpt_dir.mkdir(exist_ok=True)
        (out_dir / "config.toml").write_text(cfg.to_toml())
        for line in warnings_for(cfg):
            print(f"warning: {line}", flush=True)
    use_amp = cfg.train.precision == "bf16"
    on_cuda = device.type == "cuda"

    # --- Models: frozen VAE + text encoder, trainable UNet (same init on every rank) ----------------
    frozen = load_frozen(cfg.model.pretrained, cfg.model.frozen_dtype, device)
    if cfg.data.resolution % frozen.downsample:
        raise ConfigError(f"data.resolution: {cfg.data.resolution} is not a multiple of the VAE's "
                          f"downsampling factor {frozen.downsample}")
    torch.manual_seed(cfg.train.seed)
    unet = build_unet(cfg.model, cfg.data.resolution // frozen.downsample, frozen.text_encoder.config.hidden_size,
                      device)
    if on_cuda and cfg.train.channels_last:
        unet.to(memory_format=torch.channels_last)
    if on_cuda:
        speed.configure_cuda(cfg.train.cudnn_benchmark)
    schedule = NoiseSchedule(cfg.diffusion.num_train_timesteps, cfg.diffusion.beta_schedule,
                             cfg.diffusion.beta_start, cfg.diffusion.beta_end, cfg.diffusion.zero_terminal_snr)
    # Fused AdamW (CPU and GPU) skips a non-finite step on the device, without a host sync (faults.optimizer_step).
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay, fused=cfg.optim.fused)
    ema = EMA(unet, cfg.ema)
    uncond = frozen.encode_prompts(frozen.tokenize([""]))  # [1, L, D]: the dropped-caption context
    flops_per_image = count_train_flops(unet, uncond, use_amp)  # for MFU; once, before the DDP wrap
    sampler_unet = copy.deepcopy(unet).eval().requires_grad_(False)  # live samples; the train copy stays put

    # --- Resume: weights, optimizer moments, EMA and the step; data and draws follow from the step --
    source = build_source(cfg.data)
    if getattr(source, "latent", False):  # a cache made for another VAE, tokenizer or image rule is refused
        source.check_matches(cache_fingerprint(frozen, cfg.data, cfg.model.frozen_dtype))
    fingerprint, arch = source.fingerprint(), architecture(unet, frozen)
    faults.check_same_data(fingerprint)  # e.g. a shard one node cannot read: refused here, not trained around
    step, skipped_before, bad_before = 0, {}, 0
    resume_path = resume_point(cfg, ckpt_dir)
    if resume_path is not None:
        tensors, meta = checkpoint.load_checkpoint(resume_path)
        changes = check_resumable(meta, cfg, arch, global_batch, fingerprint, resume_path)  # refuses drift
        unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")})
        ema.load(tensors, meta["ema"])
        checkpoint.load_optimizer_tensors(optimizer, dict(unet.named_parameters()), tensors, meta["optim"],
                                          live_hyperparameters=True)  # the config's: a change is allowed
        step, skipped_before = int(meta["step"]), meta.get("faults", {})
        bad_before = meta["data"].get("bad_samples", 0)
        del tensors
        record_resume(out_dir, resume_path, step, changes)  # the safe changes (lr, max_steps, ...) on record
    start_step = step
    if dist.is_main():  # later steps of another timeline in this folder: set aside, not resumed into or pruned
        checkpoint.set_aside_after(ckpt_dir, start_step)
    guard = faults.NonFiniteGuard(cfg.train.max_consecutive_skips, skipped_before)

    # --- Data: this rank's slice of the global order, from the resumed step on ---------------------
    stream = ShardedStream(source, frozen.tokenize, cfg.data.resolution, cfg.data.batch_per_gpu, grad_accum,
                           rank, world, cfg.data.seed, start_step, ImageTransform.from_config(cfg.data),
                           cfg.data.shuffle_window)
    # faults.shield_worker: torchrun's and SLURM's SIGTERM reach the workers too; only the parent acts on it.
    loader = make_loader(stream, cfg.data.num_workers, cfg.data.prefetch_batches, on_cuda, faults.shield_worker)
    batches = iter(loader)

    # --- Training wrapper and logging ---------------------------------------------------------------
    compile_mode = speed.compile_mode(cfg.train.compile, device)
    ddp_mode = speed.ddp_compile(cfg.train.ddp_compile, compile_mode, world)
    speed.use_ddp_compile(ddp_mode)
    force_layout = speed.layout_opt(cfg.train.layout_opt, on_cuda and cfg.train.channels_last, world, ddp_mode)
    model = speed.compile_model(unet, dist.wrap_ddp(unet, cfg.train.ddp_static_graph, cfg.train.ddp_bucket_cap_mb),
                                compile_mode, force_layout, cfg.train.compile_backend)
    if cfg.ema.overlap:  # each EMA update runs beside the next step's forward (launch_pending below)
        ema.defer_updates(device)
    sdpa_backend = cfg.model.sdpa_backend
    if compile_mode != "off" or sdpa_backend != "auto":
        def probe_step() -> None:  # one forward + backward of a micro-batch's shape; gradients dropped
            b, c, h = cfg.data.batch_per_gpu, unet.config.in_channels, unet.config.sample_size
            x_t = torch.zeros(b, c, h, h, device=device)
            with speed.attention(sdpa_backend), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                context = uncond.expand(b, -1, -1).contiguous()  # the strides of the loop's inputs: no recompile
                model(x_t, torch.zeros(b, dtype=torch.long, device=device), context).sample.sum().backward()
            unet.zero_grad(set_to_none=True)

        def undo() -> None:
            nonlocal model, sdpa_backend
            model, sdpa_backend = speed.uncompile(unet, model), "auto"
        # train.compile=auto was not asked for by name: where it cannot build (no compiler, an old GPU), the
        # run goes on eager with a warning instead of stopping.
        only_auto = cfg.train.compile == "auto" and sdpa_backend == "auto"
        ddp_part = f", train.ddp_compile={ddp_mode}" if ddp_mode != "split" else ""
        speed.probe(probe_step, f"train.compile={compile_mode}{ddp_part}, model.sdpa_backend={sdpa_backend}",
                    cfg.train.fallback or only_auto, undo,
                    "train.fallback=true" if cfg.train.fallback else "train.compile=auto")
    if ema.fused is not None:
        speed.probe(lambda: ema.probe(unet), "ema.compile=true", cfg.train.fallback, ema.uncompile)
    wandb_run = start_wandb(cfg.log.wandb, out_dir, cfg.log.wandb_project,
                            cfg.log.run_name or out_dir.name, cfg.to_dict())
    tensorboard = start_tensorboard(cfg.log.tensorboard, out_dir, start_step, cfg.to_toml())
    metrics = Metrics(out_dir, device, schedule.num_train_timesteps, cfg.train.max_steps, global_batch,
                      cfg.log.progress, wandb_run, tensorboard, flops_per_image, cfg.log.peak_tflops,
                      cfg.log.wandb_checkpoints)
    profiler = speed.StepProfiler(cfg.log.profile_at, cfg.log.profile_steps, out_dir / "profile", rank, device)
    last_record = None
    bad_seen, bad_total = 0, bad_before  # replaced samples: this process since start; all ranks, as of the last save

    def write_checkpoint() -> None:
        tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
        tensors.update(ema.state_tensors())
        optim_tensors, groups = checkpoint.optimizer_tensors(optimizer, unet_param_names(unet))
        tensors.update(optim_tensors)
        meta = {"samples_seen": step * global_batch, "config": cfg.to_dict(), "optim": groups,
                "lr_schedule": {**vars(cfg.optim), "max_steps": cfg.train.max_steps, "lr_now": lr_at(
                    cfg.optim, step, cfg.train.max_steps)},
                "ema": ema.state_meta(), "world_size": world, "versions": checkpoint.versions(),
                "data": {"samples_seen": step * global_batch, "seed": cfg.data.seed, "global_batch": global_batch,
                         "fingerprint": fingerprint, "source": cfg.data.source,
                         "shuffle_window": cfg.data.shuffle_window, "bad_samples": bad_total},
                "architecture": arch, "faults": guard.state()}
        checkpoint.save_checkpoint(ckpt_dir, step, tensors, meta)

    def save(must_commit: bool) -> None:
        """Rank 0 writes the state of `step`; every rank learns whether it was committed. A failed write (disk
        full, I/O error) leaves the previous checkpoint as the resume point, and ckpt.on_save_error says
        whether the run goes on, the same on every rank; the final and the preemption saves must commit."""
        path = checkpoint.checkpoint_path(ckpt_dir, step)
        if step == start_step and path == resume_path:
            return  # the state this run resumed from: committed already
        nonlocal bad_total
        # Replaced samples so far, all ranks (a collective: every rank calls save); resumed runs add theirs.
        bad_total = bad_before + int(dist.all_reduce_sum(torch.tensor([bad_seen], device=device)).item())
        error = ""
        # The other ranks wait in the outcome's all-reduce while rank 0 writes: saves get the startup timeout.
        with dist.timeout(cfg.train.startup_timeout_s):
            if dist.is_main():
                try:
                    write_checkpoint()
                except OSError as err:  # save_checkpoint removed its temp file; older checkpoints are untouched
                    error = " ".join(str(err).split())
                else:
                    checkpoint.prune_checkpoints(ckpt_dir, cfg.ckpt.keep, just_saved=path)  # a failed delete warns
                    metrics.log_checkpoint(path, step)  # a wandb artifact if log.wandb_checkpoints asks
            failed = dist.all_reduce_max_ints([bool(error)])[0]  # also the barrier: the file is committed
        if not failed:
            return
        kept = checkpoint.list_checkpoints(ckpt_dir)
        lost = f"checkpoint {path.name} not saved ({error or 'see rank 0'}); " + (
            f"{kept[-1].name} stays the resume point" if kept else "no checkpoint to resume from")
        if must_commit or cfg.ckpt.on_save_error == "stop":
            raise faults.SaveFailed(lost)
        if dist.is_main():
            print(f"warning: {lost}; training goes on (ckpt.on_save_error = continue)", flush=True)

    def sample_grid() -> None:
        """Live samples, prompts split across ranks (seed fixed per prompt, so any world size draws the
        same grid), gathered on rank 0. Every rank samples about len(prompts) / world, so none waits long."""
        prompts = cfg.sample.prompts
        per_rank = math.ceil(len(prompts) / world)
        # This rank's prompts; the last rank pads with repeats of the final prompt so the gather is even.
        mine = [min(i, len(prompts) - 1) for i in range(rank * per_rank, (rank + 1) * per_rank)]
        both = cfg.sample.use_ema and cfg.sample.side_by_side  # EMA left, raw right, same prompts and seeds
        grids = []
        for use_ema in ([True, False] if both else [cfg.sample.use_ema]):
            if use_ema:
                ema.copy_to(sampler_unet)
            else:
                sampler_unet.load_state_dict(unet.state_dict())
            images = generate(sampler_unet, frozen, schedule, [prompts[i] for i in mine],
                              [cfg.sample.seed + i for i in mine], cfg.sample.steps, cfg.sample.cfg_scale,
                              cfg.sample.guidance_rescale, cfg.sample.spacing, autocast=use_amp)
            grids.append(dist.all_gather_tensor(images.to(device))[:len(prompts)].cpu())
        if dist.is_main():
            path = out_dir / "samples" / f"step_{step:07d}.png"
            nrow = math.ceil(math.sqrt(len(prompts)))
            (make_side_by_side(grids, nrow) if both else make_grid(grids[0], nrow)).save(path)
            metrics.log_image(step, path, " | ".join(prompts) + ("  (left: EMA, right: raw)" if both else ""))

    # --- The loop: upkeep first, then one optimizer step ----------------------------------------------
    while True:
        done = step >= cfg.train.max_steps
        if step == start_step + 1:  # the first step is done: from now on a peer that dies or hangs stops us soon
            dist.set_timeout(cfg.train.collective_timeout_s)
        # A preemption signal to any rank stops every rank here, at the same step, after one more save.
        stop = preemption.agreed(step, checkpoint.checkpoint_path(ckpt_dir, step))
        upkeep = step > start_step
        log_now = upkeep and (step % cfg.log.every == 0 or done or stop is not None)
        if log_now:
            last_record = metrics.flush(step, lr_at(cfg.optim, step - 1, cfg.train.max_steps)) or last_record
        if upkeep and (log_now or step % cfg.ckpt.every == 0):
            # Reads the skipped-step flags here, where the loop syncs anyway; before every save (log_now covers a
            # stop's), so that the checkpoint counts every skip so far. Every rank calls it at the same step.
            hit = guard.check()
            stop = stop or hit
        if upkeep and cfg.sample.every and (step % cfg.sample.every == 0 or done) and stop is None:
            sample_grid()
        if (upkeep and (step % cfg.ckpt.every == 0 or done)) or stop is not None:
            save(must_commit=done or stop is not None)
        if stop is not None:
            profiler.close(step)  # a record open when the run stops keeps the steps it has
            metrics.close()
            preemption.ignore()
            raise stop
        if done:
            profiler.close(step)
            break

        profiler.before_step(step)
        lr = lr_at(cfg.optim, step, cfg.train.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        data_wait, bad, keys, step_loss = 0.0, [], [], 0.0
        ema.launch_pending()  # ema.overlap: the last step's EMA update, on a side stream beside this step's work
        for micro in range(grad_accum):
            t0 = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - t0
            bad, keys = bad + batch["bad"], keys + batch["keys"]
            bad_seen += len(batch["bad"])
            gen = step_generator(cfg.train.seed, step, rank, micro, device)
            if "moments" in batch:  # latent cache: the same posterior draw encode_images makes
                latents = frozen.latents_from_moments(batch["moments"].to(device, non_blocking=True), gen)
            else:
                latents = frozen.encode_images(batch["images"].to(device, non_blocking=True), gen)
            context = frozen.encode_prompts(batch["input_ids"])
            drop = torch.rand(len(latents), generator=gen, device=device) < cfg.train.caption_dropout
            context = torch.where(drop[:, None, None], uncond, context)
            t = torch.randint(0, schedule.num_train_timesteps, (len(latents),), generator=gen, device=device)
            noise = sample_noise(latents.shape, gen, device, cfg.diffusion.offset_noise)
            x_t, v_target = schedule.add_noise(latents, noise, t), schedule.v_target(latents, noise, t)
            # Gradients are all-reduced only on the last micro-batch (DDP's no_sync on the others).
            sync = micro == grad_accum - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                with speed.attention(sdpa_backend), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                    v_pred = model(x_t, t, context).sample
                loss_per_sample = F.mse_loss(v_pred.float(), v_target, reduction="none").mean(dim=(1, 2, 3))
                loss = (loss_per_sample * schedule.loss_weights(t, cfg.diffusion.min_snr_gamma or None)).mean()
                (loss / grad_accum).backward()
            step_loss = step_loss + loss.detach() / grad_accum
            metrics.add_micro_batch(loss_per_sample, t)  # a skipped step's share is dropped in add_step
        grad_norm, norms = speed.clip_grad_norm(unet, cfg.optim.grad_clip)  # one pass of norms for both:
        metrics.add_grad_norms(unet, norms)  # per block group, before clipping; stays on the device
        # A NaN or Inf anywhere (any rank, any micro-batch) makes the all-reduced gradients' norm non-finite, the
        # same on every rank: the update is skipped on the device (weights, moments, EMA untouched; the lr and
        # EMA decay schedules still follow the step count), and nobody waits for the decision on the host.
        ok = torch.isfinite(grad_norm)
        ema.settle()  # a pending EMA update (ema.overlap) has read the weights before they change
        faults.optimizer_step(optimizer, ok)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if ema.wants_update(step):
            ema.update(unet, ok)  # a skipped step leaves every EMA as it was, on the device
        elif step < cfg.ema.start_step:
            ema.copy_from(unet)
        metrics.add_step(torch.where(ok, step_loss, 0.0), torch.where(ok, grad_norm, 0.0), data_wait, bad,
                         skipped=~ok)
        guard.add(step, ~ok, keys)

    dist.barrier()  # before the close: rank 0's wandb finish may upload for minutes, past the collective timeout
    metrics.close()
    preemption.restore()
    return last_record or {}
