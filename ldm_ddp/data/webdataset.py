"""The "webdataset" source: samples in local uncompressed tar shards, random access by byte offset.

`data.path` is a shard pattern with brace expansion (`/data/shards-{000000..000009}.tar`, `{a,b}`) or
a folder of `.tar` files. Construction scans each shard's tar headers once (names, offsets and sizes;
tarfile seeks past the data, so the cost is one header read per member, not a read of the shard) and
groups members into samples by key: the name up to the first dot after the last '/'. `source[i]` then
opens the shard, seeks to the member and reads its bytes only.

A sample's image is its .jpg / .jpeg / .png / .webp member; its caption is its .txt member, else the
`data.caption_column` field (or "caption") of its .json member; a list of captions is drawn from as in
the parquet source. Groups with neither an image nor a caption (e.g. stray metadata) are not indexed.
"""
from __future__ import annotations

import hashlib
import json
import re
import tarfile
from pathlib import Path

from ..config import ConfigError
from .parquet import open_image, pick_caption

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
    """data.path (brace pattern or folder) -> shard paths in pattern (or sorted) order; ConfigError if missing."""
    shards = sorted(str(p) for p in Path(path).glob("*.tar")) if Path(path).is_dir() else expand_braces(path)
    if not shards:
        raise ConfigError(f"data.path: no .tar shards in {path}")
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise ConfigError(f"data.path: no such shard {missing[0]} ({len(missing)} of {len(shards)} missing)")
    return shards


def scan_shard(path: str) -> tuple[list[tuple[str, dict]], int]:
    """One pass over a shard's headers -> ([(sample key, {ext: (offset, size)})], member count)."""
    samples: dict[str, dict] = {}
    count = 0
    try:
        with tarfile.open(path, "r:") as tar:  # "r:" refuses compressed shards: they cannot be seeked into
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
        message = f"data.path: cannot read {path} as an uncompressed tar ({err})"
        raise ConfigError(message.replace("\n", " ")) from None
    return list(samples.items()), count


def read_bytes(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:  # opened per read: no handle is shared across forked workers
        f.seek(offset)
        return f.read(size)


class WebDatasetSource:
    """Samples of tar shards; `source[i]` -> {"image": lazily opened PIL image, "caption", "key": "<shard>/<key>"}."""

    def __init__(self, path: str, caption_column: str = "text", seed: int = 0):
        self.shards, self.caption_column, self.seed = list_shards(path), caption_column, seed
        self.samples, self.member_counts = [], []  # samples: (shard number, key, {ext: (offset, size)})
        for s, shard in enumerate(self.shards):
            found, count = scan_shard(shard)
            self.samples += [(s, key, members) for key, members in found]
            self.member_counts.append(count)
        if not self.samples:
            raise ConfigError(f"data.path: no samples (.{', .'.join(IMAGE_EXTENSIONS)} or captions) in {path}")

    def __len__(self) -> int:
        return len(self.samples)

    def key(self, index: int) -> str:
        shard, key, _ = self.samples[index]
        return f"{Path(self.shards[shard]).stem}/{key}"

    def caption(self, index: int) -> str:
        """The caption of sample `index` (.txt, else the .json field); raises if missing or empty."""
        shard, _, members = self.samples[index]
        if "txt" in members:
            return pick_caption(read_bytes(self.shards[shard], *members["txt"]).decode("utf-8"), self.seed, index)
        if "json" not in members:
            raise ValueError("no .txt or .json caption")
        record = json.loads(read_bytes(self.shards[shard], *members["json"]))
        field = self.caption_column if self.caption_column in record else "caption"
        return pick_caption(record.get(field), self.seed, index)

    def __getitem__(self, index: int) -> dict:
        shard, _, members = self.samples[index]
        caption = self.caption(index)
        ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
        if ext is None:
            raise ValueError("no image member")
        image = open_image(read_bytes(self.shards[shard], *members[ext]))
        return {"image": image, "caption": caption, "key": self.key(index)}

    def fingerprint(self) -> str:
        """Hash of the shard names, their member counts and the caption field."""
        listing = [[Path(s).name, n] for s, n in zip(self.shards, self.member_counts)]
        digest = hashlib.sha256(json.dumps([listing, self.caption_column]).encode())
        return f"webdataset:n={len(self)}:{digest.hexdigest()[:16]}"
