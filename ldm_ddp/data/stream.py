"""The sharded sample stream: one global order, split by rank x DataLoader worker.

Global position g maps to one dataset index (a seeded permutation per epoch). Optimizer
step s consumes positions [s*G, (s+1)*G), G = batch_per_gpu * world_size * grad_accum.
Within step s, micro-batch m of rank r is positions s*G + (m*W + r)*B + [0, B). A rank's
micro-batches are numbered k = s*grad_accum + m, and worker w of n builds k = k0 + w + j*n:
that is the order in which the DataLoader interleaves its workers, so the loader yields the
rank's slice in sequence. The stream is endless; the loop pulls exactly what it needs, so
every rank yields the same number of batches by construction.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .transforms import ImageTransform, pixel_limit

MAX_SUBSTITUTIONS = 16  # a bad sample is replaced by the next good index, looking this far
AUGMENT_STREAM = 1  # seeds crop/flip draws apart from the order's (seed, epoch) permutations


class GlobalOrder:
    """Position g -> dataset index: epoch e = g // N is a permutation seeded by (seed, e)."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples, self.seed = num_samples, seed
        self._epoch, self._perm = -1, None

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        if epoch != self._epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._epoch, self._perm = epoch, rng.permutation(self.num_samples)
        return int(self._perm[offset])


class ShardedStream(IterableDataset):
    """Endless micro-batches of this rank's slice of the global order, from `start_step` on."""

    def __init__(self, source, tokenize, resolution: int, batch_per_gpu: int, grad_accum: int,
                 rank: int, world_size: int, seed: int, start_step: int = 0,
                 transform: ImageTransform | None = None):
        self.source, self.tokenize = source, tokenize
        self.transform = transform or ImageTransform(resolution)  # default: centre crop, no flip
        self.batch, self.accum, self.rank, self.world = batch_per_gpu, grad_accum, rank, world_size
        self.global_batch = batch_per_gpu * world_size * grad_accum
        self.order = GlobalOrder(len(source), seed)
        self.start_step = start_step

    def positions(self, k: int) -> range:
        """Global positions of this rank's micro-batch number k."""
        step, micro = divmod(k, self.accum)
        start = step * self.global_batch + (micro * self.world + self.rank) * self.batch
        return range(start, start + self.batch)

    def load(self, index: int, position: int = 0) -> tuple[dict, list[str]]:
        """Sample at `index`, or the next good one if it fails (deterministic); -> (sample, bad keys).

        Random crop/flip draw from (seed, position), whichever index ends up filling the position.
        """
        bad = []
        for attempt in range(MAX_SUBSTITUTIONS):
            i = (index + attempt) % len(self.source)
            try:
                with pixel_limit(self.transform.max_image_pixels):  # the source may open the image
                    sample = self.source[i]
                    if not sample.get("caption"):
                        raise ValueError("empty caption")
                    rng = np.random.Generator(np.random.PCG64([self.order.seed, AUGMENT_STREAM, position]))
                    return {**sample, "image": self.transform(sample["image"], rng)}, bad
            except Exception as err:  # any decode error: replace, count, name; never crash the run
                key = self.source.key(i) if hasattr(self.source, "key") else f"index {i}"
                bad.append(f"{key} ({type(err).__name__}: {str(err)[:80]})")
        raise RuntimeError(f"data: {MAX_SUBSTITUTIONS} consecutive bad samples from index {index}: {bad[-1]}")

    def micro_batch(self, k: int) -> dict:
        samples, bad = [], []
        for position in self.positions(k):
            sample, failures = self.load(self.order.index(position), position)
            samples.append(sample)
            bad += failures
        captions = [s["caption"] for s in samples]
        return {"images": torch.stack([s["image"] for s in samples]), "input_ids": self.tokenize(captions),
                "captions": captions, "keys": [s["key"] for s in samples], "bad": bad, "k": k}

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        k = self.start_step * self.accum + worker
        while True:
            yield self.micro_batch(k)
            k += num_workers


def make_loader(stream: ShardedStream, num_workers: int, prefetch_batches: int, pin_memory: bool):
    """DataLoader over ready micro-batches (batch_size=None: the stream batches itself)."""
    extra = {"prefetch_factor": prefetch_batches, "persistent_workers": False} if num_workers else {}
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **extra)
