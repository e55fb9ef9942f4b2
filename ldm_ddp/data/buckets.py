"""Aspect-ratio buckets: sizes of about one pixel count, each image's nearest one, the bucketed global order.

A bucket is a (width, height) in px, both multiples of the VAE's downsampling factor times 8 (so the latent
is a multiple of 8), of at most `data.resolution`² pixels. An image goes to the bucket nearest its aspect
ratio in log space (|log(w/h) - log(bw/bh)|; 4:3 is as far from 1:1 as 3:4), read from its header at index
time, never by decoding. The transform then resizes it to cover the bucket and crops the rest (centre or
seeded random), as the square path does (NovelAI's bucketing, SDXL's multi-aspect training, Podell et al.
2023 section 2.3).

Order (BucketedOrder): the square path's epoch permutation (GlobalOrder: shard windows, then samples within a
window) is walked window by window; each bucket collects its samples in that order and emits a micro-batch
whenever it holds batch_per_gpu of them; the batches a window completes are shuffled among themselves. A
bucket's incomplete batch carries into the next window, and what is left of it at the end of the epoch
(fewer than batch_per_gpu samples) is dropped from that epoch: the same count every epoch, sum over buckets of
(n_b mod batch_per_gpu), said at start. Position g is still a pure function of (seed, g), every micro-batch
is full and of one bucket, and each epoch holds every other sample exactly once.
"""
from __future__ import annotations

import math

import numpy as np

from ..config import ConfigError

BUCKET_STREAM = 4  # seeds the shuffle of a window's batches apart from the other draws of (seed, epoch)

Bucket = tuple[int, int]  # (width, height) in px


def make_buckets(resolution: int, multiple: int, max_aspect: float = 4.0) -> list[Bucket]:
    """The buckets of about resolution² px: for each shorter side s (a multiple of `multiple`, up to the
    resolution) the longest side that keeps s x long <= resolution², both orientations, aspect <= max_aspect;
    sorted from the tallest to the widest. 512 px, multiple 64: 256x1024 ... 512x512 ... 1024x256 (9)."""
    if resolution % multiple:
        raise ValueError(f"resolution {resolution} is not a multiple of {multiple}")
    area, found = resolution * resolution, set()
    for short in range(multiple, resolution + 1, multiple):
        long = area // short // multiple * multiple
        if long / short <= max_aspect + 1e-9:
            found.update({(short, long), (long, short)})
    return sorted(found, key=lambda b: b[0] / b[1])


def check_buckets(buckets, multiple: int) -> list[Bucket]:
    """A user's list [[w, h], ...] -> buckets; ValueError naming the first one that is not allowed."""
    out = []
    for b in buckets:
        pair = isinstance(b, (list, tuple)) and len(b) == 2 and all(isinstance(x, int) and x > 0 for x in b)
        if not pair or b[0] % multiple or b[1] % multiple:
            raise ValueError(f"{b!r} is not [width, height] in px, multiples of {multiple}")
        out.append((b[0], b[1]))
    if len(set(out)) != len(out):
        raise ValueError("a bucket is listed twice")
    return sorted(out, key=lambda b: b[0] / b[1])


def resolve_buckets(setting, resolution: int, multiple: int) -> list[Bucket] | None:
    """data.buckets -> the buckets, or None for square images: "auto" makes them (make_buckets), a list is
    checked against `multiple` (8 x the VAE's factor: latents of a multiple of 8); ConfigError naming
    data.buckets and what does not fit."""
    if setting == "off":
        return None
    try:
        return make_buckets(resolution, multiple) if setting == "auto" else check_buckets(setting, multiple)
    except ValueError as err:
        raise ConfigError(f"data.buckets: {err}") from None


def nearest_bucket(sizes: np.ndarray, buckets: list[Bucket]) -> np.ndarray:
    """[N, 2] image (width, height) -> [N] index of the bucket nearest in log aspect ratio (the first on a
    tie); a size of 0 (unreadable header) goes to the most square bucket, where it fails and is replaced."""
    sizes = np.asarray(sizes, np.float64).reshape(-1, 2)
    square = int(np.argmin([abs(math.log(w / h)) for w, h in buckets]))
    known = (sizes > 0).all(axis=1)
    log_aspect = np.zeros(len(sizes))
    log_aspect[known] = np.log(sizes[known, 0] / sizes[known, 1])
    targets = np.log(np.array([w / h for w, h in buckets]))
    nearest = np.abs(log_aspect[:, None] - targets[None, :]).argmin(axis=1)
    nearest[~known] = square
    return nearest.astype(np.int64)


def cover_crop(width: int, height: int, bucket: Bucket, rng: np.random.Generator | None
               ) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """An image of width x height resized to cover `bucket` and cropped to it: -> the crop box in the
    image's own px (left, top, right, bottom), resized afterwards to the bucket, and the crop's top-left
    corner in the bucket's px (top, left), as SDXL's crop conditioning has it. Random with `rng`, else
    centred."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)  # image px -> bucket px
    cw, ch = min(width, round(bw / scale)), min(height, round(bh / scale))
    if rng is not None:
        left, top = int(rng.integers(width - cw + 1)), int(rng.integers(height - ch + 1))
    else:
        left, top = (width - cw) // 2, (height - ch) // 2
    return (left, top, left + cw, top + ch), (round(top * scale), round(left * scale))


def bucket_table(buckets: list[Bucket], counts) -> str:
    """Lines `  512x512   1:1.00  1234 samples` for the start-up summary and docs."""
    return "\n".join(f"  {w}x{h}  {w / h:5.2f}  {int(n)} samples" for (w, h), n in zip(buckets, counts))


class BucketedOrder:
    """Position g -> dataset index in the bucketed order (module docstring); the GlobalOrder it refines gives
    the epoch's permutation. Every block of `batch` positions starting at a multiple of `batch` is one
    micro-batch of one bucket."""

    def __init__(self, base, bucket_of: np.ndarray, batch: int):
        self.base, self.batch = base, batch
        self.bucket_of = np.asarray(bucket_of, np.int64)
        self.counts = np.bincount(self.bucket_of, minlength=int(self.bucket_of.max(initial=-1)) + 1)
        self.dropped = int((self.counts % batch).sum())  # per epoch
        self.epoch_length = int(len(self.bucket_of) - self.dropped)
        if self.epoch_length == 0:
            raise ValueError(f"no bucket holds batch_per_gpu = {batch} samples")
        self.seed = base.seed
        self._epoch, self._sequence = -1, None
        members = np.argsort(self.bucket_of, kind="stable")  # each bucket's indices, ascending
        self._members = np.split(members, np.cumsum(self.counts)[:-1])
        self._rank_in_bucket = np.empty(len(self.bucket_of), np.int64)
        for m in self._members:
            self._rank_in_bucket[m] = np.arange(len(m))

    def _build(self, epoch: int) -> np.ndarray:
        """The epoch's dataset indices in order: one pass over its windows (see the module docstring)."""
        base = self.base
        base._windows(epoch)
        carry = [np.zeros(0, np.int64) for _ in self.counts]
        out = []
        for w in range(len(base.window_starts) - 1):
            members = base._members(epoch, w)
            buckets = self.bucket_of[members]
            batches = []
            for b in np.unique(buckets):
                mine = np.concatenate([carry[b], members[buckets == b]])  # carried first, then in order
                full = len(mine) // self.batch * self.batch
                batches += list(mine[:full].reshape(-1, self.batch))
                carry[b] = mine[full:]
            rng = np.random.Generator(np.random.PCG64([self.seed, BUCKET_STREAM, epoch, w]))
            out += [batches[i] for i in rng.permutation(len(batches))]
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.epoch_length)
        if epoch != self._epoch:
            self._epoch, self._sequence = epoch, self._build(epoch)
        return int(self._sequence[offset])

    def substitutes(self, index: int, tries: int) -> list[int]:
        """`index`, then the indices tried in its place if it fails: members of its own bucket, spread
        evenly over it (a stride of its size / tries), so that the batch keeps one shape."""
        members = self._members[self.bucket_of[index]]
        n, start = len(members), self._rank_in_bucket[index]
        stride = max(1, n // tries)
        return [int(members[(start + a * stride) % n]) for a in range(min(tries, n))]
