"""The "folder" source: images with captions (a local folder or an fsspec URL), indexed once so that
`source[i]` is random access.

Captions come from `metadata.jsonl` or `metadata.csv` in the folder (a `file_name` column, relative
to the folder, and a caption column), else from a `.txt` file beside each image. The index is every
file with an image extension, sorted by relative path; bad files (empty, not an image, truncated,
no caption) stay in it and raise in `__getitem__`, where the stream replaces and names them.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import warnings
from pathlib import Path, PurePosixPath

from PIL import Image

from ..config import ConfigError
from . import files
from .samples import RawSource

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def list_images(root: str) -> list[str]:
    """Relative POSIX paths of the image files under `root`, sorted (hidden files and folders skipped)."""
    if files.is_url(root):
        from fsspec.core import url_to_fs
        fs, base = url_to_fs(root)
        names = [PurePosixPath(p).relative_to(base.rstrip("/") or "/").as_posix() for p in fs.find(base)]
    else:
        names = []
        for folder, dirs, found in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            names += [(Path(folder).relative_to(root) / f).as_posix() for f in found]
    # Hidden files and folders (e.g. .ipynb_checkpoints, .cache) are not data.
    return sorted(n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)
                  and not any(part.startswith(".") for part in n.split("/")))


def read_metadata(path: str, column: str) -> dict[str, str]:
    """metadata.jsonl / metadata.csv -> {relative file name: caption(s)}; ConfigError if unreadable."""
    try:
        text = files.read_bytes(path).decode("utf-8-sig")  # -sig: a byte-order mark
        # (Excel's "CSV UTF-8") dropped
        if path.endswith(".csv"):
            rows = list(csv.DictReader(io.StringIO(text)))
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.path: cannot read {path} ({err})") from None
    if rows and not all(isinstance(r, dict) and "file_name" in r for r in rows):
        raise ConfigError(f"data.path: every row of {path} needs a file_name")
    if rows and not any(column in r for r in rows):
        raise ConfigError(f"data.caption_column: no column {column!r} in {path} (has {sorted(rows[0])})")
    return {os.path.normpath(r["file_name"]).replace(os.sep, "/"): r.get(column) for r in rows}


def shorter_side(path: str) -> int | None:
    """Shorter side in px from the image header only; None if the header does not read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a bomb's size still reads; the transform refuses it later
            with files.open_binary(path) as f, Image.open(f) as image:
                return min(image.size)
    except Exception:  # unreadable: keep it indexed so that it fails, named, in __getitem__
        return None


class ImageFolderSource(RawSource):
    """Images under `path` with captions;
    `source[i]` -> {"image": lazily opened PIL image, "caption", "key"}."""

    random_access = True
    latent = False
    has_raw = True

    def __init__(self, path: str, caption_column: str = "text", min_size: int = 0, seed: int = 0,
                 is_main: bool = True):
        self.root, self.caption_column, self.min_size, self.seed = str(path), caption_column, min_size, seed
        names = list_images(self.root)
        self.filtered = 0
        if min_size:
            # Headers only: deterministic, and far cheaper than decoding every image. An unreadable
            # header (None) counts as large enough, so the file fails by name when loaded.
            kept = [f for f in names if (shorter_side(self.path(f)) or min_size) >= min_size]
            self.filtered = len(names) - len(kept)
            names = kept
            if is_main:
                print(f"data: min_size={min_size} left out {self.filtered} of {len(names) + self.filtered} "
                      f"images under {self.root}", flush=True)
        if not names:
            raise ConfigError(f"data.path: no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        present = [name for name in METADATA_FILES if files.is_file(self.path(name))]
        if len(present) > 1:
            raise ConfigError(f"data.path: both {' and '.join(present)} in {self.root}; keep one")
        self.files = names
        self.metadata = present[0] if present else None
        self.captions = read_metadata(self.path(self.metadata), caption_column) if self.metadata else None
        self._fingerprint = self._digest()

    def path(self, name: str) -> str:
        return files.join(self.root, name)

    def _digest(self) -> str:
        """Hash of the indexed file list, their sizes and the caption source (its bytes or .txt sizes)."""
        digest = hashlib.sha256(json.dumps([self.metadata, self.caption_column, self.min_size]).encode())
        if self.metadata:
            digest.update(files.read_bytes(self.path(self.metadata)))
        sizes = self._sizes()
        for name in self.files:
            entry = [name, sizes.get(name, -1)]
            if not self.metadata:
                entry.append(sizes.get(str(PurePosixPath(name).with_suffix(".txt")), -1))
            digest.update(json.dumps(entry).encode())
        return digest.hexdigest()[:16]

    def _sizes(self) -> dict[str, int]:
        """{relative name: size in bytes} of every file under the root (one listing, not a stat per file)."""
        if files.is_url(self.root):
            from fsspec.core import url_to_fs
            fs, base = url_to_fs(self.root)
            return {PurePosixPath(p).relative_to(base.rstrip("/") or "/").as_posix(): int(info["size"])
                    for p, info in fs.find(base, detail=True).items()}
        sizes = {}
        for folder, _, found in os.walk(self.root):
            for f in found:
                full = os.path.join(folder, f)
                sizes[Path(full).relative_to(self.root).as_posix()] = os.path.getsize(full)
        return sizes

    def __len__(self) -> int:
        return len(self.files)

    def key(self, index: int) -> str:
        return self.files[index]

    def shard_sizes(self) -> None:
        return None  # one file per image: any order reads alike

    def captions_of(self, index: int):
        """The caption cell of image `index` (a string or a list); raises if there is none."""
        name = self.files[index]
        if self.captions is not None:
            text = self.captions.get(name)
            if text is None:
                raise ValueError(f"no row in {self.metadata}")
            return text
        txt = str(PurePosixPath(name).with_suffix(".txt"))
        try:
            return files.read_bytes(self.path(txt)).decode("utf-8-sig")
        except FileNotFoundError:
            raise ValueError(f"no caption file {PurePosixPath(txt).name}") from None

    def raw(self, index: int) -> dict:
        # The caption first: a missing one fails before the image is read.
        captions = self.captions_of(index)
        return {"key": self.files[index], "image": files.read_bytes(self.path(self.files[index])),
                "captions": captions}

    def fingerprint(self) -> str:
        return f"folder:n={len(self.files)}:{self._fingerprint}"
