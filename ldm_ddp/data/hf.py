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

Streaming (`data.hf_streaming = true`, `HFStreamSource`): `load_dataset(..., streaming=True)` has no
random access, so the global order is the stream's own: epoch e is the dataset shuffled by `datasets`
(seed data.seed + e, a buffer of 1000 samples), and position g is the
(g mod N)-th record of epoch g // N. Every DataLoader worker of every rank reads the whole stream and
decodes only its own positions (read traffic x ranks x workers); resuming restarts the epoch's stream
and skips, without decoding, the records before the resume position. Exact, but it costs reading that
much of the epoch again: for large runs, convert once with scripts/make_shards.py.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..config import ConfigError
from . import files
from .samples import RawSource
from .sources import DataSource

# One file of these extensions as data.path: loaded with the matching `datasets` packaged builder.
FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:300]


def load_hf_dataset(path: str, split: str, streaming: bool = False):
    """data.path + data.hf_split -> a `datasets.Dataset` (or IterableDataset when streaming); ConfigError
    (one line) when it fails."""
    import datasets  # imported late: config handling and other sources stay fast

    root = Path(path)
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():  # save_to_disk folder
        try:
            loaded = datasets.load_from_disk(str(root))
        except Exception as err:
            raise ConfigError(f"data.path: cannot load {path} with load_from_disk "
                              f"({_one_line(err)})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ConfigError(f"data.hf_split: no split {split!r} in {path} (has {sorted(loaded)})")
            loaded = loaded[split]
            return loaded.to_iterable_dataset() if streaming else loaded
        saved = str(loaded.split) if loaded.split is not None else None
        if saved is not None and saved != split:  # one saved Dataset: its own split,
            # when recorded, must match
            raise ConfigError(f"data.hf_split: {path} holds one split {saved!r}, not {split!r}")
        return loaded.to_iterable_dataset() if streaming else loaded
    builder, data_files = path, None
    if root.is_file() and root.suffix.lower() in FILE_BUILDERS:
        builder, data_files = FILE_BUILDERS[root.suffix.lower()], str(root)
    try:
        return datasets.load_dataset(builder, data_files=data_files, split=split, streaming=streaming)
    except ValueError as err:  # datasets: 'Unknown split "x". Should be one of [...]'
        if "split" in str(err).lower():
            raise ConfigError(f"data.hf_split: {split!r} not in {path} ({_one_line(err)})") from None
        raise ConfigError(f"data.path: cannot load {path} with datasets.load_dataset "
                          f"({_one_line(err)})") from None
    except Exception as err:  # missing folder, no network for a hub name, unknown format, ...
        raise ConfigError(f"data.path: cannot load {path} with datasets.load_dataset "
                          f"({type(err).__name__}: {_one_line(err)})") from None


def local_fingerprint(root: Path) -> str:
    """A local data file or folder -> a digest of its files' relative names and sizes
    (hidden ones left out)."""
    if root.is_file():
        entries = [[root.name, root.stat().st_size]]
    else:
        found = sorted(p for p in root.rglob("*") if p.is_file())
        entries = [[str(p.relative_to(root)), p.stat().st_size] for p in found
                   if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def image_bytes(value):
    """An image cell: encoded bytes, or an Image feature's {"bytes", "path"}
    (a path is read: local or URL)."""
    if isinstance(value, dict):
        if not value.get("bytes") and value.get("path"):
            return files.read_bytes(value["path"])
        return value.get("bytes")
    return value


class HFDatasetSource(RawSource):
    """Rows of a `datasets.Dataset`;
    `source[i]` -> {"image": lazily opened PIL image, "caption", "key": "<split>/<i>"}."""

    random_access = True
    latent = False
    has_raw = True
    pairs = False

    def __init__(self, path: str, image_column: str = "image", caption_column: str = "text", seed: int = 0,
                 split: str = "train"):
        if not path:
            raise ConfigError("data.path: expected a dataset name or local path for the hf source, got ''")
        import datasets

        ds = load_hf_dataset(path, split)
        for key, column in (("data.image_column", image_column), ("data.caption_column", caption_column)):
            if column not in ds.column_names:
                raise ConfigError(f"{key}: no column {column!r} in {path} split {split!r} "
                                  f"(has {sorted(ds.column_names)})")
        if not len(ds):
            raise ConfigError(f"data.path: no rows in split {split!r} of {path}")
        # A local dataset: its files' names and sizes (datasets' own fingerprint of local files depends on
        # their modification time and absolute path, so node-local copies or a touched file would differ); a
        # hub dataset: datasets' fingerprint of it as loaded (its revision).
        local = Path(path).exists()
        self.base_fingerprint = (local_fingerprint(Path(path)) if local
                                 else getattr(ds, "_fingerprint", None) or "")
        ds = ds.select_columns([image_column, caption_column])  # other (image) columns are never read
        if isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))  # bytes/path: decoded here
        self.dataset, self.path, self.split = ds, path, split
        self.image_column, self.caption_column, self.seed = image_column, caption_column, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def where(self) -> str:
        return f"hf {self.path} split {self.split}"

    def key(self, index: int) -> str:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range ({len(self)} rows)")
        return f"{self.split}/{index}"

    def shard_sizes(self) -> None:
        return None  # one memory-mapped table: any order reads alike

    def raw(self, index: int) -> dict:
        key = self.key(index)
        row = self.dataset[index]
        return {"key": key, "image": image_bytes(row[self.image_column]),
                "captions": row[self.caption_column]}

    def fingerprint(self) -> str:
        """Hash of the dataset's own fingerprint (when it has one), the split,
        the columns read and the length."""
        digest = hashlib.sha256(json.dumps([self.base_fingerprint, self.split, self.image_column,
                                            self.caption_column, len(self)]).encode())
        return f"hf:n={len(self)}:{digest.hexdigest()[:16]}"


class HFStreamSource(DataSource):
    """A streamed `datasets` dataset: records in the stream's order (see the module docstring)."""

    random_access = False  # the stream (stream.StreamReader) reads it in order; there is no source[i]
    latent = False
    has_raw = False  # records(epoch) instead: raw(i) would need an index
    pairs = False

    def __init__(self, path: str, image_column: str = "image", caption_column: str = "text", seed: int = 0,
                 split: str = "train", shuffle_buffer: int = 1000):
        if not path:
            raise ConfigError("data.path: expected a dataset name or local path for the hf source, got ''")
        import datasets

        ds = load_hf_dataset(path, split, streaming=True)
        names = list(ds.features) if ds.features is not None else None
        for key, column in (("data.image_column", image_column), ("data.caption_column", caption_column)):
            if names is not None and column not in names:
                raise ConfigError(f"{key}: no column {column!r} in {path} split {split!r} "
                                  f"(has {sorted(names)})")
        ds = ds.select_columns([image_column, caption_column])
        if ds.features is not None and isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))  # bytes: decoded by the stream
        self.dataset, self.path, self.split, self.buffer = ds, path, split, shuffle_buffer
        self.image_column, self.caption_column, self.seed = image_column, caption_column, seed
        split_info = (ds.info.splits or {}).get(split) if ds.info else None
        self.num_samples = split_info.num_examples if split_info and split_info.num_examples else None
        if not self.num_samples:  # unknown length: one pass over the stream to count it (no decoding)
            self.num_samples = sum(len(batch[caption_column]) for batch in ds.iter(batch_size=256))
        if not self.num_samples:
            raise ConfigError(f"data.path: no rows in split {split!r} of {path}")

    def __len__(self) -> int:
        return self.num_samples

    def where(self) -> str:
        return f"hf {self.path} split {self.split}, streamed"

    def key(self, position: int) -> str:
        """The record at global `position`, named as records() names it: "<split>/<epoch>/<n>"."""
        epoch, n = divmod(position, len(self))
        return f"{self.split}/{epoch}/{n}"

    def shard_sizes(self) -> None:
        return None  # read in the stream's order, not shuffled by shard

    def records(self, epoch: int):
        """Raw records of `epoch` in order: {"key": "<split>/<epoch>/<n>", "image": bytes, "captions"}."""
        ds = self.dataset
        if self.buffer:
            ds = ds.shuffle(seed=self.seed, buffer_size=self.buffer)
            ds.set_epoch(epoch)  # datasets reshuffles with seed + epoch: deterministic per epoch
        # iter(batch_size) rather than `for row in ds`: inside a DataLoader worker, datasets' __iter__ would
        # hand this worker only its share of the stream's shards, and the order here is ours to split.
        n = 0
        for batch in ds.iter(batch_size=64):
            for image, captions in zip(batch[self.image_column], batch[self.caption_column]):
                yield {"key": f"{self.split}/{epoch}/{n}", "image": image_bytes(image), "captions": captions}
                n += 1

    def fingerprint(self) -> str:
        """Hash of the path, split, columns read, shuffle buffer and length."""
        digest = hashlib.sha256(json.dumps([self.path, self.split, self.image_column, self.caption_column,
                                            self.buffer, len(self)]).encode())
        return f"hf-stream:n={len(self)}:{digest.hexdigest()[:16]}"
