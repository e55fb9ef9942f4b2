"""The "folder" source: images with captions (a local folder or an fsspec URL), indexed once so that
`source[i]` is random access.

Captions come from `metadata.jsonl` or `metadata.csv` in the folder (a `file_name` column, relative
to the folder, and a caption column), else from a `.txt` file beside each image. The index is every
file with an image extension, sorted by relative path, symlinked files and folders followed (see
`list_files`); bad files (empty, not an image, truncated, no caption) stay in it and raise in
`__getitem__`, where the stream replaces and names them. What cannot be listed (a dangling symlink, a
symlink loop) is left out, named at start.
"""
from __future__ import annotations

import collections
import csv
import errno
import hashlib
import io
import json
import os
import unicodedata
import warnings
from pathlib import PurePosixPath

import numpy as np
from PIL import Image

from ..config import ConfigError
from . import files
from .samples import RawSource, upright_size

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def list_files(root: str) -> tuple[dict[str, int], dict[str, str]]:
    """Every file under `root` -> ({relative POSIX name: size in bytes}, {relative name: why it is left out});
    a reason has "{s}" where its plural takes an s (sources.DataSource.left_out).

    Hidden files and folders (.ipynb_checkpoints, .cache) are not data and not listed. Locally, symlinks are
    followed, to files and to folders; each real folder is listed once, under the first path that reaches
    it in sorted order, so a link back to a parent folder is no loop. A dangling link, a link loop or an
    unreadable folder is left out with its reason, never an error: one bad link must not stop a run.
    """
    if files.is_url(root):
        from fsspec.core import url_to_fs
        fs, base = url_to_fs(root)
        found = {PurePosixPath(p).relative_to(base.rstrip("/") or "/").as_posix(): int(info["size"])
                 for p, info in fs.find(base, detail=True).items()}
        return {n: size for n, size in found.items() if not any(p.startswith(".") for p in n.split("/"))}, {}
    sizes, left_out, seen = {}, {}, set()

    def visit(folder: str, prefix: str) -> None:
        real = os.path.realpath(folder)
        if real in seen:
            left_out[prefix.rstrip("/")] = "symlinked folder{s} indexed already"
            return
        seen.add(real)
        with os.scandir(folder) as listing:
            entries = sorted((e for e in listing if not e.name.startswith(".")), key=lambda e: e.name)
        for entry in entries:
            name = prefix + entry.name
            try:
                if entry.is_dir():  # follows a symlink; False for a dangling one
                    visit(entry.path, name + "/")
                else:
                    sizes[name] = entry.stat().st_size  # the target's size; raises for a broken link
            except OSError as err:
                if err.errno == errno.ELOOP:
                    left_out[name] = "symlink loop{s}"
                elif err.errno == errno.ENOENT and entry.is_symlink():
                    left_out[name] = "dangling symlink{s}"
                else:
                    left_out[name] = f"unreadable ({err.strerror})"

    if os.path.isdir(root):  # a missing root lists nothing: the source then names data.path
        try:
            visit(root, "")
        except OSError as err:  # the root itself; below it, a folder that cannot be listed is left out
            raise ConfigError(f"data.path: cannot list {root} ({err.strerror})") from None
    return sizes, left_out


def read_metadata(path: str, column: str) -> tuple[dict[str, str], list[int]]:
    """metadata.jsonl / metadata.csv -> ({relative file name in NFC: caption(s)}, [lines of rows not valid
    UTF-8]); ConfigError if the file cannot be read or parsed."""
    try:
        # Bytes that are not UTF-8 decode to lone surrogates, so that their row alone is left out, not the
        # file; -sig: a byte-order mark (Excel's "CSV UTF-8") dropped.
        text = files.read_bytes(path).decode("utf-8-sig", errors="surrogateescape")
        if path.endswith(".csv"):
            reader = csv.DictReader(io.StringIO(text))
            numbered = [(reader.line_num, row) for row in reader]  # the line where the row ends
            bad = {n for n, row in numbered
                   if not all(is_utf8(v) for v in row.values() if isinstance(v, str))}
            rows = [row for n, row in numbered if n not in bad]
        else:  # split on "\n" alone: str.splitlines also splits at U+2028 and others, inside a JSON string
            lines = [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
            bad = {n for n, line in lines if not is_utf8(line)}
            rows = [json.loads(line) for n, line in lines if n not in bad]
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.path: cannot read {path} ({err})") from None
    if rows and not all(isinstance(r, dict) and "file_name" in r for r in rows):
        raise ConfigError(f"data.path: every row of {path} needs a file_name")
    if rows and not any(column in r for r in rows):
        raise ConfigError(f"data.caption_column: no column {column!r} in {path} (has {sorted(rows[0])})")
    captions = {nfc(os.path.normpath(r["file_name"]).replace(os.sep, "/")): r.get(column) for r in rows}
    return captions, sorted(bad)


def nfc(name: str) -> str:
    """A file name in Unicode NFC: macOS writes names decomposed (NFD: "e" + U+0301), most tools and Linux
    keep what they were given (mostly NFC), so "café.png" on disk and in metadata may differ in bytes. Names
    are matched in NFC; the one on disk still opens the file."""
    return unicodedata.normalize("NFC", name)


def is_utf8(text: str) -> bool:
    """False if `text` holds a byte that was not UTF-8 (a lone surrogate from errors="surrogateescape")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def image_size(path: str) -> tuple[int, int]:
    """Upright (width, height) in px from the image header only; (0, 0) if the header does not read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a bomb's size still reads; the transform refuses it later
            with files.open_binary(path) as f, Image.open(f) as image:
                return upright_size(image)
    except Exception:  # unreadable: the file stays indexed, so that it fails, named, when loaded
        return (0, 0)


class ImageFolderSource(RawSource):
    """Images under `path` with captions;
    `source[i]` -> {"image": lazily opened PIL image, "caption", "key"}."""

    random_access = True
    latent = False
    has_raw = True
    pairs = False

    def __init__(self, path: str, caption_column: str = "text", min_size: int = 0, seed: int = 0,
                 is_main: bool = True):
        self.root, self.caption_column, self.min_size, self.seed = str(path), caption_column, min_size, seed
        self.sizes, self.left_out_files = list_files(self.root)
        names = sorted(n for n in self.sizes if n.lower().endswith(IMAGE_EXTENSIONS))
        if min_size:
            # Headers only: deterministic, and far cheaper than decoding every image. An unreadable
            # header (0 x 0) counts as large enough, so the file fails by name when loaded.
            small = [f for f in names if 0 < min(image_size(self.path(f))) < min_size]
            self.left_out_files.update(dict.fromkeys(small, f"image{{s}} smaller than min_size={min_size}"))
            names = [f for f in names if f not in self.left_out_files]
        broken = [name for name in METADATA_FILES if name in self.left_out_files]
        if broken:  # a broken link to the captions must not silently fall back to .txt files
            raise ConfigError(f"data.path: cannot read {self.path(broken[0])} "
                              f"({self.left_out_files[broken[0]].replace('{s}', '')})")
        present = [name for name in METADATA_FILES if name in self.sizes]
        if len(present) > 1:
            raise ConfigError(f"data.path: both {' and '.join(present)} in {self.root}; keep one")
        self.files = names
        self.metadata = present[0] if present else None
        self.captions = None
        if self.metadata:
            self.captions, bad_lines = read_metadata(self.path(self.metadata), caption_column)
            self.left_out_files.update({f"{self.metadata} line {n}": "metadata row{s} not valid UTF-8"
                                        for n in bad_lines})
        if is_main and self.left_out_files:  # named here; counted in the start line (build_source)
            named = [f"{name} ({why.replace('{s}', '')})" for name, why in self.left_out_files.items()]
            print(f"data: left out under {self.root}: {', '.join(named[:5])}"
                  + (f" and {len(named) - 5} more" if len(named) > 5 else ""), flush=True)
        if not names:
            raise ConfigError(f"data.path: no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}")
        self._fingerprint = self._digest()

    def path(self, name: str) -> str:
        return files.join(self.root, name)

    def _digest(self) -> str:
        """Hash of the indexed file list, their sizes and the caption source (its bytes or .txt sizes)."""
        digest = hashlib.sha256(json.dumps([self.metadata, self.caption_column, self.min_size]).encode())
        if self.metadata:
            digest.update(files.read_bytes(self.path(self.metadata)))
        for name in self.files:
            entry = [name, self.sizes.get(name, -1)]
            if not self.metadata:
                entry.append(self.sizes.get(str(PurePosixPath(name).with_suffix(".txt")), -1))
            digest.update(json.dumps(entry).encode())
        return digest.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.files)

    def where(self) -> str:
        return f"folder {self.root}"

    def left_out(self) -> dict[str, int]:
        return dict(collections.Counter(self.left_out_files.values()))

    def key(self, index: int) -> str:
        return self.files[index]

    def shard_sizes(self) -> None:
        return None  # one file per image: any order reads alike

    def image_sizes(self) -> np.ndarray:
        """From each file's header (a few KB read per image; make_shards.py records them once instead)."""
        return np.array([image_size(self.path(name)) for name in self.files], np.int64).reshape(-1, 2)

    def captions_of(self, index: int):
        """The caption cell of image `index` (a string or a list); raises if there is none."""
        name = self.files[index]
        if self.captions is not None:
            text = self.captions.get(nfc(name))
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
