"""The latent cache (`data.source = "latents"`), written by scripts/precompute_latents.py.

A cache is a local folder:

    manifest.json              {"format": "ldm_ddp.latents/1", "fingerprint": what must match the training
                                config (VAE weights, tokenizer, resolution, crop, flip, VAE dtype, and the
                                bucket list [[w, h], ...] when made with aspect-ratio buckets), "shards":
                                [{"file", "count"}], how it was made}; written last
    latents-000000.safetensors "moments" [n, 2C, h, w] fp16 (posterior mean and log-variance), with
                                data.random_flip also "moments_flipped" (of the mirrored image: a VAE does
                                not commute with a flip), "input_ids" [n, K, L] int32 (every caption
                                tokenized, K = most captions of a sample here, unused rows -1),
                                "num_captions" [n], "original_size" [n, 2] and "crop_top_left" [n, 2] int32
                                (upright (height, width) of the image, the crop's (top, left) in the
                                resized image; "crop_top_left_flipped" as the mirrored image has it); the
                                sample keys in the file's metadata

With aspect-ratio buckets a shard holds one moments tensor per bucket present, "moments.<w>x<h>" [n_b, 2C,
h/f, w/f] (and "moments_flipped.<w>x<h>"), and per sample "bucket" (its index in the manifest's list) and
"bucket_row" (its row in that tensor); samples keep the source's order. A cache made before sizes and crops
were recorded serves (R, R) and (0, 0).

Training draws a latent from the moments each step with the step's generator, exactly as online
encoding draws from the VAE posterior, picks the flip by the same seeded draw as the image transform
(so a cached run sees the same distribution as an online one), and picks one caption by the seeded
caption rule. A sample that failed to load when the cache was made is not in it (listed in
skipped.jsonl), so every cached sample is good.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch
from safetensors import safe_open

from ..checkpoint import fsync
from ..config import ConfigError
from .buckets import Bucket, resolve_buckets
from .samples import CAPTION_STREAM, locate
from .sources import DataSource

FORMAT = "ldm_ddp.latents/1"
MANIFEST = "manifest.json"
# Per-sample tensors read whole when a shard is opened (a few ints a sample); caches made before sizes and
# crops were recorded, or without buckets, lack some of them.
PER_SAMPLE = ("num_captions", "bucket", "bucket_row", "original_size", "crop_top_left",
              "crop_top_left_flipped")


def shard_file(number: int) -> str:
    return f"latents-{number:06d}.safetensors"


def moments_name(bucket: Bucket | None, flipped: bool, rejected: bool = False) -> str:
    """The tensor holding a bucket's moments: "moments[_flipped].<w>x<h>", or the square cache's name; a
    pair cache's rejected images: "rejected_moments[_flipped]..."."""
    name = ("rejected_" if rejected else "") + ("moments_flipped" if flipped else "moments")
    return f"{name}.{bucket[0]}x{bucket[1]}" if bucket else name


def _digest(parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part).encode())
    return h.hexdigest()[:16]


def _tokenizer_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return _digest([type(tokenizer).__name__, tokenizer.model_max_length, vocab])


def cache_fingerprint(frozen, data_cfg, vae_dtype: str) -> dict:
    """What a cache must share with a training config: VAE weights, tokenizer(s), image rules (buckets
    included), VAE dtype."""
    tensors = sorted(frozen.vae.state_dict().items())
    vae = _digest(part for name, t in tensors
                  for part in (name, list(t.shape), str(t.dtype),
                               t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()))
    fingerprint = {"vae": vae, "scaling_factor": frozen.scaling_factor,
                   "tokenizer": _tokenizer_digest(frozen.tokenizer),
                   **({"tokenizer_2": _tokenizer_digest(frozen.tokenizer_2)} if frozen.tokenizer_2 else {}),
                   "resolution": data_cfg.resolution, "crop": data_cfg.crop,
                   "random_flip": data_cfg.random_flip, "vae_dtype": vae_dtype}
    # resolved as the trainer resolves them: "auto" and the list it stands for make the same cache
    buckets = resolve_buckets(data_cfg.buckets, data_cfg.resolution, 8 * frozen.downsample)
    if buckets:  # absent for square images, so that caches made before buckets existed still match
        fingerprint["buckets"] = [list(b) for b in buckets]
    return fingerprint


def write_manifest(folder: str, fingerprint: dict, shards: list[dict], made_with: dict) -> dict:
    # The id (what a checkpoint records of its data) covers the images too: a cache remade from other or
    # updated images with the same shard counts is other data. (Caches made before keep their stored id.)
    manifest = {"format": FORMAT, "fingerprint": fingerprint, "num_samples": sum(s["count"] for s in shards),
                "shards": shards, "id": _digest([fingerprint, shards, made_with.get("source_fingerprint")]),
                "made_with": made_with}
    path = os.path.join(folder, MANIFEST)
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=1)
    fsync(path + ".tmp")
    os.replace(path + ".tmp", path)
    return manifest


class LatentSource(DataSource):
    """Cached samples; `source.latent_item(i, flip)` -> {"moments" [2C, h, w] fp16 (of the sample's bucket),
    "input_ids" [L], "key", "original_size" (h, w), "crop_top_left" (top, left)}, and "rejected_moments" in
    a cache of preference pairs."""

    random_access = True
    latent = True  # the stream batches moments and token ids instead of images and captions
    has_raw = False  # the images are not kept
    pairs = False

    def __init__(self, path: str, seed: int = 0):
        try:
            with open(os.path.join(path, MANIFEST)) as f:
                manifest = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"data.path: no {MANIFEST} in {path} (a latent cache is made by "
                              "scripts/precompute_latents.py)") from None
        except (OSError, ValueError) as err:
            raise ConfigError(f"data.path: cannot read {os.path.join(path, MANIFEST)} ({err})") from None
        if manifest.get("format") != FORMAT:
            raise ConfigError(f"data.path: {os.path.join(path, MANIFEST)} is not a {FORMAT} manifest")
        self.root, self.seed, self.manifest = path, seed, manifest
        self.pairs = bool(manifest.get("made_with", {}).get("pairs"))  # each sample a preference pair
        self.files = [os.path.join(path, s["file"]) for s in manifest["shards"]]
        missing = [f for f in self.files if not os.path.isfile(f)]
        if missing:
            raise ConfigError(f"data.path: latent cache shard {missing[0]} is missing")
        self.counts = [int(s["count"]) for s in manifest["shards"]]
        made_for = manifest["fingerprint"]
        self.resolution = made_for.get("resolution")  # precompute_latents records it; a hand-made one may not
        self.buckets = [tuple(b) for b in made_for["buckets"]] if "buckets" in made_for else None
        self.starts = np.cumsum([0] + self.counts)
        self._open: dict = {}  # shard number -> _shard's triple; per process, opened on first read

    def __len__(self) -> int:
        return int(self.starts[-1])

    def shard_sizes(self) -> list[int]:
        return list(self.counts)

    def where(self) -> str:
        return f"latent cache {self.root}"

    def left_out(self) -> dict[str, int]:
        return {"sample{s} skipped when the cache was made (skipped.jsonl)":
                int(self.manifest.get("made_with", {}).get("skipped", 0))}

    def check_matches(self, fingerprint: dict, setting: str = "data.path") -> None:
        """Refuse (one line, naming `setting`) a cache made for another VAE, tokenizer, resolution, crop, flip
        or dtype."""
        cached = self.manifest["fingerprint"]
        # The dtype first: the run hashes the VAE as it loads it (model.frozen_dtype), so another dtype also
        # changes the weights' digest, and "made with vae=..." would wrongly read as other weights.
        if cached.get("vae_dtype") != fingerprint["vae_dtype"]:
            raise ConfigError(f"{setting}: the latent cache {self.root} was made with the VAE in "
                              f"{cached.get('vae_dtype')}, this run loads it in {fingerprint['vae_dtype']}; "
                              f"set --model.frozen_dtype={cached.get('vae_dtype')} (or make a new cache)")
        absent = {"buckets": "off"}  # a key only one side has (square images have no bucket list)
        for key in dict.fromkeys([*fingerprint, *cached]):
            then, now = cached.get(key, absent.get(key)), fingerprint.get(key, absent.get(key))
            if then != now:
                raise ConfigError(f"{setting}: the latent cache {self.root} was made with "
                                  f"{key}={then!r}, this run has {now!r}; make a new cache with "
                                  "scripts/precompute_latents.py")

    def image_sizes(self) -> np.ndarray:
        """[N, 2] (width, height): each sample's bucket, the shape its moments were encoded at, so that
        nearest_bucket with the cache's bucket list gives each sample its own bucket back; (R, R) when
        square."""
        if not self.buckets:
            return np.full((len(self), 2), self.resolution, np.int64)
        of = []
        for file in self.files:  # not through _shard: its handles stay out of processes forked later
            with safe_open(file, framework="pt") as handle:
                of.append(handle.get_tensor("bucket").numpy())
        return np.array(self.buckets, np.int64)[np.concatenate(of)]

    def _shard(self, shard: int):
        """-> (safe_open handle, keys, {per-sample tensor name: numpy array})."""
        if shard not in self._open:
            handle = safe_open(self.files[shard], framework="pt")
            stored = handle.keys()
            per_sample = {name: handle.get_tensor(name).numpy() for name in PER_SAMPLE if name in stored}
            self._open[shard] = (handle, json.loads(handle.metadata()["keys"]), per_sample)
        return self._open[shard]

    def key(self, index: int) -> str:
        shard, row = locate(self.starts, index)
        return self._shard(shard)[1][row]

    def latent_item(self, index: int, flip: bool) -> dict:
        shard, row = locate(self.starts, index)
        handle, keys, per_sample = self._shard(shard)
        bucket, at = None, row
        if self.buckets:
            bucket, at = self.buckets[per_sample["bucket"][row]], int(per_sample["bucket_row"][row])
        moments = handle.get_slice(moments_name(bucket, flip))[at:at + 1][0]
        rejected = {"rejected_moments": handle.get_slice(moments_name(bucket, flip, True))[at:at + 1][0]
                    } if self.pairs else {}
        count = int(per_sample["num_captions"][row])
        pick = (0 if count == 1
                else int(np.random.Generator(np.random.PCG64([self.seed, CAPTION_STREAM, index]))
                         .integers(count)))
        input_ids = handle.get_slice("input_ids")[row:row + 1, pick:pick + 1][0, 0].long()
        size = per_sample.get("original_size")
        crop = per_sample.get("crop_top_left_flipped" if flip else "crop_top_left")
        return {"moments": moments, **rejected, "input_ids": input_ids, "key": keys[row],
                "original_size": ((int(size[row, 0]), int(size[row, 1])) if size is not None
                                  else (self.resolution, self.resolution)),
                "crop_top_left": (int(crop[row, 0]), int(crop[row, 1])) if crop is not None else (0, 0)}

    def fingerprint(self) -> str:
        return f"latents:n={len(self)}:{self.manifest['id']}"
