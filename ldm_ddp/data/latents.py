"""The latent cache (`data.source = "latents"`), written by scripts/precompute_latents.py.

A cache is a local folder:

    manifest.json              {"format": "ldm_ddp.latents/1", "fingerprint": what must match the training
                                config (VAE weights, tokenizer, resolution, crop, flip, VAE dtype), "shards":
                                [{"file", "count"}], how it was made}; written last
    latents-000000.safetensors "moments" [n, 2C, h, w] fp16 (posterior mean and log-variance), with
                                data.random_flip also "moments_flipped" (of the mirrored image: a VAE does
                                not commute with a flip), "input_ids" [n, K, L] int32 (every caption
                                tokenized, K = most captions of a sample here, unused rows -1) and
                                "num_captions" [n]; the sample keys in the file's metadata

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
from .samples import CAPTION_STREAM, locate
from .sources import DataSource

FORMAT = "ldm_ddp.latents/1"
MANIFEST = "manifest.json"


def shard_file(number: int) -> str:
    return f"latents-{number:06d}.safetensors"


def _digest(parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part).encode())
    return h.hexdigest()[:16]


def cache_fingerprint(frozen, data_cfg, vae_dtype: str) -> dict:
    """What a cache must share with a training config: VAE weights, tokenizer, image rules, VAE dtype."""
    tensors = sorted(frozen.vae.state_dict().items())
    vae = _digest(part for name, t in tensors
                  for part in (name, list(t.shape), str(t.dtype),
                               t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()))
    tokenizer = frozen.tokenizer
    vocab = sorted(tokenizer.get_vocab().items())
    return {"vae": vae, "scaling_factor": frozen.scaling_factor,
            "tokenizer": _digest([type(tokenizer).__name__, tokenizer.model_max_length, vocab]),
            "resolution": data_cfg.resolution, "crop": data_cfg.crop, "random_flip": data_cfg.random_flip,
            "vae_dtype": vae_dtype}


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
    """Cached samples;
    `source.latent_item(i, flip)` -> {"moments" [2C, h, w] fp16, "input_ids" [L], "key"}."""

    random_access = True
    latent = True  # the stream batches moments and token ids instead of images and captions
    has_raw = False  # the images are not kept

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
        self.files = [os.path.join(path, s["file"]) for s in manifest["shards"]]
        missing = [f for f in self.files if not os.path.isfile(f)]
        if missing:
            raise ConfigError(f"data.path: latent cache shard {missing[0]} is missing")
        self.counts = [int(s["count"]) for s in manifest["shards"]]
        self.starts = np.cumsum([0] + self.counts)
        self._open: dict = {}  # shard number -> (safe_open handle, keys); per process, opened on first read

    def __len__(self) -> int:
        return int(self.starts[-1])

    def shard_sizes(self) -> list[int]:
        return list(self.counts)

    def where(self) -> str:
        return f"latent cache {self.root}"

    def left_out(self) -> dict[str, int]:
        return {"sample{s} skipped when the cache was made (skipped.jsonl)":
                int(self.manifest.get("made_with", {}).get("skipped", 0))}

    def check_matches(self, fingerprint: dict) -> None:
        """Refuse (one line) a cache made for another VAE, tokenizer, resolution, crop, flip or dtype."""
        cached = self.manifest["fingerprint"]
        # The dtype first: the run hashes the VAE as it loads it (model.frozen_dtype), so another dtype also
        # changes the weights' digest, and "made with vae=..." would wrongly read as other weights.
        if cached.get("vae_dtype") != fingerprint["vae_dtype"]:
            raise ConfigError(f"data.path: the latent cache {self.root} was made with the VAE in "
                              f"{cached.get('vae_dtype')}, this run loads it in {fingerprint['vae_dtype']}; "
                              f"set --model.frozen_dtype={cached.get('vae_dtype')} (or make a new cache)")
        for key, value in fingerprint.items():
            if cached.get(key) != value:
                raise ConfigError(f"data.path: the latent cache {self.root} was made with "
                                  f"{key}={cached.get(key)!r}, this run has {value!r}; make a new cache with "
                                  "scripts/precompute_latents.py")

    def _shard(self, shard: int):
        if shard not in self._open:
            handle = safe_open(self.files[shard], framework="pt")
            self._open[shard] = (handle, json.loads(handle.metadata()["keys"]))
        return self._open[shard]

    def key(self, index: int) -> str:
        shard, row = locate(self.starts, index)
        return self._shard(shard)[1][row]

    def latent_item(self, index: int, flip: bool) -> dict:
        shard, row = locate(self.starts, index)
        handle, keys = self._shard(shard)
        moments = handle.get_slice("moments_flipped" if flip else "moments")[row:row + 1][0]
        count = int(handle.get_slice("num_captions")[row:row + 1][0])
        pick = (0 if count == 1
                else int(np.random.Generator(np.random.PCG64([self.seed, CAPTION_STREAM, index]))
                         .integers(count)))
        input_ids = handle.get_slice("input_ids")[row:row + 1, pick:pick + 1][0, 0].long()
        return {"moments": moments, "input_ids": input_ids, "key": keys[row]}

    def fingerprint(self) -> str:
        return f"latents:n={len(self)}:{self.manifest['id']}"
