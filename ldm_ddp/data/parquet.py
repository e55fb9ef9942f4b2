"""The "parquet" source: rows of encoded image bytes and captions in local Parquet files, random access by row.

`data.path` is a folder of `*.parquet` files, a glob, or a comma-separated list of files; files are
taken in sorted path order. The index is built from each file's footer only (row counts per row group,
no data read), so construction costs one small read per file. `source[i]` reads the row group holding
row i and keeps it, per process, so the next rows of a sequential read cost nothing.

The image column holds encoded bytes, or a struct with a `bytes` field (as Hugging Face `datasets`
writes an Image feature). A caption cell may be one string or a list of strings; see `pick_caption`.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from ..config import ConfigError

CAPTION_STREAM = 2  # seeds the caption choice apart from the order (stream 0) and augmentations (stream 1)


def pick_caption(value, seed: int, index: int) -> str:
    """One caption from a string or a list of strings; raises if none is usable.

    From a list, the non-empty captions are candidates and one is drawn with
    PCG64([seed, 2, index]): deterministic in (data.seed, dataset index), so a resumed or re-sharded
    run sees the same caption for the same sample, and different samples draw independently.
    """
    if isinstance(value, (list, tuple)):
        candidates = [c.strip() for c in value if isinstance(c, str) and c.strip()]
        if not candidates:
            raise ValueError("empty caption list")
        rng = np.random.Generator(np.random.PCG64([seed, CAPTION_STREAM, index]))
        return candidates[int(rng.integers(len(candidates)))]
    if not isinstance(value, str) or not value.strip():
        raise ValueError("empty caption")
    return value.strip()


def open_image(data) -> Image.Image:
    """Encoded bytes (or a {"bytes": ...} struct) -> lazily decoded PIL image; raises if unreadable."""
    if isinstance(data, dict):
        data = data.get("bytes")
    if not data:
        raise ValueError("no image bytes")
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # PIL's message names the BytesIO object's address: say what failed
        raise UnidentifiedImageError("not an image PIL can read") from None


def list_parquet_files(path: str) -> list[str]:
    """data.path (folder, glob, or comma-separated files) -> sorted Parquet file paths; ConfigError if none."""
    if Path(path).is_dir():
        files = [str(p) for p in Path(path).glob("*.parquet")]
    else:
        files = [f for part in path.split(",") if part.strip()
                 for f in (glob.glob(part.strip()) if glob.has_magic(part) else [part.strip()])]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise ConfigError(f"data.path: no such Parquet file {missing[0]}")
    if not files:
        raise ConfigError(f"data.path: no .parquet files match {path}")
    return sorted(set(files))


class ParquetSource:
    """Rows of Parquet files; `source[i]` -> {"image": lazily opened PIL image, "caption", "key": "<stem>/<row>"}."""

    def __init__(self, path: str, image_column: str = "image", caption_column: str = "text", seed: int = 0):
        self.files = list_parquet_files(path)
        self.image_column, self.caption_column, self.seed = image_column, caption_column, seed
        self.row_counts, self.groups, sizes = [], [], []  # groups: (file number, row group number)
        for f, name in enumerate(self.files):
            try:
                meta = pq.ParquetFile(name).metadata
            except Exception as err:  # any footer error: the run stops here, naming the file
                raise ConfigError(f"data.path: cannot read {name} as Parquet ({err})".replace("\n", " ")) from None
            columns = set(meta.schema.to_arrow_schema().names)
            for key, column in (("data.image_column", image_column), ("data.caption_column", caption_column)):
                if column not in columns:
                    raise ConfigError(f"{key}: no column {column!r} in {name} (has {sorted(columns)})")
            self.groups += [(f, g) for g in range(meta.num_row_groups)]
            sizes += [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            self.row_counts.append(meta.num_rows)
        if not sum(self.row_counts):
            raise ConfigError(f"data.path: no rows in {len(self.files)} Parquet file(s) at {path}")
        # Global row where each row group and each file starts: searchsorted maps a row to its group.
        self.group_starts = np.cumsum([0] + sizes)
        self.file_starts = np.cumsum([0] + self.row_counts)
        self._cached = (-1, None)  # (row group number, its table): per process, set by reads

    def __len__(self) -> int:
        return int(self.group_starts[-1])

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
        """The row group's table, read once per process and kept until another group is needed."""
        if self._cached[0] != group:
            f, g = self.groups[group]
            table = pq.ParquetFile(self.files[f]).read_row_group(g, columns=[self.image_column, self.caption_column])
            self._cached = (group, table)
        return self._cached[1]

    def __getitem__(self, index: int) -> dict:
        group, f, row = self.locate(index)
        table = self._table(group)
        offset = index - int(self.group_starts[group])
        caption = pick_caption(table.column(self.caption_column)[offset].as_py(), self.seed, index)
        image = open_image(table.column(self.image_column)[offset].as_py())
        return {"image": image, "caption": caption, "key": f"{Path(self.files[f]).stem}/{row}"}

    def fingerprint(self) -> str:
        """Hash of the file names, their row counts and the columns read."""
        listing = [[Path(f).name, n] for f, n in zip(self.files, self.row_counts)]
        digest = hashlib.sha256(json.dumps([listing, self.image_column, self.caption_column]).encode())
        return f"parquet:n={len(self)}:{digest.hexdigest()[:16]}"
