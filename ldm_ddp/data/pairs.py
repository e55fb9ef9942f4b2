"""Preference pairs for Diffusion-DPO: one caption, a preferred image and a rejected one.

A pair is one sample of the sharded stream: it has one position in the global order, both images get the
same crop and flip draws and go to the preferred image's bucket, and a pair whose either image fails is
replaced whole by a substitute pair. A raw pair record is {"key", "image": preferred bytes, "rejected":
rejected bytes, "captions"}; `source[i]` opens both lazily (samples.sample_from_raw).

Layouts (docs/dpo.md):
- "pairs": a folder with `pairs.jsonl`, one {"caption", "preferred", "rejected"} object per line, the two
  image paths relative to the folder (or absolute). A line that is not such an object, or names a file
  that is not there, is left out, counted and named at start.
- "pickapic": Parquet files of the Pick-a-Pic layout: `jpg_0`, `jpg_1` (encoded images), `label_0` (1: the
  first preferred, 0: the second, 0.5: a tie) and `caption`. Ties are left out and counted; so are rows
  whose label is none of the three.
- "shapes_pairs": the built-in set of the demo (data/shapes.py): a caption's own rendering against a
  rendering with one attribute changed.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
from pathlib import Path

import numpy as np

from ..config import ConfigError
from .parquet import ParquetSource, parquet_file
from .samples import RawSource, header_size
from .shapes import COLOURS, POSITIONS, SHAPES, SIZES, ShapesSource, render

PAIRS_FILE = "pairs.jsonl"


class PairFolderSource(RawSource):
    """`<path>/pairs.jsonl`: caption, preferred and rejected image paths per line."""

    random_access = True
    latent = False
    has_raw = True
    pairs = True

    def __init__(self, path: str, seed: int = 0, is_main: bool = True):
        self.root, self.seed = Path(path), seed
        listing = self.root / PAIRS_FILE
        if not listing.is_file():
            raise ConfigError(f"data.path: no {PAIRS_FILE} in {path} (one {{\"caption\", \"preferred\", "
                              "\"rejected\"} object per line)")
        self.rows, self.bad_lines, self.missing = [], [], []
        for number, line in enumerate(listing.read_bytes().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pair = [row["caption"], row["preferred"], row["rejected"]]
                if not all(isinstance(v, str) for v in pair):
                    raise TypeError("caption, preferred and rejected must be strings")
            except (ValueError, TypeError, KeyError) as err:
                self.bad_lines.append(f"line {number}: {type(err).__name__}: {err}"[:200])
                continue
            images = [self.root / p for p in pair[1:]]
            if not all(p.is_file() for p in images):
                absent = " or ".join(str(p) for p in images if not p.is_file())
                self.missing.append(f"line {number}: no image {absent}")
                continue
            self.rows.append((number, pair[0], *images))
        if is_main and (self.bad_lines or self.missing):
            for said in (self.bad_lines + self.missing)[:3]:
                print(f"warning: data: {listing} {said} left out", flush=True)
        if not self.rows:
            raise ConfigError(f"data.path: no usable pair in {listing}")

    def __len__(self) -> int:
        return len(self.rows)

    def key(self, index: int) -> str:
        return f"{PAIRS_FILE}:{self.rows[index][0]}"

    def shard_sizes(self) -> None:
        return None

    def where(self) -> str:
        return f"pairs {self.root}"

    def left_out(self) -> dict[str, int]:
        return {"unreadable line{s}": len(self.bad_lines),
                "line{s} naming a missing image": len(self.missing)}

    def raw(self, index: int) -> dict:
        _, text, preferred, rejected = self.rows[index]
        return {"key": self.key(index), "image": preferred.read_bytes(), "rejected": rejected.read_bytes(),
                "captions": text}

    def image_sizes(self) -> np.ndarray:
        """The preferred images' sizes (a pair goes to its preferred image's bucket), from their headers."""
        sizes = np.zeros((len(self), 2), np.int64)
        for i, (_, _, preferred, _) in enumerate(self.rows):
            with open(preferred, "rb") as f:
                sizes[i] = header_size(f.read(1 << 16))  # a header fits in the first 64 KiB
        return sizes

    def fingerprint(self) -> str:
        """Hash of the listing's kept lines and each image's size in bytes."""
        digest = hashlib.sha256()
        for number, text, preferred, rejected in self.rows:
            digest.update(json.dumps([number, text, str(preferred), os.path.getsize(preferred),
                                      str(rejected), os.path.getsize(rejected)]).encode())
        return f"pairs:n={len(self)}:{digest.hexdigest()[:16]}"


class PickAPicSource(ParquetSource):
    """Pick-a-Pic Parquet rows without ties: the index maps kept pairs to (row group, row)."""

    pairs = True
    COLUMNS = ("jpg_0", "jpg_1", "label_0", "caption")

    def __init__(self, path: str, seed: int = 0, bad_shard: str = "stop", cached_groups: int = 8,
                 is_main: bool = True):
        super().__init__(path, "jpg_0", "caption", seed, bad_shard, cached_groups, is_main)
        self.rows, kept_sizes, self.ties, self.unlabelled = [], [], 0, 0
        for group, (f, g) in enumerate(self.groups):
            labels = parquet_file(self.files[f]).read_row_group(g, columns=["label_0"]).column(0).to_pylist()
            kept = [(group, r) for r, label in enumerate(labels) if label in (0, 1)]
            self.ties += sum(label == 0.5 for label in labels)
            self.unlabelled += len(labels) - len(kept) - sum(label == 0.5 for label in labels)
            self.rows += kept
            kept_sizes.append(len(kept))
        self.kept_sizes = kept_sizes
        if not self.rows:
            raise ConfigError(f"data.path: no pair with a preference (label_0 of 0 or 1) at {path}")

    def check_columns(self, columns: set[str], name: str) -> None:
        missing = [c for c in self.COLUMNS if c not in columns]
        if missing:
            raise ConfigError(f"data.path: {name} is not in the Pick-a-Pic layout: no column {missing[0]!r} "
                              f"(has {sorted(columns)})")

    def read_columns(self) -> list[str]:
        return list(self.COLUMNS)

    def __len__(self) -> int:
        return len(self.rows)

    def shard_sizes(self) -> list[int]:
        return list(self.kept_sizes)

    def where(self) -> str:
        return f"pickapic {self.path}"

    def left_out(self) -> dict[str, int]:
        return {**super().left_out(), "tie{s}": self.ties, "row{s} without a 0/1 label": self.unlabelled}

    def key(self, index: int) -> str:
        group, row = self.rows[index]
        f, _ = self.groups[group]
        within = int(self.group_starts[group] - self.file_starts[f]) + row
        return f"{Path(self.files[f]).stem}/{within}"

    def raw(self, index: int) -> dict:
        group, row = self.rows[index]
        table = self._table(group)
        first, second = (table.column(c)[row].as_py() for c in ("jpg_0", "jpg_1"))
        first_preferred = table.column("label_0")[row].as_py() == 1
        preferred, rejected = (first, second) if first_preferred else (second, first)
        return {"key": self.key(index), "image": preferred, "rejected": rejected,
                "captions": table.column("caption")[row].as_py()}

    def fingerprint(self) -> str:
        return f"pickapic:{super().fingerprint().split(':', 1)[1]}:kept={len(self)}"


class ShapesPairsSource(ShapesSource):
    """The demo's preference set: sample i's caption, its own rendering preferred, and rejected the same
    rendering (same jitter and background) with one attribute changed: the shape for half of the pairs (the
    attribute the demo model gets wrong most often), colour, size or position for the rest."""

    pairs = True
    CHANGED = (("shape", SHAPES, 0.5), ("colour", tuple(COLOURS), 0.2), ("size", SIZES, 0.15),
               ("position", POSITIONS, 0.15))

    def __getitem__(self, index: int) -> dict:
        sample = super().__getitem__(index)
        rng = random.Random(f"shapes_pairs:{self.seed}:{index}")
        name, values, _ = rng.choices(self.CHANGED, weights=[w for *_, w in self.CHANGED])[0]
        changed = {**sample["attrs"], name: rng.choice([v for v in values if v != sample["attrs"][name]])}
        return {**sample, "rejected": render(changed, self.resolution), "changed": name}

    def where(self) -> str:
        return "shapes_pairs (synthetic)"

    def raw(self, index: int) -> dict:
        sample = self[index]
        encoded = []
        for image in (sample["image"], sample["rejected"]):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            encoded.append(buf.getvalue())
        return {"key": sample["key"], "image": encoded[0], "rejected": encoded[1],
                "captions": sample["caption"]}

    def fingerprint(self) -> str:
        return "pairs-" + super().fingerprint()

