"""Data sources: what every source offers (`DataSource`), and the configured one by name (`build_source`).

The sharded stream (stream.py) does ordering, splitting and batching; a source only says what it holds.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from ..config import DataConfig


class DataSource(ABC):
    """A sized collection of samples, indexed 0..len-1. Each source sets the three flags as class attributes
    (no defaults here, so a source that forgets one fails where it is read) and implements the methods.

    random_access  source[i] (or latent_item(i, flip)) for any i, so a resume seeks. False for the streamed hf
                   source: it is read in order through records(epoch), and a resume fast-forwards the stream
                   (stream.StreamReader).
    latent         the latent cache: latent_item(i, flip) -> moments and token ids instead of source[i]
                   -> image and caption; the trainer checks it with check_matches(fingerprint) first.
    has_raw        raw(i) -> {"key", "image": encoded bytes, "captions": str | list[str]}, copied as it is by
                   scripts/make_shards.py and encoded by scripts/precompute_latents.py. True for folder,
                   shards, parquet, webdataset, hf and shapes (its render as PNG); False for the streamed hf
                   source (no index) and the latent cache (no images).
    pairs          each sample is a preference pair (pairs.py): source[i] and raw(i) also hold the rejected
                   image under "rejected"; trained with train.objective = "dpo" only.

    len(source)         samples per epoch.
    key(i)              the name of sample i in logs and skipped lists; for a source without random access,
                        i is a global position (a stream's records have no index apart from their order).
    shard_sizes()       samples per shard in index order (shard j holds the next shard_sizes()[j] indices):
                        the unit of the two-level shuffle (stream.GlobalOrder); None = not sharded.
    fingerprint()       a short string that changes when the data does; a checkpoint records it.
    where()             what and where, for the start line: "folder /data/images".
    left_out()          {reason: count} of what was found at data.path but is not served (a dangling symlink,
                        a skipped shard, a sample make_shards left out); "{s}" marks where a plural takes an
                        s: {"dangling symlink{s}": 2}. Both make start_line(), which build_source prints.
    """

    random_access: bool
    latent: bool
    has_raw: bool
    pairs: bool

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def key(self, index: int) -> str: ...

    @abstractmethod
    def shard_sizes(self) -> list[int] | None: ...

    @abstractmethod
    def fingerprint(self) -> str: ...

    def where(self) -> str:
        return type(self).__name__

    def left_out(self) -> dict[str, int]:
        return {}

    def start_line(self) -> str:
        """-> "data: folder /data/images: 25 samples (left out: 1 dangling symlink, 2 images smaller ...)"."""
        counts = [f"{n} {why.replace('{s}', '' if n == 1 else 's')}"
                  for why, n in self.left_out().items() if n]
        said = f" (left out: {', '.join(counts)})" if counts else ""
        return f"data: {self.where()}: {len(self)} samples{said}"

    def image_sizes(self) -> np.ndarray:
        """[N, 2] upright (width, height) in px of every sample, from image headers, never by decoding; (0, 0)
        where a header does not read. Read once at start, for aspect-ratio buckets. This default reads each
        raw record; a source that knows its sizes more cheaply (an index, a rendering rule) overrides it."""
        from .samples import header_size  # samples.py imports this module
        sizes = np.zeros((len(self), 2), np.int64)
        for i in range(len(self)):
            try:
                sizes[i] = header_size(self.raw(i)["image"])
            except Exception:  # no record: the sample fails, named, when it is loaded
                pass
        return sizes

    def __getitem__(self, index: int) -> dict:
        """{"image": PIL image (opened, maybe undecoded), "caption", "key"}; random-access image sources."""
        raise NotImplementedError(f"{type(self).__name__} has no source[i]")

    def raw(self, index: int) -> dict:
        """The encoded record of sample `index` (see has_raw)."""
        raise NotImplementedError(f"{type(self).__name__} has no raw records")

    def records(self, epoch: int):
        """Raw records of `epoch` in the stream's order; sources without random access only."""
        raise NotImplementedError(f"{type(self).__name__} is read by index, not as a stream")

    def latent_item(self, index: int, flip: bool) -> dict:
        """{"moments", "input_ids", "key"} of sample `index`; latent sources only."""
        raise NotImplementedError(f"{type(self).__name__} holds images, not latents")


def build_source(cfg: DataConfig, *, is_main: bool = True) -> DataSource:
    """The configured source (data.source), its start line printed. `is_main`: this process prints what a
    source reports (its size, left-out images, skipped shards); under torchrun pass dist.is_main(), so that
    one rank prints for all."""
    source = _make_source(cfg, is_main)
    if is_main:
        print(source.start_line(), flush=True)
    return source


def _make_source(cfg: DataConfig, is_main: bool) -> DataSource:
    # Imported here, not at the top: each of these modules imports DataSource from this one.
    from .folder import ImageFolderSource
    from .hf import HFDatasetSource, HFStreamSource
    from .latents import LatentSource
    from .pairs import PairFolderSource, PickAPicSource, ShapesPairsSource
    from .parquet import ParquetSource
    from .shapes import ShapesSource
    from .shards import ShardsSource
    from .webdataset import WebDatasetSource

    if cfg.source == "shapes_pairs":
        return ShapesPairsSource(seed=cfg.seed, num_samples=cfg.shapes_num_samples, resolution=cfg.resolution)
    if cfg.source == "pairs":
        return PairFolderSource(cfg.path, cfg.seed, is_main=is_main)
    if cfg.source == "pickapic":
        return PickAPicSource(cfg.path, cfg.seed, cfg.bad_shard, cached_groups=cfg.shuffle_window or 64,
                              is_main=is_main)
    if cfg.source == "shapes":
        return ShapesSource(seed=cfg.seed, num_samples=cfg.shapes_num_samples, resolution=cfg.resolution)
    if cfg.source == "latents":
        return LatentSource(cfg.path, cfg.seed)
    if cfg.source == "shards":
        return ShardsSource(cfg.path, cfg.seed, cfg.bad_shard, is_main=is_main)
    if cfg.source == "folder":
        return ImageFolderSource(cfg.path, cfg.caption_column, seed=cfg.seed, is_main=is_main)
    if cfg.source == "parquet":  # keeps as many row groups as the shuffle window spans
        return ParquetSource(cfg.path, cfg.image_column, cfg.caption_column, cfg.seed, cfg.bad_shard,
                             cached_groups=cfg.shuffle_window or 64, is_main=is_main)
    if cfg.source == "webdataset":
        return WebDatasetSource(cfg.path, cfg.caption_column, cfg.seed, cfg.bad_shard, is_main=is_main)
    if cfg.source == "hf" and cfg.hf_streaming:
        return HFStreamSource(cfg.path, cfg.image_column, cfg.caption_column, cfg.seed, cfg.hf_split)
    if cfg.source == "hf":
        return HFDatasetSource(cfg.path, cfg.image_column, cfg.caption_column, cfg.seed, cfg.hf_split)
    raise ValueError(f"data.source: unknown source {cfg.source!r}")
