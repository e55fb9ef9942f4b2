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

from collections import OrderedDict

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import ConfigError
from .buckets import Bucket, BucketedOrder, bucket_table, nearest_bucket
from .samples import sample_from_raw
from .sources import DataSource
from .transforms import ImageTransform, pixel_limit

MAX_SUBSTITUTIONS = 16  # a bad sample is replaced by the first good one of this many candidates (substitutes)
AUGMENT_STREAM = 1  # seeds crop/flip draws apart from the order's (seed, epoch) permutations


WINDOW_STREAM = 3  # seeds the within-window permutations apart from the shard order (seed, epoch)


class DataFailure(RuntimeError):
    """A position none of whose substitutes loads: the run stops with one line (cli.run_training), exit 1."""

    def one_line(self) -> str:
        """The message alone; re-raised from a DataLoader worker it comes with the worker's traceback."""
        last = str(self).strip().splitlines()[-1]
        return last.split("DataFailure: ", 1)[-1]


def substitutes(index: int, n: int) -> list[int]:
    """`index`, then the dataset indices tried in its place if it fails: MAX_SUBSTITUTIONS in all, spread
    evenly over the dataset (a stride of n / MAX_SUBSTITUTIONS, 1 for small sets). Neighbouring indices share
    a shard, and a shard that fails as a whole (a file gone, an object store down) must not exhaust them."""
    stride = max(1, n // MAX_SUBSTITUTIONS)
    return [(index + a * stride) % n for a in range(MAX_SUBSTITUTIONS)]


class GlobalOrder:
    """Position g -> dataset index; epoch e = g // N reshuffles, seeded by (seed, e).

    Without shards (or with one) an epoch is one permutation of all N indices. With shards (contiguous
    index ranges of `shard_sizes`), the shuffle has two levels so reads stay mostly sequential: the shard
    order is permuted per epoch, consecutive runs of `window` shards (in that order) form windows, and
    each window's samples are permuted together. All ranks and workers read the same window at a time,
    and each reads only the shards of that window.
    """

    def __init__(self, num_samples: int, seed: int, shard_sizes: list[int] | None = None, window: int = 0):
        self.num_samples, self.seed = num_samples, seed
        self.sizes = np.asarray(shard_sizes if shard_sizes and len(shard_sizes) > 1 else [num_samples],
                                np.int64)
        if self.sizes.sum() != num_samples:
            raise ValueError(f"shard sizes add up to {self.sizes.sum()}, not {num_samples} samples")
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])
        self.window = window if 0 < window < len(self.sizes) else len(self.sizes)
        self._epoch, self._window_id = -1, -1

    def _windows(self, epoch: int) -> None:
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
        self.shard_order = rng.permutation(len(self.sizes)) if len(self.sizes) > 1 else np.zeros(1, np.int64)
        window_sizes = np.add.reduceat(self.sizes[self.shard_order],
                                       np.arange(0, len(self.sizes), self.window))
        self.window_starts = np.concatenate([[0], np.cumsum(window_sizes)])
        self._epoch, self._window_id = epoch, -1

    def _members(self, epoch: int, w: int) -> np.ndarray:
        """The permuted dataset indices of window w of `epoch`."""
        if len(self.sizes) == 1:  # one permutation of everything (the order of unsharded sources)
            return np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.num_samples)
        shards = self.shard_order[w * self.window:(w + 1) * self.window]
        members = np.concatenate([np.arange(self.starts[s], self.starts[s + 1]) for s in shards])
        return members[np.random.Generator(np.random.PCG64([self.seed, WINDOW_STREAM, epoch, w]))
                       .permutation(len(members))]

    def substitutes(self, index: int, tries: int) -> list[int]:
        return substitutes(index, self.num_samples)[:tries]

    def index(self, position: int) -> int:
        epoch, offset = divmod(position, self.num_samples)
        if epoch != self._epoch:
            self._windows(epoch)
        w = int(np.searchsorted(self.window_starts, offset, side="right")) - 1
        if w != self._window_id:
            self._window_id, self._perm = w, self._members(epoch, w)
        return int(self._perm[offset - self.window_starts[w]])


class ShardedStream(IterableDataset):
    """Endless micro-batches of this rank's slice of the global order, from `start_step` on."""

    def __init__(self, source: DataSource, tokenize, resolution: int, batch_per_gpu: int, grad_accum: int,
                 rank: int, world_size: int, seed: int, start_step: int = 0,
                 transform: ImageTransform | None = None, shuffle_window: int = 0,
                 buckets: list[Bucket] | None = None):
        self.source, self.tokenize = source, tokenize
        self.transform = transform or ImageTransform(resolution)  # default: centre crop, no flip
        self.batch, self.accum, self.rank, self.world = batch_per_gpu, grad_accum, rank, world_size
        self.global_batch = batch_per_gpu * world_size * grad_accum
        self.order = GlobalOrder(len(source), seed, source.shard_sizes(), shuffle_window)
        self.buckets = buckets or [(resolution, resolution)]
        if source.latent and source.buckets != (buckets or None):  # moments exist at the cache's shapes only
            raise ConfigError(f"data.buckets: the latent cache {source.root} was made with buckets "
                              f"{source.buckets or 'off'}, this run has {buckets or 'off'}")
        if buckets:  # every micro-batch from one bucket (buckets.py); the sizes come from headers or an index
            if not source.random_access:
                raise ConfigError("data.buckets: a source read by index is needed "
                                  f"({type(source).__name__} is not one)")
            self.order = BucketedOrder(self.order, nearest_bucket(source.image_sizes(), buckets),
                                       batch_per_gpu)
        self.start_step = start_step
        self.random_access = source.random_access  # False: a stream, read in order (StreamReader)

    def bucket_lines(self) -> str:
        """The bucket table with each bucket's samples, and what an epoch leaves out (for the start)."""
        if not isinstance(self.order, BucketedOrder):
            return ""
        counts = np.bincount(self.order.bucket_of, minlength=len(self.buckets))
        return (f"data: {len(self.buckets)} aspect-ratio buckets (width x height, aspect, samples); each "
                f"epoch leaves out {self.order.dropped} samples (a bucket's last incomplete micro-batch)\n"
                + bucket_table(self.buckets, counts))

    def positions(self, k: int) -> range:
        """Global positions of this rank's micro-batch number k."""
        step, micro = divmod(k, self.accum)
        start = step * self.global_batch + (micro * self.world + self.rank) * self.batch
        return range(start, start + self.batch)

    def load(self, index: int, position: int = 0) -> tuple[dict, list[tuple[str, str]]]:
        """Sample at `index`, or the first good substitute if it fails (deterministic);
        -> (sample, [(key, reason)] of the bad ones).

        Random crop/flip draw from (seed, position), whichever index ends up filling the position. With
        buckets, the substitutes are of the sample's own bucket, and it is transformed to that bucket.
        """
        bucket = self.buckets[self.order.bucket_of[index]] if isinstance(self.order, BucketedOrder) else None
        return self._first_good(position, ((i, lambda i=i: self.source[i])  # lazily: usually one
                                           for i in self.order.substitutes(index, MAX_SUBSTITUTIONS)), bucket)

    def load_streamed(self, position: int) -> tuple[dict, list[tuple[str, str]]]:
        """A source without random access: the record at `position` of the stream, or the next good one."""
        def fetch(p: int) -> dict:
            return sample_from_raw(self._reader.get(p), self.order.seed, p)
        return self._first_good(position, ((position + a, lambda p=position + a: fetch(p))
                                           for a in range(MAX_SUBSTITUTIONS)))

    def _first_good(self, position: int, candidates, bucket: Bucket | None = None
                    ) -> tuple[dict, list[tuple[str, str]]]:
        """The first candidate (index, fetch) that loads, captioned and transformed to `bucket` (default: the
        square of the resolution); -> (sample, [(key, reason)] of the bad ones before it)."""
        bad = []
        for index, fetch in candidates:
            try:
                with pixel_limit(self.transform.max_image_pixels):  # the source may open the image
                    sample = fetch()
                    if not sample.get("caption"):
                        raise ValueError("empty caption")
                    pixels, original_size, crop_top_left = self.transform.to_bucket(
                        sample["image"], bucket or self.buckets[0], self.augment_rng(position))
                    if "rejected" in sample:  # a preference pair: the same draws, the same bucket
                        sample["rejected"] = self.transform.to_bucket(
                            sample["rejected"], bucket or self.buckets[0], self.augment_rng(position))[0]
                    return {**sample, "image": pixels, "original_size": original_size,
                            "crop_top_left": crop_top_left}, bad
            except Exception as err:  # any decode error: replace, count, name; never crash the run
                bad.append((self.key_of(index), f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"))
        raise DataFailure(f"data: {MAX_SUBSTITUTIONS} bad samples in a row for position {position} "
                          f"(its own and every substitute): {bad[-1][0]} ({bad[-1][1]})")

    def augment_rng(self, position: int) -> np.random.Generator:
        """The crop and flip draws of `position`, whichever sample ends up filling it."""
        return np.random.Generator(np.random.PCG64([self.order.seed, AUGMENT_STREAM, position]))

    def key_of(self, index: int) -> str:
        if not self.random_access:  # `index` is a position: named by the record read there, if any
            return self._reader.key(index)
        return self.source.key(index)

    def latent_batch(self, k: int) -> dict:
        """From a latent cache: moments (of one bucket, as the order groups them), token ids, and each image's
        original size and crop as micro_batch has them; the flip is the transform's draw for the position."""
        items = []
        for position in self.positions(k):
            # the flip ImageTransform draws (centre crop)
            flip = self.transform.random_flip and self.augment_rng(position).random() < 0.5
            items.append(self.source.latent_item(self.order.index(position), flip))
        # preference pairs: [2B] moments, the B preferred first, then their B rejected (as micro_batch)
        moments = [i["moments"] for i in items] + [i["rejected_moments"] for i in items
                                                   if "rejected_moments" in i]
        return {"moments": torch.stack(moments),
                "input_ids": torch.stack([i["input_ids"] for i in items]), "captions": [],
                "keys": [i["key"] for i in items], "bad": [], "k": k,
                "original_size": torch.tensor([i["original_size"] for i in items]),
                "crop_top_left": torch.tensor([i["crop_top_left"] for i in items])}

    def micro_batch(self, k: int) -> dict:
        if self.source.latent:
            return self.latent_batch(k)
        samples, bad = [], []
        for position in self.positions(k):
            sample, failures = (self.load(self.order.index(position), position) if self.random_access
                                else self.load_streamed(position))
            samples.append(sample)
            bad += failures
        captions = [s["caption"] for s in samples]
        # preference pairs: [2B] images, the B preferred first, then their B rejected in the same order
        images = [s["image"] for s in samples] + [s["rejected"] for s in samples if "rejected" in s]
        return {"images": torch.stack(images), "input_ids": self.tokenize(captions),
                "captions": captions, "keys": [s["key"] for s in samples], "bad": bad, "k": k,
                # SDXL's micro-conditioning: (height, width) of each image as stored, the crop's (top, left)
                "original_size": torch.tensor([s["original_size"] for s in samples]),
                "crop_top_left": torch.tensor([s["crop_top_left"] for s in samples])}

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if not self.random_access:
            self._reader = StreamReader(self.source)  # per worker: each reads the stream itself
        k = self.start_step * self.accum + worker
        while True:
            yield self.micro_batch(k)
            k += num_workers


class _StreamEnded(RuntimeError):
    """A stream shorter than its source's length (not a passing error: no retry)."""


class StreamReader:
    """Raw records of a source without random access, by global position.

    Reads forward, keeping the last `keep` records (a bad sample's substitutes are the records after it,
    and the next micro-batch may start before them). A position behind that window, e.g. the first one
    after a resume, restarts the epoch's stream and skips records up to it: the fast-forward whose cost
    the README states. Records are skipped without decoding their images.
    """

    def __init__(self, source, keep: int = 4 * MAX_SUBSTITUTIONS):
        self.source, self.keep = source, keep
        self.epoch, self.next_offset, self.records = -1, 0, OrderedDict()
        self.skipped = 0  # records read only to reach a position (fast-forward)

    def get(self, position: int) -> dict:
        """The record at `position`. A stream that fails while reading (a dropped connection) is dead: it is
        reopened and read up to here once more, so a passing error changes no sample; a second failure raises
        (the caller replaces the sample, and the next read reopens the stream again)."""
        if position in self.records:
            return self.records[position]
        try:
            return self._read_to(position)
        except _StreamEnded:
            raise
        except Exception:
            return self._read_to(position)  # from the reopened stream

    def _read_to(self, position: int) -> dict:
        epoch, offset = divmod(position, len(self.source))
        if epoch != self.epoch or offset < self.next_offset:
            self.stream, self.epoch, self.next_offset = iter(self.source.records(epoch)), epoch, 0
        while self.next_offset <= offset:
            try:
                record = next(self.stream)
            except StopIteration:
                raise _StreamEnded(f"data: the stream of epoch {epoch} ended after {self.next_offset} "
                                   f"records, {len(self.source)} were expected") from None
            except Exception:
                self.epoch = -1  # the generator died with the error: the next read reopens the stream
                raise
            self.records[epoch * len(self.source) + self.next_offset] = record
            self.skipped += self.next_offset < offset
            self.next_offset += 1
            while len(self.records) > self.keep:
                self.records.popitem(last=False)
        return self.records[position]

    def key(self, position: int) -> str:
        record = self.records.get(position)
        return record["key"] if record else f"position {position}"


def make_loader(stream: ShardedStream, num_workers: int, prefetch_batches: int, pin_memory: bool,
                worker_init_fn=None):
    """DataLoader over ready micro-batches (batch_size=None: the stream batches itself)."""
    extra = {"prefetch_factor": prefetch_batches, "persistent_workers": False} if num_workers else {}
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      worker_init_fn=worker_init_fn, **extra)


def end_workers(batches) -> None:
    """End the workers of `batches` (an iterator of make_loader's loader) now: for a run that stops with an
    exception, once nothing more is read from it.

    Left alone, the iterator is freed with the stopping exception's reference cycle, by the garbage collector,
    which runs the finalizers of the loader's index queues before the iterator's own: the queues' feeder
    threads stop, the "exit" message the loader's shutdown then puts on each queue is never sent, and it
    waits MP_STATUS_CHECK_INTERVAL (5 s) for each worker before terminating it: 40 s with 8 workers, past
    torchrun's 30 s between SIGTERM and SIGKILL. Run here, the same shutdown (the one the iterator's __del__
    runs) reaches every worker at once; each finishes the batch in hand, if any, and exits.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)  # without workers (num_workers=0) nothing to end
    if shutdown is not None:
        shutdown()
