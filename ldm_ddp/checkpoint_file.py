"""The bytes of one checkpoint file: the layout safetensors reads, each tensor hashed and written in one pass,
by several threads at once; and fsync. checkpoint.py decides what goes in it and when it counts.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

# safetensors' dtype names, in the order its writer lays tensors out (widest alignment first).
DTYPE_NAMES = {torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.complex64: "C64",
                torch.float32: "F32", torch.uint32: "U32", torch.int32: "I32", torch.bfloat16: "BF16",
                torch.float16: "F16", torch.uint16: "U16", torch.int16: "I16", torch.float8_e4m3fn: "F8_E4M3",
                torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
DTYPE_ORDER = list(DTYPE_NAMES)
CHUNK = 2**26  # bytes hashed and written at a time: fits the caches, a large write


class WriteCancelled(Exception):
    """A write abandoned on request (`cancelled()` said so)."""


def metadata_digest(raw: dict[str, str]) -> str:
    covered = {k: v for k, v in raw.items() if k != "integrity"}
    return hashlib.sha256(json.dumps(covered, sort_keys=True).encode()).hexdigest()


def digest_start(dtype: torch.dtype, shape) -> Any:
    """A tensor's sha256 before its bytes: it covers the dtype and the shape too."""
    return hashlib.sha256(f"{dtype}{list(shape)}|".encode())


def tensor_digest(t: torch.Tensor) -> str:
    h = digest_start(t.dtype, t.shape)
    # A uint8 view of the (contiguous CPU) tensor exposes its bytes to hashlib without a copy.
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def tensor_digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    if sum(t.nbytes for t in tensors.values()) < 2**24:  # starting threads costs more than hashing this
        return {k: tensor_digest(t) for k, t in tensors.items()}
    # hashlib releases the GIL on large buffers, so threads hash tensors in parallel.
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(tensors, pool.map(tensor_digest, tensors.values())))


def fsync(path) -> None:
    """A file's (or a directory's) contents on disk, before a rename makes it count."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems cannot fsync a directory; the rename is then as durable as they allow.
        if not (path.is_dir() and e.errno in (errno.EINVAL, errno.ENOTSUP)):
            raise
    finally:
        os.close(fd)


def layout(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[list[str], dict[str, Any]]:
    """-> (tensor names in file order, the header without its padding). The order is safetensors' own:
    widest dtype first, then by name."""
    if odd := sorted(name for name, t in tensors.items() if t.dtype not in DTYPE_NAMES):
        raise TypeError(f"tensor {odd[0]}: safetensors has no dtype {tensors[odd[0]].dtype}")
    order = sorted(tensors, key=lambda name: (DTYPE_ORDER.index(tensors[name].dtype), name))
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        t = tensors[name]
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    return order, header


def header_bytes(header: dict[str, Any]) -> bytes:
    head = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head


def write_file(tensors: dict[str, torch.Tensor], path: Path, raw: dict[str, str],
           cancelled: Callable[[], bool] = lambda: False) -> None:
    """The safetensors file of `tensors` and metadata `raw`, its integrity record added here; every byte
    written to `path` by this process, each tensor hashed and written in one pass over its memory.

    Not safetensors' save_file: that writes a hidden file of its own beside `path` (`.tmp` and six random
    letters, preallocated to full size) and renames it only at the end, so a process killed while the tensors
    are written would leave a full-size file under a name this module never gives. The file is the one
    safetensors writes (but for the order of the metadata entries, which it takes from a hash map): the
    header's length (8 bytes, little-endian), the JSON header padded with spaces to a multiple of 8, then each
    tensor's bytes. A sha256 is 64 hex digits whatever it hashes, so the header's length is known before any
    digest: threads hash and write the tensors at their offsets (pwrite) in parallel, and the header with the
    digests is written last. `cancelled()`, asked between chunks, abandons the file (WriteCancelled).
    """
    placeholder = {name: "0" * 64 for name in tensors}
    integrity = {"algorithm": "sha256", "metadata": metadata_digest(raw), "tensors": placeholder}
    order, header = layout(tensors, {**raw, "integrity": json.dumps(integrity)})
    base = len(header_bytes(header))
    # The biggest tensors first, each to the thread with the least bytes so far: balanced shares.
    workers = min(8, os.cpu_count() or 1, max(1, sum(t.nbytes for t in tensors.values()) // 2**24))
    shares: list[list[str]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for name in sorted(order, key=lambda n: -tensors[n].nbytes):
        i = loads.index(min(loads))
        shares[i].append(name)
        loads[i] += tensors[name].nbytes
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror} (writing {path.name})") from e
    digests: dict[str, str] = {}

    def write_share(names: list[str]) -> None:
        for name in names:
            t = tensors[name]
            h = digest_start(t.dtype, t.shape)
            data = t.reshape(-1).view(torch.uint8).numpy()  # the tensor's own bytes, no copy
            offset = base + header[name]["data_offsets"][0]
            for start in range(0, max(len(data), 1), CHUNK):
                if cancelled():
                    raise WriteCancelled(f"{path.name}: save cancelled")
                chunk = data[start:start + CHUNK]
                h.update(chunk)
                done = 0
                while done < len(chunk):  # pwrite may write less than asked
                    done += os.pwrite(fd, chunk[done:], offset + start + done)
            digests[name] = h.hexdigest()

    try:
        try:
            if workers == 1:
                write_share(shares[0])
            else:
                with ThreadPoolExecutor(workers) as pool:
                    for future in [pool.submit(write_share, share) for share in shares]:
                        future.result()
            integrity["tensors"] = {name: digests[name] for name in tensors}
            header["__metadata__"]["integrity"] = json.dumps(integrity)
            head = header_bytes(header)
            assert len(head) == base, "header length changed with the digests"
            done = 0
            while done < len(head):
                done += os.pwrite(fd, head[done:], done)
        finally:
            os.close(fd)
    except OSError as e:  # disk full, quota, file size limit, EIO: the OSError names the file
        raise OSError(e.errno, f"{e.strerror} (writing {path.name})") from e


