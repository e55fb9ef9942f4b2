"""The "parquet" source: rows of encoded image bytes and captions in Parquet files, random access by row.

`data.path` is a folder of `*.parquet` files, a glob, or a comma-separated list of files (local, or
fsspec URLs); files are taken in sorted path order. The index is built from each file's footer only
(row counts per row group, no data read), so construction costs one small read per file. `source[i]`
reads the row group holding row i and keeps the last `cached_groups` row groups, per process. Row
groups are this source's shards: the two-level shuffle (stream.GlobalOrder) draws from a window of
`data.shuffle_window` of them at a time, so with the cache as large as the window each row group is
read once per window by each DataLoader worker. Keep row groups small (a few hundred images), or
convert with scripts/make_shards.py, whose shards are read by byte range, sample by sample.

The image column holds encoded bytes, or a struct with a `bytes` field (as Hugging Face `datasets`
writes an Image feature). A caption cell may be one string or a list of strings; see `pick_caption`.
"""
from __future__ import annotations

import glob
import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ..config import ConfigError
from . import files
from .samples import RawSource
from .webdataset import ShardError, skip_or_stop


def list_parquet_files(path: str) -> list[str]:
    """data.path (folder, glob, or comma-separated files) -> sorted Parquet file paths;
    ConfigError if none."""
    if files.is_dir(path):
        found = files.list_files(path, (".parquet",))
    else:
        parts = [part.strip() for part in path.split(",") if part.strip()]
        found = [f for part in parts for f in (expand_glob(part) if glob.has_magic(part) else [part])]
    if not found:
        raise ConfigError(f"data.path: no .parquet files match {path}")
    return sorted(set(found))


def expand_glob(pattern: str) -> list[str]:
    if not files.is_url(pattern):
        return glob.glob(pattern)
    from fsspec.core import url_to_fs
    fs, stripped = url_to_fs(pattern)
    return [fs.unstrip_protocol(p) for p in fs.glob(stripped)]


def parquet_file(path: str) -> pq.ParquetFile:
    if not files.is_url(path):
        return pq.ParquetFile(path)
    from fsspec.core import url_to_fs
    fs, stripped = url_to_fs(path)
    return pq.ParquetFile(stripped, filesystem=fs)


class ParquetSource(RawSource):
    """Rows of Parquet files;
    `source[i]` -> {"image": lazily opened PIL image, "caption", "key": "<stem>/<row>"}."""

    random_access = True
    latent = False
    has_raw = True
    pairs = False

    def __init__(self, path: str, image_column: str = "image", caption_column: str = "text", seed: int = 0,
                 bad_shard: str = "stop", cached_groups: int = 8, is_main: bool = True):
        self.path, self.files, self.skipped = path, [], []
        self.image_column, self.caption_column, self.seed = image_column, caption_column, seed
        self.row_counts, self.groups, self.sizes = [], [], []  # groups: (file number, row group number)
        for name in list_parquet_files(path):
            try:
                if not files.is_file(name):
                    raise FileNotFoundError("no such file")
                meta = parquet_file(name).metadata
            except Exception as err:  # any footer error: stop naming the file, or skip it (data.bad_shard)
                skip_or_stop(name, ShardError(f"cannot read {name} as Parquet ({err})".replace("\n", " ")),
                             bad_shard, is_main)
                self.skipped.append(files.name_of(name))
                continue
            f = len(self.files)
            self.files.append(name)
            self.check_columns(set(meta.schema.to_arrow_schema().names), name)
            self.groups += [(f, g) for g in range(meta.num_row_groups)]
            self.sizes += [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            self.row_counts.append(meta.num_rows)
        if not sum(self.row_counts):
            raise ConfigError(f"data.path: no rows in {len(self.files)} Parquet file(s) at {path}")
        # Global row where each row group and each file starts: searchsorted maps a row to its group.
        self.group_starts = np.cumsum([0] + self.sizes)
        self.file_starts = np.cumsum([0] + self.row_counts)
        self.cached_groups = max(1, cached_groups)
        self._cache: OrderedDict = OrderedDict()  # row group number -> its table; per process,
        # filled by reads

    def check_columns(self, columns: set[str], name: str) -> None:
        """ConfigError naming the setting whose column file `name` lacks."""
        for key, column in (("data.image_column", self.image_column),
                            ("data.caption_column", self.caption_column)):
            if column not in columns:
                raise ConfigError(f"{key}: no column {column!r} in {name} (has {sorted(columns)})")

    def read_columns(self) -> list[str]:
        """The columns a row group is read with."""
        return [self.image_column, self.caption_column]

    def __len__(self) -> int:
        return int(self.group_starts[-1])

    def shard_sizes(self) -> list[int]:
        """Rows per row group, in index order: the unit the two-level shuffle permutes."""
        return list(self.sizes)

    def where(self) -> str:
        return f"parquet {self.path}"

    def left_out(self) -> dict[str, int]:
        return {"Parquet file{s} skipped (data.bad_shard=skip)": len(self.skipped)}

    def locate(self, index: int) -> tuple[int, int, int]:
        """Global row -> (row group number, file number, row within the file)."""
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range ({len(self)} rows)")
        group = int(np.searchsorted(self.group_starts, index, side="right")) - 1
        f = self.groups[group][0]
        return group, f, index - int(self.file_starts[f])

    def key(self, index: int) -> str:
        _, f, row = self.locate(index)
        return f"{Path(self.files[f]).stem}/{row}"

    def _table(self, group: int):
        """The row group's table; the last `cached_groups` read are kept (least recently used goes)."""
        if group in self._cache:
            self._cache.move_to_end(group)
        else:
            f, g = self.groups[group]
            self._cache[group] = parquet_file(self.files[f]).read_row_group(g, columns=self.read_columns())
            while len(self._cache) > self.cached_groups:
                self._cache.popitem(last=False)
        return self._cache[group]

    def raw(self, index: int) -> dict:
        group, f, row = self.locate(index)
        table = self._table(group)
        offset = index - int(self.group_starts[group])
        return {"key": f"{Path(files.name_of(self.files[f])).stem}/{row}",
                "image": table.column(self.image_column)[offset].as_py(),
                "captions": table.column(self.caption_column)[offset].as_py()}

    def fingerprint(self) -> str:
        """Hash of the file names, their row counts and the columns read."""
        listing = [[files.name_of(f), n] for f, n in zip(self.files, self.row_counts)]
        skipped = [self.skipped] if self.skipped else []
        digest = hashlib.sha256(json.dumps([listing, self.image_column, self.caption_column] + skipped)
                                .encode())
        return f"parquet:n={len(self)}:{digest.hexdigest()[:16]}"
