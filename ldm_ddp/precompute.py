"""`precompute_latents(cfg, out_dir)`: encode a source once into a latent cache (data/latents.py).

One process or one per GPU under torchrun: cache shard j (source indices [j*S, (j+1)*S)) is written by
rank j mod world, then rank 0 writes manifest.json. Images go through the training transform with a
centre crop (the cache holds one crop per image; a random crop would need one per epoch); with
data.random_flip the mirrored image is encoded too. A sample that fails to load is left out and
listed in skipped.jsonl. Every caption of a sample is tokenized and kept; training picks one.
"""
from __future__ import annotations

import json
import math
import os
import time

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from . import dist
from .checkpoint import fsync
from .config import Config, ConfigError
from .data.latents import MANIFEST, cache_fingerprint, shard_file, write_manifest
from .data.samples import caption_list, open_image
from .data.sources import build_source
from .data.transforms import ImageTransform, pixel_limit
from .models import load_frozen


class _ShardImages(Dataset):
    """Source indices -> {"image" uint8 [3, R, R], "input_ids" [K, L], "key"} or {"skipped": [key, why]}."""

    def __init__(self, source, indices: range, transform: ImageTransform, tokenize):
        self.source, self.indices, self.transform, self.tokenize = source, indices, transform, tokenize

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, n: int) -> dict:
        i = self.indices[n]
        key = self.source.key(i)
        try:
            with pixel_limit(self.transform.max_image_pixels):
                record = self.source.raw(i)
                captions = caption_list(record["captions"])
                image = self.transform(open_image(record["image"]))
        except Exception as err:  # left out of the cache, named in skipped.jsonl
            return {"skipped": [key, f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"]}
        return {"image": image, "input_ids": self.tokenize(captions).to(torch.int32), "key": key}


def _collate(items: list[dict]) -> dict:
    good = [i for i in items if "skipped" not in i]
    return {"images": torch.stack([i["image"] for i in good]) if good else None,
            "input_ids": [i["input_ids"] for i in good], "keys": [i["key"] for i in good],
            "skipped": [i["skipped"] for i in items if "skipped" in i]}


def _write_shard(path: str, moments, flipped, input_ids: list[torch.Tensor], keys: list[str]) -> None:
    most = max(ids.shape[0] for ids in input_ids)
    padded = torch.full((len(input_ids), most, input_ids[0].shape[1]), -1, dtype=torch.int32)
    for n, ids in enumerate(input_ids):
        padded[n, :ids.shape[0]] = ids
    tensors = {"moments": torch.cat(moments), "input_ids": padded,
               "num_captions": torch.tensor([ids.shape[0] for ids in input_ids], dtype=torch.int32)}
    if flipped:
        tensors["moments_flipped"] = torch.cat(flipped)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path + ".tmp",
              metadata={"keys": json.dumps(keys), "count": str(len(keys))})
    fsync(path + ".tmp")
    os.replace(path + ".tmp", path)


def precompute_latents(cfg: Config, out_dir: str, vae_dtype: str = "", batch: int = 32,
                       shard_size: int = 4096) -> dict | None:
    """Write the latent cache of cfg.data with cfg.model's VAE into `out_dir`; -> the manifest (rank 0)."""
    if cfg.data.crop != "center":
        raise ConfigError("data.crop: the latent cache stores centre crops; set data.crop=center")
    vae_dtype = vae_dtype or cfg.model.frozen_dtype
    device = dist.init(cfg.train.device)
    rank, world = dist.rank(), dist.world_size()
    source = build_source(cfg.data, is_main=dist.is_main())
    if not (source.random_access and source.has_raw):
        raise ConfigError(f"data.source: {cfg.data.source} has no random access to cache from; "
                          "use make_shards.py first")
    frozen = load_frozen(cfg.model.pretrained, vae_dtype, device)
    if device.type == "cuda":
        frozen.vae.to(memory_format=torch.channels_last)
    transform = ImageTransform(cfg.data.resolution, "center", False)
    os.makedirs(out_dir, exist_ok=True)
    if dist.is_main() and os.path.exists(os.path.join(out_dir, MANIFEST)):
        # A cache is being remade here: until the new manifest is written, the folder is no cache (a killed
        # run must not leave the old manifest vouching for a mix of old and new shards).
        os.remove(os.path.join(out_dir, MANIFEST))
    dist.barrier()
    num_shards, start = math.ceil(len(source) / shard_size), time.perf_counter()
    for number in range(rank, num_shards, world):
        indices = range(number * shard_size, min(len(source), (number + 1) * shard_size))
        loader = DataLoader(_ShardImages(source, indices, transform, frozen.tokenize), batch_size=batch,
                            num_workers=cfg.data.num_workers, collate_fn=_collate,
                            pin_memory=device.type == "cuda")
        moments, flipped, input_ids, keys, skipped = [], [], [], [], []
        for b in loader:
            skipped += b["skipped"]
            if b["images"] is None:
                continue
            images = b["images"].to(device, non_blocking=True)
            moments.append(frozen.encode_moments(images).cpu())
            if cfg.data.random_flip:  # pixels mirrored as the transform mirrors them (the width axis)
                flipped.append(frozen.encode_moments(images.flip(3)).cpu())
            input_ids += b["input_ids"]
            keys += b["keys"]
        if keys:
            _write_shard(os.path.join(out_dir, shard_file(number)), moments, flipped, input_ids, keys)
        with open(os.path.join(out_dir, f".skipped-{number:06d}.json"), "w") as f:
            json.dump({"count": len(keys), "skipped": skipped}, f)
        if dist.is_main():
            print(f"cache shard {number + 1}/{num_shards}: {len(keys)} samples, {len(skipped)} skipped, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    dist.barrier()
    manifest = None
    if dist.is_main():
        shards, skipped = [], []
        for number in range(num_shards):
            part = os.path.join(out_dir, f".skipped-{number:06d}.json")
            with open(part) as f:
                done = json.load(f)
            os.remove(part)
            skipped += done["skipped"]
            if done["count"]:
                shards.append({"file": shard_file(number), "count": done["count"]})
        with open(os.path.join(out_dir, "skipped.jsonl"), "w") as f:
            f.writelines(json.dumps({"key": k, "reason": r}) + "\n" for k, r in skipped)
        manifest = write_manifest(out_dir, cache_fingerprint(frozen, cfg.data, vae_dtype), shards,
                                  {"source": cfg.data.source, "path": cfg.data.path,
                                   "source_fingerprint": source.fingerprint(), "skipped": len(skipped),
                                   "shard_size": shard_size, "world_size": world})
        print(f"{manifest['num_samples']} samples cached in {len(shards)} shards, {len(skipped)} left out, "
              f"{time.perf_counter() - start:.0f} s -> {out_dir}", flush=True)
    dist.barrier()
    return manifest
