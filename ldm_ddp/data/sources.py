"""Data sources by name. A source is a sized, random-access collection:
`len(source)`, `source[i] -> {"image": PIL image, "caption": str, "key": str}`, `source.key(i)`
and `source.fingerprint()`; sharded sources also give `source.shard_sizes()` (the unit of the two-level
shuffle) and all but shapes `source.raw(i)` (encoded bytes and every caption, for make_shards.py).
The sharded stream (stream.py) does ordering, splitting and batching.
"""
from __future__ import annotations

from ..config import DataConfig
from .folder import ImageFolderSource
from .hf import HFDatasetSource, HFStreamSource
from .latents import LatentSource
from .parquet import ParquetSource
from .shapes import ShapesSource
from .shards import ShardsSource
from .webdataset import WebDatasetSource


def build_source(cfg: DataConfig):
    """The configured source (data.source)."""
    if cfg.source == "shapes":
        return ShapesSource(seed=cfg.shapes_seed, num_samples=cfg.shapes_num_samples, resolution=cfg.resolution)
    if cfg.source == "latents":
        return LatentSource(cfg.path, cfg.seed)
    if cfg.source == "shards":
        return ShardsSource(cfg.path, cfg.seed, cfg.bad_shard)
    if cfg.source == "folder":
        return ImageFolderSource(cfg.path, cfg.caption_column, cfg.min_size, cfg.seed)
    if cfg.source == "parquet":  # keeps as many row groups as the shuffle window spans
        return ParquetSource(cfg.path, cfg.image_column, cfg.caption_column, cfg.seed, cfg.bad_shard,
                             cached_groups=cfg.shuffle_window or 64)
    if cfg.source == "webdataset":
        return WebDatasetSource(cfg.path, cfg.caption_column, cfg.seed, cfg.bad_shard)
    if cfg.source == "hf" and cfg.hf_streaming:
        return HFStreamSource(cfg.path, cfg.image_column, cfg.caption_column, cfg.seed, cfg.hf_split,
                              cfg.hf_shuffle_buffer)
    if cfg.source == "hf":
        return HFDatasetSource(cfg.path, cfg.image_column, cfg.caption_column, cfg.seed, cfg.hf_split)
    raise ValueError(f"data.source: unknown source {cfg.source!r}")
