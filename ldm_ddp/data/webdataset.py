"""The "webdataset" source: samples in local uncompressed tar shards, random access by byte offset.

`data.path` is a shard pattern with brace expansion (`/data/shards-{000000..000009}.tar`, `{a,b}`) or
a folder of `.tar` files, local or an fsspec URL (`s3://bucket/shards-{000..099}.tar`). Construction scans
each shard's tar headers once (names, offsets and sizes; tarfile seeks past the data, so the cost is one
header read per member, not a read of the shard) and groups members into samples by key: the name up to the
first dot after the last '/'. `source[i]` then opens the shard, seeks to the member and reads its bytes only.

A sample's image is its .jpg / .jpeg / .png / .webp member; its caption is its .txt member, else the
`data.caption_column` field (or "caption") of its .json member; a list of captions is drawn from as in
the parquet source. Groups with neither an image nor a caption (e.g. stray metadata) are not indexed.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
import tarfile

from ..config import ConfigError
from . import files
from .samples import RawSource

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "json")
RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: `{000..003}` (zero padding kept), `{a,b}`, several and nested groups."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth, parts, part_start = 0, [], start + 1
    for end in range(start, len(pattern)):  # find the matching brace and the top-level commas inside
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 1 and pattern[end] == ",":
            parts.append(pattern[part_start:end])
            part_start = end + 1
        if depth == 0:
            break
    else:
        raise ConfigError(f"data.path: unbalanced braces in {pattern}")
    body = pattern[part_start:end]
    numbers = RANGE.match(body) if not parts else None
    if numbers:
        low, high = int(numbers[1]), int(numbers[2])
        width = len(numbers[1]) if numbers[1].startswith("0") else 0
        step = 1 if high >= low else -1
        parts = [str(n).zfill(width) for n in range(low, high + step, step)]
    else:
        parts.append(body)
    prefix, suffix = pattern[:start], pattern[end + 1:]
    return [name for part in parts for name in expand_braces(prefix + part + suffix)]


def list_shards(path: str) -> list[str]:
    """data.path (brace pattern or folder) -> shard paths in pattern (or sorted) order; ConfigError if none.

    Missing shards are not an error here: the source's data.bad_shard policy decides about them."""
    shards = files.list_files(path, (".tar",)) if files.is_dir(path) else expand_braces(path)
    if not shards:
        raise ConfigError(f"data.path: no .tar shards in {path}")
    return shards


def scan_shard(path: str) -> tuple[list[tuple[str, dict]], int]:
    """One pass over a shard's headers -> ([(sample key, {ext: (offset, size)})], member count)."""
    samples: dict[str, dict] = {}
    count = 0
    try:
        if not files.is_file(path):
            raise FileNotFoundError("no such file")
        # "r:" refuses compressed shards: they cannot be seeked into.
        with files.open_binary(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                count += 1
                folder, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if dot and ext.lower() in IMAGE_EXTENSIONS + CAPTION_EXTENSIONS:
                    key = f"{folder}/{stem}" if folder else stem
                    samples.setdefault(key, {})[ext.lower()] = (member.offset_data, member.size)
    except (OSError, tarfile.TarError) as err:
        raise ShardError(f"cannot read {path} as an uncompressed tar ({err})".replace("\n", " ")) from None
    return list(samples.items()), count


class ShardError(Exception):
    """A shard that cannot be opened at all; data.bad_shard decides: stop the run, or skip it."""


def skip_or_stop(path: str, err: ShardError, policy: str, is_main: bool) -> None:
    """data.bad_shard: "stop" -> ConfigError naming the shard; "skip" -> one warning line, printed where
    `is_main` (every rank applies the same rule; the source's fingerprint lists skipped shards, and the
    trainer checks that all ranks agree on it, so a shard readable on one rank only cannot split the
    order)."""
    if policy != "skip":
        raise ConfigError(f"data.path: {err} (data.bad_shard=skip leaves such shards out)")
    if is_main:
        print(f"data: skipping shard {files.name_of(path)}: {err} (data.bad_shard=skip)", flush=True)


class WebDatasetSource(RawSource):
    """Samples of tar shards;
    `source[i]` -> {"image": lazily opened PIL image, "caption", "key": "<shard>/<key>"}."""

    random_access = True
    latent = False
    has_raw = True
    pairs = False

    def __init__(self, path: str, caption_column: str = "text", seed: int = 0, bad_shard: str = "stop",
                 is_main: bool = True):
        self.path, self.caption_column, self.seed = path, caption_column, seed
        self.shards, self.skipped = [], []
        self.samples, self.member_counts = [], []  # samples: (shard number, key, {ext: (offset, size)})
        for shard in list_shards(path):
            try:
                found, count = scan_shard(shard)
            except ShardError as err:
                skip_or_stop(shard, err, bad_shard, is_main)
                self.skipped.append(files.name_of(shard))
                continue
            self.samples += [(len(self.shards), key, members) for key, members in found]
            self.shards.append(shard)
            self.member_counts.append(count)
        if not self.samples:
            raise ConfigError(f"data.path: no samples (.{', .'.join(IMAGE_EXTENSIONS)} or captions) "
                              f"in {path}")

    def __len__(self) -> int:
        return len(self.samples)

    def shard_sizes(self) -> list[int]:
        """Samples per shard, in index order (a shard's samples are contiguous indices)."""
        return [sum(1 for _ in group) for _, group in itertools.groupby(s for s, _, _ in self.samples)]

    def where(self) -> str:
        return f"webdataset {self.path}"

    def left_out(self) -> dict[str, int]:
        return {"shard{s} skipped (data.bad_shard=skip)": len(self.skipped)}

    def key(self, index: int) -> str:
        shard, key, _ = self.samples[index]
        return f"{files.name_of(self.shards[shard]).removesuffix('.tar')}/{key}"

    def raw(self, index: int) -> dict:
        """Image bytes and caption(s): the .txt member, else the .json field; raises if either is missing."""
        shard, _, members = self.samples[index]
        path = self.shards[shard]
        if "txt" in members:
            captions = files.read_bytes(path, *members["txt"]).decode("utf-8")
        elif "json" in members:
            record = json.loads(files.read_bytes(path, *members["json"]))
            captions = record.get(self.caption_column if self.caption_column in record else "caption")
        else:
            raise ValueError("no .txt or .json caption")
        ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        if ext is None:
            raise ValueError("no image member")
        return {"key": self.key(index), "image": files.read_bytes(path, *members[ext]), "captions": captions}

    def fingerprint(self) -> str:
        """Hash of the shard names, their member counts, the skipped shards and the caption field."""
        listing = [[files.name_of(s), n] for s, n in zip(self.shards, self.member_counts)]
        digest = hashlib.sha256(json.dumps([listing, self.caption_column]
                                           + ([self.skipped] if self.skipped else [])).encode())
        return f"webdataset:n={len(self)}:{digest.hexdigest()[:16]}"
