"""The "hf" source: a Hugging Face `datasets` dataset, random access by row (map-style).

`data.path` is a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (detected by its
`state.json` / `dataset_dict.json` and opened with `load_from_disk`), or anything `datasets.load_dataset`
accepts: a local data folder (parquet, imagefolder, csv, json ...), a single data file, or a hub name
(which needs the network or the local cache; set HF_DATASETS_OFFLINE=1 to never touch the hub).
`data.hf_split` picks the split (default "train").

The image column may be a `datasets.Image` feature (cast to `Image(decode=False)`, so this source gets
bytes or a path and decodes itself: a corrupt image then fails inside `source[i]`, where the stream's
bad-sample rule replaces and names it) or raw encoded bytes. A caption cell may be one string or a list
of strings; see `parquet.pick_caption`.

Streaming (`data.hf_streaming = true`) is refused for now: a streaming dataset has no random access
and no per-shard index, so the exact resume the stream promises (DESIGN.md, "Data order") cannot hold.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from PIL import Image as PILImage

from ..config import ConfigError
from .parquet import open_image, pick_caption

# One file of these extensions as data.path: loaded with the matching `datasets` packaged builder.
FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:300]


def load_hf_dataset(path: str, split: str):
    """data.path + data.hf_split -> a map-style `datasets.Dataset`; ConfigError (one line) when it fails."""
    import datasets  # imported late: config handling and other sources stay fast

    root = Path(path)
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():  # save_to_disk folder
        try:
            loaded = datasets.load_from_disk(str(root))
        except Exception as err:
            raise ConfigError(f"data.path: cannot load {path} with load_from_disk ({_one_line(err)})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ConfigError(f"data.hf_split: no split {split!r} in {path} (has {sorted(loaded)})")
            return loaded[split]
        saved = str(loaded.split) if loaded.split is not None else None
        if saved is not None and saved != split:  # one saved Dataset: its own split, when recorded, must match
            raise ConfigError(f"data.hf_split: {path} holds one split {saved!r}, not {split!r}")
        return loaded
    builder, data_files = path, None
    if root.is_file() and root.suffix.lower() in FILE_BUILDERS:
        builder, data_files = FILE_BUILDERS[root.suffix.lower()], str(root)
    try:
        return datasets.load_dataset(builder, data_files=data_files, split=split)
    except ValueError as err:  # datasets: 'Unknown split "x". Should be one of [...]'
        if "split" in str(err).lower():
            raise ConfigError(f"data.hf_split: {split!r} not in {path} ({_one_line(err)})") from None
        raise ConfigError(f"data.path: cannot load {path} with datasets.load_dataset ({_one_line(err)})") from None
    except Exception as err:  # missing folder, no network for a hub name, unknown format, ...
        raise ConfigError(f"data.path: cannot load {path} with datasets.load_dataset "
                          f"({type(err).__name__}: {_one_line(err)})") from None


class HFDatasetSource:
    """Rows of a `datasets.Dataset`; `source[i]` -> {"image": lazily opened PIL image, "caption", "key": "<split>/<i>"}."""

    def __init__(self, path: str, image_column: str = "image", caption_column: str = "text", seed: int = 0,
                 split: str = "train", streaming: bool = False):
        if streaming:
            raise ConfigError("data.hf_streaming: streaming resume is not supported yet (a streaming dataset has no "
                              "random access or index); use a local copy "
                              "(save_to_disk folder or Parquet files) with data.hf_streaming=false")
        if not path:
            raise ConfigError("data.path: expected a dataset name or local path for the hf source, got ''")
        import datasets

        ds = load_hf_dataset(path, split)
        for key, column in (("data.image_column", image_column), ("data.caption_column", caption_column)):
            if column not in ds.column_names:
                raise ConfigError(f"{key}: no column {column!r} in {path} split {split!r} (has {sorted(ds.column_names)})")
        if not len(ds):
            raise ConfigError(f"data.path: no rows in split {split!r} of {path}")
        self.base_fingerprint = getattr(ds, "_fingerprint", None) or ""  # of the dataset as loaded
        ds = ds.select_columns([image_column, caption_column])  # other (image) columns are never read
        if isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))  # bytes/path: decoded here
        self.dataset, self.path, self.split = ds, path, split
        self.image_column, self.caption_column, self.seed = image_column, caption_column, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def key(self, index: int) -> str:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range ({len(self)} rows)")
        return f"{self.split}/{index}"

    def __getitem__(self, index: int) -> dict:
        key = self.key(index)
        row = self.dataset[index]
        caption = pick_caption(row[self.caption_column], self.seed, index)
        value = row[self.image_column]
        if isinstance(value, dict) and not value.get("bytes") and value.get("path"):
            image = PILImage.open(value["path"])  # an Image feature that stores a file path, not bytes
        else:
            image = open_image(value)
        return {"image": image, "caption": caption, "key": key}

    def fingerprint(self) -> str:
        """Hash of the dataset's own fingerprint (when it has one), the split, the columns read and the length."""
        digest = hashlib.sha256(json.dumps([self.base_fingerprint, self.split, self.image_column,
                                            self.caption_column, len(self)]).encode())
        return f"hf:n={len(self)}:{digest.hexdigest()[:16]}"
