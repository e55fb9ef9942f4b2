"""Data sources by name. A source is a sized, random-access collection:
`len(source)`, `source[i] -> {"image": PIL image, "caption": str, "key": str}`, `source.key(i)`
and `source.fingerprint()`. The sharded stream (stream.py) does ordering, splitting and batching.
"""
from __future__ import annotations

from ..config import DataConfig
from .folder import ImageFolderSource
from .hf import HFDatasetSource
from .parquet import ParquetSource
from .shapes import ShapesSource
from .webdataset import WebDatasetSource


def build_source(cfg: DataConfig):
    """The configured source (data.source)."""
    if cfg.source == "shapes":
        return ShapesSource(seed=cfg.shapes_seed, num_samples=cfg.shapes_num_samples, resolution=cfg.resolution)
    if cfg.source == "folder":
        return ImageFolderSource(cfg.path, cfg.caption_column, cfg.min_size)
    if cfg.source == "parquet":
        return ParquetSource(cfg.path, cfg.image_column, cfg.caption_column, cfg.seed)
    if cfg.source == "webdataset":
        return WebDatasetSource(cfg.path, cfg.caption_column, cfg.seed)
    if cfg.source == "hf":
        return HFDatasetSource(cfg.path, cfg.image_column, cfg.caption_column, cfg.seed, cfg.hf_split, cfg.hf_streaming)
    raise ValueError(f"data.source: unknown source {cfg.source!r}")
