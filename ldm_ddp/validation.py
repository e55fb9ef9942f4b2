"""Held-out validation loss: the plain v-prediction loss on a fixed set, the same figure for any world size.

The set is the first `val.num_samples` positions of its own source (val.source, val.path, val.seed; by
default the training source kind with another seed, which for the demo's shapes means other images). Each
sample j has a fixed timestep, t_j = (j + 1/2) T / n (the set covers every timestep bucket evenly), and a
fixed noise, drawn from val.seed; its latent is the VAE posterior's mean and its caption is never dropped.
So the figure depends on the weights alone: not on the step, the world size or a resume. Every rank loads the
whole set once at start (n is bounded), evaluates the samples j = rank, rank + world, ... and the per-sample
losses are summed into one vector on every rank, then averaged in a fixed order: overall and per timestep
bucket. The EMA weights by default (val.weights = raw for the trained ones), in the sampling copy of the UNet.
"""
from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F

from . import dist
from .conditioning import map_cond
from .config import Config, ConfigError
from .data.latents import cache_fingerprint
from .data.sources import build_source
from .data.stream import ShardedStream
from .data.transforms import ImageTransform
from .metrics import NUM_T_BUCKETS
from .schedule import NoiseSchedule


class Validation:
    """`validation(unet, ema)` -> {"val_loss", "val_loss_by_t", "val_s", "val_weights"}; a collective."""

    def __init__(self, cfg: Config, frozen, conditioning, schedule: NoiseSchedule, model_copy, device,
                 autocast: bool):
        v = cfg.val
        data = dataclasses.replace(cfg.data, source=v.source or cfg.data.source, path=v.path or cfg.data.path,
                                   seed=v.seed, buckets="off")
        source = build_source(data, is_main=False)
        if source.latent:  # as for training: a cache made for another VAE, tokenizer or image rule is refused
            source.check_matches(cache_fingerprint(frozen, data, cfg.model.frozen_dtype),
                                 "val.path" if v.path else "data.path")
        if not source.random_access:
            raise ConfigError(f"val.source: a source read by index is needed ({data.source} is streamed)")
        n = min(v.num_samples, len(source))
        stream = ShardedStream(source, conditioning.tokenize, cfg.data.resolution, n, 1, 0, 1, seed=v.seed,
                               transform=ImageTransform(cfg.data.resolution))
        batch = stream.micro_batch(0)  # positions 0..n-1 of the set's own order
        n = len(batch["keys"])
        self.latents = frozen.latents_of(batch, None)[:n]  # the posterior mean; preferred images of pairs
        self.cond = conditioning.encode(batch, None)  # no caption dropout
        gen = torch.Generator().manual_seed(v.seed)
        self.noise = torch.randn(self.latents.shape, generator=gen).to(device)
        T = schedule.num_train_timesteps
        self.t = ((torch.arange(n, dtype=torch.float64) + 0.5) * T / n).long().to(device)
        self.schedule, self.model, self.autocast, self.device = schedule, model_copy, autocast, device
        self.n, self.weights, self.batch = n, v.weights, cfg.data.batch_per_gpu

    @torch.no_grad()
    def __call__(self, unet, ema) -> dict:
        start = time.perf_counter()
        if self.weights == "ema":
            ema.copy_to(self.model)
        else:
            self.model.load_state_dict(unet.state_dict())
        mine = torch.arange(dist.rank(), self.n, dist.world_size(), device=self.device)
        losses = torch.zeros(self.n, dtype=torch.float64, device=self.device)
        for chunk in mine.split(self.batch):
            x_0, noise, t = self.latents[chunk], self.noise[chunk], self.t[chunk]
            x_t = self.schedule.add_noise(x_0, noise, t)
            cond = map_cond(lambda c, rows=chunk: c[rows], self.cond)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                v_pred = self.model(x_t, t, **cond).sample
            per_sample = F.mse_loss(v_pred.float(), self.schedule.v_target(x_0, noise, t), reduction="none")
            losses[chunk] = per_sample.mean(dim=(1, 2, 3)).double()
        losses = dist.all_reduce_sum(losses).cpu()  # every rank: all n losses, each from one rank
        T = self.schedule.num_train_timesteps
        bucket = (self.t.cpu() * NUM_T_BUCKETS // T).clamp(max=NUM_T_BUCKETS - 1)
        by_t = [losses[bucket == b].mean().item() if (bucket == b).any() else None
                for b in range(NUM_T_BUCKETS)]
        return {"val_loss": losses.mean().item(), "val_loss_by_t": by_t, "val_weights": self.weights,
                "val_s": round(time.perf_counter() - start, 3)}
