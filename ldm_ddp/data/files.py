"""Paths and URLs for the data sources: local paths through the OS, URLs (s3://, gs://, https://, file://,
memory:// ...) through fsspec, which resolves the protocol to its filesystem (s3fs, gcsfs ... installed
separately). Every read is by byte range, so a source never keeps a handle open: a DataLoader worker
forked from the main process opens what it needs itself.
"""
from __future__ import annotations

import os
from pathlib import Path


def is_url(path: str) -> bool:
    return "://" in path


def _fs(path: str):
    from fsspec.core import url_to_fs  # imported late: local runs never need it

    return url_to_fs(path)


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if is_url(base) else str(Path(base) / name)


def name_of(path: str) -> str:
    """The last part of a path or URL (`s3://b/x/shard-000.tar` -> `shard-000.tar`)."""
    return path.rstrip("/").rsplit("/", 1)[-1]


def read_bytes(path: str, offset: int = 0, size: int | None = None) -> bytes:
    """`size` bytes from `offset` (all the rest when None); raises OSError (or the filesystem's error)."""
    if not is_url(path):
        with open(path, "rb") as f:  # opened per read: no handle is shared across forked workers
            f.seek(offset)
            return f.read(-1 if size is None else size)
    fs, stripped = _fs(path)
    return fs.cat_file(stripped, start=offset, end=None if size is None else offset + size)


def is_file(path: str) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    fs, stripped = _fs(path)
    return fs.isfile(stripped)


def is_dir(path: str) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    fs, stripped = _fs(path)
    return fs.isdir(stripped)


def size_of(path: str) -> int:
    """File size in bytes; raises (FileNotFoundError or the filesystem's error) if it cannot be read."""
    if not is_url(path):
        return os.path.getsize(path)
    fs, stripped = _fs(path)
    return int(fs.size(stripped))


def list_files(folder: str, suffixes: tuple[str, ...]) -> list[str]:
    """Files directly in `folder` whose names end with one of `suffixes`, sorted, as paths or URLs."""
    if not is_url(folder):
        return sorted(str(p) for p in Path(folder).iterdir()
                      if p.is_file() and p.name.lower().endswith(suffixes))
    fs, stripped = _fs(folder)
    return sorted(fs.unstrip_protocol(p) for p in fs.ls(stripped, detail=False)
                  if p.lower().endswith(suffixes))


def open_binary(path: str):
    """A seekable binary file object (local or fsspec); the caller closes it."""
    if not is_url(path):
        return open(path, "rb")
    import fsspec

    return fsspec.open(path, "rb").open()
