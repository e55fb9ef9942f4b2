"""The project's indexed shard format (`data.source = "shards"`), written by scripts/make_shards.py.

A shard set is a folder (local or fsspec URL):

    index.json            {"format": "ldm_ddp.shards/1", "num_samples",
                           "shards": [{"file", "count", "bytes"}], "id", and how it was made};
                          written last, so its presence means the set is complete
    shard-000000.tar      plain uncompressed tar, WebDataset-compatible: <n>.jpg|png|webp, <n>.txt (first
                          caption), <n>.json ({"captions": [...], "source_key": ...}); n = sample number
    shard-000000.json     the shard's own index: per sample [source key, image ext, data offset, size] and its
                          captions, so a read is one byte-range request for the image and nothing else

Construction reads index.json and lists the folder once (sizes checked against the index: a missing or
short shard is stopped on or skipped by data.bad_shard); a shard's own index is read on first use, per
process. The shards are the unit of the two-level shuffle (stream.GlobalOrder).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import OrderedDict

import numpy as np

from ..config import ConfigError
from . import files
from .samples import RawSource, header_size, locate
from .webdataset import ShardError, skip_or_stop

FORMAT = "ldm_ddp.shards/1"
INDEX = "index.json"
CACHED_SHARD_INDEXES = 64  # per process; each is a few hundred KB for a 10k-sample shard


def shard_name(number: int) -> str:
    return f"shard-{number:06d}"


def shard_index_name(tar_name: str) -> str:
    return tar_name.removesuffix(".tar") + ".json"


def write_shard(folder: str, number: int, records: list[dict], first_sample: int) -> dict:
    """Write shard `number` of `records` ({"key", "image": bytes, "ext", "captions": [str]}) and its index.

    Local folders only; both files go to temporary names first, then are renamed. -> its index.json entry.
    """
    name = shard_name(number) + ".tar"
    entries, tar_path = [], os.path.join(folder, name)
    with open(tar_path + ".tmp", "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for n, record in enumerate(records, first_sample):
                members = [(record["ext"], record["image"]), ("txt", record["captions"][0].encode()),
                           ("json", json.dumps({"captions": record["captions"],
                                                "source_key": record["key"]}).encode())]
                for ext, data in members:
                    info = tarfile.TarInfo(f"{n:09d}.{ext}")
                    info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: same input, same bytes
                    offset = tar.offset + len(info.tobuf(tar.format, tar.encoding, tar.errors))
                    tar.addfile(info, io.BytesIO(data))
                    if ext == record["ext"]:
                        entries.append([record["key"], ext, offset, len(data)])
        f.flush()
        os.fsync(f.fileno())
    shard_index = {"format": FORMAT, "samples": entries, "captions": [r["captions"] for r in records],
                   "sizes": [list(r["size"]) for r in records]}  # upright (width, height): the buckets
    index_path = os.path.join(folder, shard_index_name(name))
    with open(index_path + ".tmp", "w") as f:
        json.dump(shard_index, f)
    os.replace(tar_path + ".tmp", tar_path)
    os.replace(index_path + ".tmp", index_path)
    return {"file": name, "count": len(records), "bytes": os.path.getsize(tar_path)}


def write_index(folder: str, shards: list[dict], made_with: dict) -> dict:
    """index.json for `shards` (in order), written atomically; its "id" hashes the shard list."""
    listing = json.dumps([[s["file"], s["count"], s["bytes"]] for s in shards])
    index = {"format": FORMAT, "num_samples": sum(s["count"] for s in shards), "shards": shards,
             "id": hashlib.sha256(listing.encode()).hexdigest()[:16], **made_with}
    path = os.path.join(folder, INDEX)
    with open(path + ".tmp", "w") as f:
        json.dump(index, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    return index


def read_index(root: str) -> dict:
    try:
        index = json.loads(files.read_bytes(files.join(root, INDEX)))
    except FileNotFoundError:
        raise ConfigError(f"data.path: no {INDEX} in {root} "
                          "(a shard set is made by scripts/make_shards.py)") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.path: cannot read {files.join(root, INDEX)} ({err})"
                          .replace("\n", " ")) from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ConfigError(f"data.path: {files.join(root, INDEX)} is not a {FORMAT} index")
    return index


class ShardsSource(RawSource):
    """Samples of an indexed shard set; `source[i]` -> {"image", "caption", "key": "<shard>/<source key>"}."""

    random_access = True
    latent = False
    has_raw = True
    pairs = False

    def __init__(self, path: str, seed: int = 0, bad_shard: str = "stop", is_main: bool = True):
        self.root = path.removesuffix(INDEX).rstrip("/") or path
        index = read_index(self.root)
        self.seed, self.id = seed, index["id"]
        self.made_skipped = int(index.get("made_with", {}).get("skipped", 0))  # left out by make_shards
        present = {files.name_of(p): p for p in files.list_files(self.root, (".tar",))}
        self.shards, self.counts, self.skipped = [], [], []
        for entry in index["shards"]:
            path = present.get(entry["file"])
            try:
                if path is None:
                    raise ShardError(f"shard {entry['file']} is missing from {self.root}")
                if files.size_of(path) != entry["bytes"]:
                    raise ShardError(f"shard {path} has {files.size_of(path)} bytes, "
                                     f"its index says {entry['bytes']}")
            except ShardError as err:
                skip_or_stop(path or entry["file"], err, bad_shard, is_main)
                self.skipped.append(entry["file"])
                continue
            self.shards.append(path)
            self.counts.append(int(entry["count"]))
        if not sum(self.counts):
            raise ConfigError(f"data.path: no samples in the shard set {self.root}")
        self.starts = np.cumsum([0] + self.counts)
        self._indexes: OrderedDict = OrderedDict()  # shard number -> its own index; per process,
        # filled by reads

    def __len__(self) -> int:
        return int(self.starts[-1])

    def shard_sizes(self) -> list[int]:
        return list(self.counts)

    def where(self) -> str:
        return f"shards {self.root}"

    def left_out(self) -> dict[str, int]:
        return {"shard{s} skipped (data.bad_shard=skip)": len(self.skipped),
                "sample{s} skipped when the set was made (skipped.jsonl)": self.made_skipped}

    def _shard_index(self, shard: int) -> dict:
        if shard not in self._indexes:
            self._indexes[shard] = json.loads(files.read_bytes(shard_index_name(self.shards[shard])))
            if len(self._indexes) > CACHED_SHARD_INDEXES:
                self._indexes.popitem(last=False)
        return self._indexes[shard]

    def key(self, index: int) -> str:
        shard, row = locate(self.starts, index)
        try:
            source_key = self._shard_index(shard)["samples"][row][0]
        except Exception:  # naming a sample must not fail: fall back to its place in the set
            source_key = f"#{row}"
        return f"{files.name_of(self.shards[shard]).removesuffix('.tar')}/{source_key}"

    def image_sizes(self) -> np.ndarray:
        """From the shards' own indexes (make_shards.py records each image's size); a set made before that
        reads its image headers."""
        sizes = np.zeros((len(self), 2), np.int64)
        for shard, start in enumerate(self.starts[:-1]):
            recorded = self._shard_index(shard).get("sizes")
            if recorded is not None:
                sizes[start:start + len(recorded)] = recorded
            else:
                for row in range(self.counts[shard]):
                    sizes[start + row] = header_size(self.raw(start + row)["image"])
        return sizes

    def raw(self, index: int) -> dict:
        shard, row = locate(self.starts, index)
        shard_index = self._shard_index(shard)
        _, _, offset, size = shard_index["samples"][row]
        return {"key": self.key(index), "image": files.read_bytes(self.shards[shard], offset, size),
                "captions": shard_index["captions"][row]}

    def fingerprint(self) -> str:
        """The set's id (a hash of its shard list) and any skipped shards."""
        digest = hashlib.sha256(json.dumps([self.id, self.skipped]).encode()).hexdigest()[:16]
        return f"shards:n={len(self)}:{digest}"
