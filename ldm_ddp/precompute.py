"""`precompute_latents(cfg, out_dir)`: encode a source once into a latent cache (data/latents.py).

One process or one per GPU under torchrun: cache shard j (source indices [j*S, (j+1)*S)) is written by
rank j mod world, then rank 0 writes manifest.json. Images go through the training transform with a
centre crop (the cache holds one crop per image; a random crop would need one per epoch); with
data.random_flip the mirrored image is encoded too. A sample that fails to load is left out and
listed in skipped.jsonl. Every caption of a sample is tokenized and kept; training picks one.

With data.buckets, each image goes to the bucket the trainer would give it (nearest_bucket on the source's
image sizes) and is encoded at that bucket's shape; a VAE batch holds one bucket, so a shard is read bucket
by bucket, each in source order.
"""
from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from . import dist
from .checkpoint import fsync
from .conditioning import make_conditioning
from .config import Config, ConfigError
from .data.buckets import Bucket, nearest_bucket, resolve_buckets
from .data.latents import MANIFEST, cache_fingerprint, moments_name, shard_file, write_manifest
from .data.samples import caption_list, open_image
from .data.sources import build_source
from .data.transforms import ImageTransform, pixel_limit
from .models import load_frozen

# What a cache shard keeps of each sample besides its moments
SAMPLE_FIELDS = ("index", "input_ids", "key", "original_size", "crop_top_left", "crop_top_left_flipped")


class _Mirror:
    """Stands in for the stream's generator in ImageTransform.to_bucket: its flip draw always mirrors (a
    centre crop draws nothing else), so the crop's offset is the one a flipped training sample reports."""

    @staticmethod
    def random() -> float:
        return 0.0


class _ShardImages(Dataset):
    """Source index -> {"image" uint8 [3, bh, bw], "input_ids" [K, L], "key", "index", "bucket",
    "original_size", "crop_top_left"[, "crop_top_left_flipped"]} or {"skipped": [key, why]}."""

    def __init__(self, source, buckets: list[Bucket], bucket_of: np.ndarray, resolution: int, flip: bool,
                 tokenize):
        self.source, self.buckets, self.bucket_of, self.tokenize = source, buckets, bucket_of, tokenize
        self.transform = ImageTransform(resolution, "center", False)
        self.mirrored = ImageTransform(resolution, "center", True) if flip else None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict:
        key, bucket = self.source.key(i), int(self.bucket_of[i])
        try:
            with pixel_limit(self.transform.max_image_pixels):
                record = self.source.raw(i)
                captions = caption_list(record["captions"])
                image = open_image(record["image"])
                pixels, original_size, crop_top_left = self.transform.to_bucket(image, self.buckets[bucket])
                item = {"image": pixels, "original_size": original_size, "crop_top_left": crop_top_left}
                if "rejected" in record:  # a preference pair: both images in the preferred one's bucket
                    item["rejected"] = self.transform.to_bucket(open_image(record["rejected"]),
                                                                self.buckets[bucket])[0]
                if self.mirrored:  # the image is decoded already: this costs a crop and a resize
                    item["crop_top_left_flipped"] = self.mirrored.to_bucket(image, self.buckets[bucket],
                                                                            _Mirror())[2]
        except Exception as err:  # left out of the cache, named in skipped.jsonl
            return {"skipped": [key, f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"]}
        return {**item, "input_ids": self.tokenize(captions).to(torch.int32), "key": key, "index": i,
                "bucket": bucket}


def _collate(items: list[dict]) -> dict:
    """Items of one bucket -> {"images" [B, 3, bh, bw] or None, "bucket", a list per other field}."""
    good = [i for i in items if "skipped" not in i]
    batch = {name: [i[name] for i in good] for name in good[0] if name not in ("image", "rejected")
             } if good else {}
    pairs = bool(good) and "rejected" in good[0]
    return {**batch, "images": torch.stack([i["image"] for i in good]) if good else None,
            "rejected": torch.stack([i["rejected"] for i in good]) if pairs else None,
            "bucket": good[0]["bucket"] if good else None,
            "skipped": [i["skipped"] for i in items if "skipped" in i]}


def _bucket_batches(indices: range, bucket_of: np.ndarray, batch: int) -> list[list[int]]:
    """A shard's source indices -> VAE batches of at most `batch`, each of one bucket, in source order."""
    out = []
    for b in np.unique(bucket_of[indices.start:indices.stop]):
        mine = [i for i in indices if bucket_of[i] == b]
        out += [mine[n:n + batch] for n in range(0, len(mine), batch)]
    return out


def _write_shard(path: str, parts: list[dict], buckets: list[Bucket] | None) -> None:
    """VAE batches (each of one bucket, each bucket's in source order) -> a cache shard of their samples in
    source order (data/latents.py); `buckets` None: the square layout."""
    tensors, samples = {}, []
    for b in sorted({p["bucket"] for p in parts}):
        mine = [p for p in parts if p["bucket"] == b]
        for flipped, rejected in ((False, False), (True, False), (False, True), (True, True)):
            field = ("rejected_" if rejected else "") + ("flipped" if flipped else "moments")
            if field in mine[0]:
                tensors[moments_name(buckets[b] if buckets else None, flipped, rejected)] = torch.cat(
                    [p[field] for p in mine])
        fields = [name for name in mine[0] if name in SAMPLE_FIELDS]
        rows = [(p, n) for p in mine for n in range(len(p["index"]))]  # the bucket's moments, row by row
        samples += [{**{name: p[name][n] for name in fields}, "bucket": b, "bucket_row": row}
                    for row, (p, n) in enumerate(rows)]
    samples.sort(key=lambda sample: sample["index"])  # the cache keeps the source's order
    for name in ("bucket", "bucket_row") if buckets else ():
        tensors[name] = torch.tensor([sample[name] for sample in samples], dtype=torch.int32)
    for name in ("original_size", "crop_top_left", "crop_top_left_flipped"):  # [n, 2] pairs
        if name in samples[0]:
            tensors[name] = torch.tensor([sample[name] for sample in samples], dtype=torch.int32)
    input_ids = [sample["input_ids"] for sample in samples]
    most = max(ids.shape[0] for ids in input_ids)
    # [n, K, L] (SDXL: [n, K, 2, L], both tokenizers' ids)
    padded = torch.full((len(input_ids), most, *input_ids[0].shape[1:]), -1, dtype=torch.int32)
    for n, ids in enumerate(input_ids):
        padded[n, :ids.shape[0]] = ids
    tensors |= {"input_ids": padded,
                "num_captions": torch.tensor([ids.shape[0] for ids in input_ids], dtype=torch.int32)}
    keys = [sample["key"] for sample in samples]
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
    frozen = load_frozen(cfg.model.pretrained, vae_dtype, device, cfg.model.kind)
    if device.type == "cuda":
        frozen.vae.to(memory_format=torch.channels_last)
    buckets = resolve_buckets(cfg.data.buckets, cfg.data.resolution, 8 * frozen.downsample)  # as train_loop
    # Each image's bucket as the trainer picks it; square images are the one bucket R x R
    bucket_of = (nearest_bucket(source.image_sizes(), buckets) if buckets
                 else np.zeros(len(source), np.int64))
    images = _ShardImages(source, buckets or [(cfg.data.resolution, cfg.data.resolution)], bucket_of,
                          cfg.data.resolution, cfg.data.random_flip, make_conditioning(frozen).tokenize)
    os.makedirs(out_dir, exist_ok=True)
    if dist.is_main() and os.path.exists(os.path.join(out_dir, MANIFEST)):
        # A cache is being remade here: until the new manifest is written, the folder is no cache (a killed
        # run must not leave the old manifest vouching for a mix of old and new shards).
        os.remove(os.path.join(out_dir, MANIFEST))
    dist.barrier()
    num_shards, start = math.ceil(len(source) / shard_size), time.perf_counter()
    for number in range(rank, num_shards, world):
        indices = range(number * shard_size, min(len(source), (number + 1) * shard_size))
        loader = DataLoader(images, batch_sampler=_bucket_batches(indices, bucket_of, batch),
                            num_workers=cfg.data.num_workers, collate_fn=_collate,
                            pin_memory=device.type == "cuda")
        parts, skipped = [], []
        for b in loader:
            skipped += b.pop("skipped")
            pixels = b.pop("images")
            if pixels is None:
                continue
            rejected = b.pop("rejected")
            for prefix, side in (("", pixels), ("rejected_", rejected)):
                if side is None:
                    continue
                side = side.to(device, non_blocking=True)
                b[prefix + "moments"] = frozen.encode_moments(side).cpu()
                if cfg.data.random_flip:  # mirrored as the transform mirrors them (the width axis)
                    b[prefix + "flipped"] = frozen.encode_moments(side.flip(3)).cpu()
            parts.append(b)
        count = sum(len(p["key"]) for p in parts)
        if count:
            _write_shard(os.path.join(out_dir, shard_file(number)), parts, buckets)
        with open(os.path.join(out_dir, f".skipped-{number:06d}.json"), "w") as f:
            json.dump({"count": count, "skipped": skipped}, f)
        if dist.is_main():
            print(f"cache shard {number + 1}/{num_shards}: {count} samples, {len(skipped)} skipped, "
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
                                  {"source": cfg.data.source, "path": cfg.data.path, "pairs": source.pairs,
                                   "source_fingerprint": source.fingerprint(), "skipped": len(skipped),
                                   "shard_size": shard_size, "world_size": world})
        print(f"{manifest['num_samples']} samples cached in {len(shards)} shards, {len(skipped)} left out, "
              f"{time.perf_counter() - start:.0f} s -> {out_dir}", flush=True)
    dist.barrier()
    return manifest
