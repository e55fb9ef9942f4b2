"""The "folder" source: local images with captions, indexed once so that `source[i]` is random access.

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
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..config import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def list_images(root: Path) -> list[str]:
    """Relative POSIX paths of the image files under `root`, sorted (hidden files and folders skipped)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # e.g. .ipynb_checkpoints, .cache
        rel = Path(folder).relative_to(root)
        found += [(rel / f).as_posix() for f in files
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def read_metadata(path: Path, column: str) -> dict[str, str]:
    """metadata.jsonl / metadata.csv -> {relative file name: caption}; ConfigError if unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".csv":
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


def shorter_side(path: Path) -> int | None:
    """Shorter side in px from the image header only; None if the header does not read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a bomb's size still reads; the transform refuses it later
            with Image.open(path) as image:
                return min(image.size)
    except Exception:  # unreadable: keep it indexed so that it fails, named, in __getitem__
        return None


class ImageFolderSource:
    """Images under `path` with captions; `source[i]` -> {"image": lazily opened PIL image, "caption", "key"}."""

    def __init__(self, path: str, caption_column: str = "text", min_size: int = 0):
        self.root, self.caption_column, self.min_size = Path(path), caption_column, min_size
        files = list_images(self.root)
        if min_size:
            # Headers only: deterministic, and far cheaper than decoding every image. An unreadable
            # header (None) counts as large enough, so the file fails by name when loaded.
            files = [f for f in files if (shorter_side(self.root / f) or min_size) >= min_size]
        if not files:
            raise ConfigError(f"data.path: no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        present = [name for name in METADATA_FILES if (self.root / name).is_file()]
        if len(present) > 1:
            raise ConfigError(f"data.path: both {' and '.join(present)} in {self.root}; keep one")
        self.files = files
        self.metadata = present[0] if present else None
        self.captions = read_metadata(self.root / self.metadata, caption_column) if self.metadata else None
        self._fingerprint = self._digest()

    def _digest(self) -> str:
        """Hash of the indexed file list, their sizes and the caption source (its bytes or .txt sizes)."""
        digest = hashlib.sha256(json.dumps([self.metadata, self.caption_column, self.min_size]).encode())
        if self.metadata:
            digest.update((self.root / self.metadata).read_bytes())
        for name in self.files:
            sizes = [(self.root / name).stat().st_size]
            if not self.metadata:
                txt = self.root / Path(name).with_suffix(".txt")
                sizes.append(txt.stat().st_size if txt.is_file() else -1)
            digest.update(json.dumps([name, *sizes]).encode())
        return digest.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.files)

    def key(self, index: int) -> str:
        return self.files[index]

    def caption(self, index: int) -> str:
        """The caption of image `index`; raises if it is missing or empty."""
        name = self.files[index]
        if self.captions is not None:
            text = self.captions.get(name)
            if text is None:
                raise ValueError(f"no row in {self.metadata}")
        else:
            txt = self.root / Path(name).with_suffix(".txt")
            if not txt.is_file():
                raise ValueError(f"no caption file {txt.name}")
            text = txt.read_text(encoding="utf-8")
        if not isinstance(text, str) or not text.strip():
            raise ValueError("empty caption")
        return text.strip()

    def __getitem__(self, index: int) -> dict:
        caption = self.caption(index)
        # Read the bytes now: the lazily opened image holds no file handle, and draft mode (a JPEG
        # decoded at reduced size) stays possible until the transform loads it.
        data = (self.root / self.files[index]).read_bytes()
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:  # PIL's message names the BytesIO object's address: say what failed
            raise UnidentifiedImageError("zero-byte file" if not data else "not an image PIL can read") from None
        return {"image": image, "caption": caption, "key": self.files[index]}

    def fingerprint(self) -> str:
        return f"folder:n={len(self.files)}:{self._fingerprint}"
