"""A run's checkpoints mirrored to object storage or any fsspec URL (`ckpt.remote`: s3://, gs://, file://,
memory:// ...; s3fs / gcsfs installed for the clouds).

The remote folder holds the local folder's names: `step_<step>.safetensors`. An upload goes to a partial name
first (`.step_<step>.safetensors.partial-<host>-<pid>`; fsspec's put_file, multipart on object stores), is
read back and checked against the digests in its own header (checkpoint.verify_stream), and only then moved
to its name (a rename, or a server-side copy on object stores: no second transfer). So a listing of
`step_*` names holds only complete, verified uploads; an upload cut off leaves a partial, which the next run
removes. Retention keeps the newest `ckpt.keep` remotely as locally. One run writes to one remote folder.
"""
from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path

from . import checkpoint

_NAME = re.compile(r"step_(\d{7,})\.safetensors")
_PARTIAL = re.compile(r"\.step_\d{7,}\.safetensors\.partial-.+")


class UploadFailed(OSError):
    """A committed local checkpoint that did not reach the remote folder (after retries)."""


class Remote:
    """The remote checkpoint folder at `url`."""

    def __init__(self, url: str, log: Callable[[str], None] = print, retries: int = 3):
        from fsspec.core import url_to_fs  # imported late: runs without a remote never need it

        self.url, self.log, self.retries = url.rstrip("/"), log, retries
        try:  # an unknown protocol, or its filesystem (s3fs, gcsfs) not installed
            self.fs, root = url_to_fs(self.url)
        except Exception as err:  # noqa: BLE001 -- fsspec raises ValueError, ImportError, ...
            raise OSError(f"ckpt.remote: cannot use {self.url} ({checkpoint.one_line(err)})") from err
        self.root = root.rstrip("/")

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _remove(self, name: str) -> None:
        """Delete one entry; a failure only warns (an old copy or a partial left over is harmless)."""
        try:
            self.fs.rm(self._path(name))
        except Exception as err:  # noqa: BLE001 -- each filesystem raises its own types
            self.log(f"warning: could not delete {self.url}/{name}: {checkpoint.one_line(err)}")

    def _names(self) -> list[str]:
        if not self.fs.exists(self.root):
            return []
        return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in self.fs.ls(self.root, detail=False)]

    def check_writable(self) -> None:
        """Write and delete a probe object: a wrong URL, missing credentials or a read-only bucket fail here,
        before any step, as OSError naming the URL."""
        probe = self._path(f".write-probe-{socket.gethostname()}-{os.getpid()}")
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            with self.fs.open(probe, "wb") as f:
                f.write(b"ldm_ddp")
            self.fs.rm(probe)
        except Exception as err:  # each filesystem raises its own types
            raise OSError(f"ckpt.remote: cannot write to {self.url} ({checkpoint.one_line(err)})") from err

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints in the remote folder, oldest first."""
        return sorted(int(m[1]) for name in self._names() if (m := _NAME.fullmatch(name)))

    def set_aside_after(self, step: int) -> None:
        """Move the remote checkpoints of steps after `step` into superseded-<UTC time>/ (as
        checkpoint.set_aside_after does locally): a run that starts below them would otherwise see them
        pruned in place of its own saves, and resumed from by its next start. Failures only warn."""
        later = [s for s in self.steps() if s > step]
        if not later:
            return
        folder = f"{self.root}/superseded-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        for s in later:
            name = checkpoint.checkpoint_path(".", s).name
            try:
                self.fs.mv(self._path(name), f"{folder}/{name}")
            except Exception as err:  # noqa: BLE001 -- the next start tries again
                self.log(f"warning: could not move {self.url}/{name} aside: {checkpoint.one_line(err)}")
        self.log(f"this run starts at step {step}: moved {len(later)} later remote checkpoint(s) to {folder}")

    def remove_partials(self) -> int:
        """Delete uploads a dead run left unfinished (call before this run's first upload). -> how many."""
        stale = [name for name in self._names() if _PARTIAL.fullmatch(name)]
        for name in stale:
            self._remove(name)
        return len(stale)

    def upload(self, path: Path) -> str:
        """Upload the committed checkpoint `path`, verify the copy, give it its name. -> its URL;
        UploadFailed after `retries` attempts."""
        final = self._path(path.name)
        partial = self._path(f".{path.name}.partial-{socket.gethostname()}-{os.getpid()}")
        error: Exception | None = None
        for attempt in range(self.retries):
            try:
                self.fs.put_file(str(path), partial)
                with self.fs.open(partial, "rb", block_size=checkpoint.CHUNK) as f:
                    checkpoint.verify_stream(f, path.name)
                self.fs.mv(partial, final)
                return f"{self.url}/{path.name}"
            except Exception as err:  # noqa: BLE001 -- network, credentials, a bad copy: retried, then one line
                error = err
                try:
                    if self.fs.exists(partial):
                        self.fs.rm(partial)
                except Exception:  # noqa: BLE001 -- removed by the next run's remove_partials
                    pass
                if attempt + 1 < self.retries:
                    time.sleep(2 ** attempt)
        raise UploadFailed(f"{path.name} not uploaded to {self.url} after {self.retries} attempts "
                           f"({checkpoint.one_line(error)})")

    def prune(self, keep: int, just_uploaded: str) -> None:
        """Delete all but the newest `keep` remote checkpoints, never `just_uploaded`; failures only warn."""
        for step in self.steps()[:-keep]:
            name = checkpoint.checkpoint_path(".", step).name
            if name != just_uploaded:
                self._remove(name)

    def fetch_newest(self, ckpt_dir: Path, newer_than: int) -> Path | None:
        """Download the newest remote checkpoint of a step after `newer_than` that verifies into `ckpt_dir`
        (a temp name, verified, then renamed). -> its local path, or None. A copy that fails to verify is
        named and the next older one tried."""
        for step in reversed(self.steps()):
            if step <= newer_than:
                return None
            path = checkpoint.checkpoint_path(ckpt_dir, step)
            tmp = ckpt_dir / f".{path.name}.tmp-{os.getpid()}"  # removed by the next start if we die here
            try:
                self.fs.get_file(self._path(path.name), str(tmp))
                meta = checkpoint.load_checkpoint(tmp)[1]
                if meta["step"] != step:
                    raise checkpoint.CheckpointError(f"{path.name}: metadata step {meta['step']}")
            except Exception as err:  # noqa: BLE001 -- refused or unreadable: try the one before
                self.log(f"remote checkpoint refused: {self.url}/{path.name}: {checkpoint.one_line(err)}")
                tmp.unlink(missing_ok=True)
                continue
            os.replace(tmp, path)
            checkpoint.fsync(ckpt_dir)
            self.log(f"downloaded {self.url}/{path.name} ({path.stat().st_size / 2**30:.2f} GiB)")
            return path
        return None
