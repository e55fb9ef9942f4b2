"""The training-state checkpoint: one safetensors file per save, verified on load, JSON metadata only.

This module owns the format. Named parts, each written and read here (save_training_state,
load_training_state): the trained module's weights under its name (`unet.<name>`, or `vae.<name>` for stage
1), the EMA profiles (`ema.<name>`, `ema_<profile>.<name>`), the optimizer state keyed by parameter name
(`optim.<param name>.<state>`), and the run's metadata. Metadata values are JSON strings;
`integrity` holds a sha256 per tensor (over dtype, shape and raw bytes) and one over every other
metadata entry, so a flipped, missing or extra byte anywhere in the file is refused on load.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import re
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from . import __version__
from .checkpoint_file import (
    CHUNK,
    DTYPE_NAMES,
    digest_start,
    fsync,
    metadata_digest,
    tensor_digests,
    write_file,
)

FORMAT = "ldm_ddp/1"
_NAME = re.compile(r"step_(\d{7,})\.safetensors")
# A save's temp file; or safetensors' own (".tmp" and six letters or digits), which its save_file, used by
# earlier releases of this module, left beside it when killed mid-write.
_TEMP = re.compile(r"\.step_\d{7,}\.safetensors\.tmp-\d+|\.tmp[0-9A-Za-z]{6}")
_RESERVED = ("format", "step", "integrity")
# How the optimizer runs on this machine, not training state: kept from the live optimizer on load.
_IMPL_KEYS = ("foreach", "fused", "capturable", "differentiable")


class CheckpointError(Exception):
    """A checkpoint refused: one line naming the file and the failing part."""


def checkpoint_path(ckpt_dir, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:07d}.safetensors"


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def snapshot(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Private contiguous CPU copies: training may change the live tensors while they are written, and
    safetensors refuses shared storage."""
    return {k: t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
            for k, t in tensors.items()}


def checkpoint_metadata(step: int, meta: dict[str, Any]) -> dict[str, str]:
    """A save's metadata entries (JSON strings) before the integrity record; refuses the format's own keys."""
    clash = [k for k in _RESERVED if k in meta]
    if clash:
        raise ValueError(f"metadata key {clash[0]!r} is reserved for the checkpoint format")
    return {"format": json.dumps(FORMAT), "step": json.dumps(step),
            **{k: json.dumps(v) for k, v in meta.items()}}


def commit_checkpoint(ckpt_dir, step: int, cpu: dict[str, torch.Tensor], raw: dict[str, str],
                      cancelled: Callable[[], bool] = lambda: False) -> Path:
    """Write contiguous CPU tensors `cpu` (nobody changes them meanwhile) with metadata `raw`
    (checkpoint_metadata) to <ckpt_dir>/step_<step>.safetensors: a temp file, fsync, rename, directory
    fsync. -> its path. A failure or cancellation leaves no temp file and the older checkpoints untouched."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(ckpt_dir, step)
    tmp = ckpt_dir / f".{path.name}.tmp-{os.getpid()}"
    try:
        write_file(cpu, tmp, raw, cancelled)
        fsync(tmp)
        os.replace(tmp, path)  # the file counts only once it has its final name
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync(ckpt_dir)  # make the rename itself durable
    return path


def save_checkpoint(ckpt_dir, step: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write `tensors` and JSON `meta` atomically to <ckpt_dir>/step_<step>.safetensors. -> its path."""
    raw = checkpoint_metadata(step, meta)
    return commit_checkpoint(ckpt_dir, step, snapshot(tensors), raw)


def _decode(path: Path, raw: dict[str, str]) -> dict[str, Any]:
    meta = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except ValueError:
            raise CheckpointError(f"{path.name}: metadata {key} is not JSON") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path.name}: format {meta.get('format')!r} is not {FORMAT!r}")
    if not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{path.name}: metadata step is missing or not an integer")
    return meta


def _verify(path: Path, raw: dict[str, str], meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    with open(path, "rb") as f:
        header = f.read(int.from_bytes(f.read(8), "little"))
    # The JSON parser accepts any whitespace after the header; safetensors pads with spaces only.
    if not header.rstrip(b" ").endswith(b"}"):
        raise CheckpointError(f"{path.name}: header padding altered")
    integrity = meta.get("integrity")
    if not isinstance(integrity, dict) or not isinstance(integrity.get("tensors"), dict):
        raise CheckpointError(f"{path.name}: integrity record missing or malformed")
    if integrity.get("algorithm") != "sha256":
        raise CheckpointError(f"{path.name}: integrity algorithm {integrity.get('algorithm')!r} "
                              "is not 'sha256'")
    if integrity.get("metadata") != metadata_digest(raw):
        raise CheckpointError(f"{path.name}: metadata digest mismatch")
    expected = integrity["tensors"]
    if missing := sorted(expected.keys() - tensors.keys()):
        raise CheckpointError(f"{path.name}: tensor {missing[0]} missing")
    if extra := sorted(tensors.keys() - expected.keys()):
        raise CheckpointError(f"{path.name}: tensor {extra[0]} not covered by the integrity record")
    actual = tensor_digests(tensors)
    if bad := sorted(n for n in tensors if actual[n] != expected[n]):
        raise CheckpointError(f"{path.name}: tensor {bad[0]} digest mismatch")
    named = _NAME.fullmatch(path.name)
    if named and int(named[1]) != meta["step"]:
        raise CheckpointError(f"{path.name}: metadata step {meta['step']} does not match the file name")


def _read(path: Path, with_tensors: bool) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        # Tensors are copy-on-write maps of the file: hashing them reads the page cache, no copy.
        with safe_open(path, framework="pt") as f:
            names = f.keys()  # a list: safe_open itself is not iterable
            return f.metadata() or {}, {k: f.get_tensor(k) for k in names} if with_tensors else {}
    except Exception as e:  # safetensors' own error type, OSError, ...: all mean "unreadable"
        raise CheckpointError(f"{path.name}: unreadable ({one_line(e)})") from e


def verify_stream(f, name: str) -> dict[str, Any]:
    """Verify a checkpoint read front to back from the binary file object `f` (e.g. a remote copy through
    fsspec), holding one chunk at a time: the header, every tensor's digest and the file's length, as
    load_checkpoint does with a local file. -> decoded metadata; CheckpointError naming `name` otherwise."""
    path = Path(name)
    try:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        raw = header.pop("__metadata__", None) or {}
        meta = _decode(path, raw)
        integrity = meta.get("integrity") or {}
        if integrity.get("metadata") != metadata_digest(raw):
            raise CheckpointError(f"{path.name}: metadata digest mismatch")
        expected = integrity.get("tensors") or {}
        if sorted(expected) != sorted(header):
            raise CheckpointError(f"{path.name}: tensor names differ from the integrity record")
        names = {v: k for k, v in DTYPE_NAMES.items()}
        position = 0
        for name_, entry in sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
            start, end = entry["data_offsets"]
            if start != position:
                raise CheckpointError(f"{path.name}: tensor {name_} does not follow the one before it")
            h = digest_start(names[entry["dtype"]], entry["shape"])
            while position < end:
                chunk = f.read(min(CHUNK, end - position))
                if not chunk:
                    raise CheckpointError(f"{path.name}: truncated in tensor {name_}")
                h.update(chunk)
                position += len(chunk)
            if h.hexdigest() != expected[name_]:
                raise CheckpointError(f"{path.name}: tensor {name_} digest mismatch")
        if f.read(1):
            raise CheckpointError(f"{path.name}: bytes after the last tensor")
    except CheckpointError:
        raise
    except Exception as e:  # a short read, bad JSON, a network error: all mean "unreadable"
        raise CheckpointError(f"{path.name}: unreadable ({one_line(e)})") from e
    return meta


def load_checkpoint(path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """-> (CPU tensors, decoded metadata); CheckpointError if unreadable, foreign or (verify) corrupt."""
    path = Path(path)
    raw, tensors = _read(path, with_tensors=True)
    meta = _decode(path, raw)
    if verify:
        _verify(path, raw, meta, tensors)
    return tensors, meta


def read_metadata(path) -> dict[str, Any]:
    """Decoded metadata from the header alone (no digest check)."""
    return _decode(Path(path), _read(Path(path), with_tensors=False)[0])


def list_checkpoints(ckpt_dir) -> list[Path]:
    """Committed step_*.safetensors files, oldest step first."""
    if not Path(ckpt_dir).is_dir():
        return []
    found = [(int(m[1]), p) for p in Path(ckpt_dir).iterdir() if (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def find_latest_valid(ckpt_dir, log: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint that verifies; logs each newer one refused and the fallback."""
    refused = 0
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            load_checkpoint(path)
        except CheckpointError as e:
            log(f"checkpoint refused: {e}")
            refused += 1
            continue
        if refused:
            log(f"falling back to {path.name} ({refused} newer checkpoint(s) refused)")
        return path
    if refused:
        log(f"no valid checkpoint in {ckpt_dir} ({refused} refused)")
    return None


def prune_checkpoints(ckpt_dir, keep: int, log: Callable[[str], None] = print,
                      just_saved: Path | None = None) -> None:
    """Delete all but the newest `keep` checkpoints, never the newest valid one nor `just_saved`; delete
    failures only warn.

    `just_saved`: a checkpoint this process has just committed, known valid (skips re-reading it).
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    doomed = list_checkpoints(ckpt_dir)[:-keep]
    if not doomed:
        return
    # Verifying costs one read of the newest file (seconds for an SD-size training state): skipped when the
    # caller has just written it.
    newest = list_checkpoints(ckpt_dir)[-1]
    spared = (just_saved if just_saved is not None and Path(just_saved) == newest
              else find_latest_valid(ckpt_dir, log))
    for path in doomed:
        if path == spared:
            log(f"keeping {path.name}: newest valid checkpoint")
            continue
        if just_saved is not None and path == Path(just_saved):
            continue  # this run's own save (older steps of another timeline are set_aside_after's)
        try:
            path.unlink()
        except OSError as e:
            log(f"warning: could not delete {path}: {one_line(e)}")


def set_aside_after(ckpt_dir, step: int, log: Callable[[str], None] = print) -> Path | None:
    """Move the checkpoints of steps after `step` into <ckpt_dir>/superseded-<UTC time>/ (call before any save
    of a run that starts at `step`). -> that folder, or None when there were none.

    A run that starts below the newest checkpoint in its folder (--ckpt.resume=none, a rollback to an older
    PATH, a fallback past damaged files) would otherwise leave another timeline's later steps there: the next
    automatic resume would pick them up, and retention would delete this run's own saves as the oldest.
    Moved, not deleted: nothing is lost.
    """
    later = [p for p in list_checkpoints(ckpt_dir) if int(_NAME.fullmatch(p.name)[1]) > step]
    if not later:
        return None
    folder = Path(ckpt_dir) / f"superseded-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    folder.mkdir(exist_ok=True)
    for path in later:
        os.replace(path, folder / path.name)
    fsync(ckpt_dir)
    log(f"this run starts at step {step}: moved {len(later)} later checkpoint(s) ({later[0].name} .. "
        f"{later[-1].name}) to {folder}")
    return folder


def remove_stale_temp_files(ckpt_dir, log: Callable[[str], None] = print) -> int:
    """Delete temp files left by interrupted saves (call before any save starts). -> how many.

    The folder is the run's own (the run folder's lock keeps other runs out) and no save has started: a temp
    file there is a dead process's.
    """
    removed = 0
    for path in Path(ckpt_dir).iterdir() if Path(ckpt_dir).is_dir() else []:
        if _TEMP.fullmatch(path.name):
            try:
                path.unlink()
                removed += 1
            except OSError as e:
                log(f"warning: could not delete {path}: {one_line(e)}")
    return removed


def optimizer_tensors(optimizer: torch.optim.Optimizer,
                      param_names: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """-> ({"optim.<name>.<state>": tensor}, groups with "params" as names);
    param_names: {id(p) or p: name}."""
    by_id = {(k if isinstance(k, int) else id(k)): n for k, n in param_names.items()}
    tensors, groups = {}, []
    for group in optimizer.param_groups:
        names = []
        for p in group["params"]:
            if id(p) not in by_id:
                raise ValueError(f"optimizer parameter of shape {tuple(p.shape)} has no name in param_names")
            names.append(name := by_id[id(p)])
            for key, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"optimizer state {name}.{key} is a {type(value).__name__}, not a tensor")
                tensors[f"optim.{name}.{key}"] = value
        hyper = {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()
                 if k not in ("params", "param_names")}
        groups.append({**hyper, "params": names})
    return tensors, groups


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, named_params: dict[str, torch.nn.Parameter],
                           tensors: dict[str, torch.Tensor], groups: list[dict],
                           live_hyperparameters: bool = False) -> None:
    """Restore state and hyperparameters saved by optimizer_tensors, matching parameters by name. With
    `live_hyperparameters` the optimizer keeps its own (lr, betas, eps, weight decay: a resumed run's config,
    where a change is allowed and recorded) and takes only the state."""
    name_of = {id(p): n for n, p in named_params.items()}
    live = []
    for group in optimizer.param_groups:
        unnamed = [tuple(p.shape) for p in group["params"] if id(p) not in name_of]
        if unnamed:
            raise CheckpointError(f"optimizer: parameter of shape {unnamed[0]} has no name in named_params")
        live.append([name_of[id(p)] for p in group["params"]])
    if len(groups) != len(live):
        raise CheckpointError(f"optimizer: {len(groups)} param groups in the checkpoint, {len(live)} now")
    for saved, names in zip(groups, live):
        if missing := sorted(set(names) - set(saved["params"])):
            raise CheckpointError(f"optimizer: parameter {missing[0]} missing from the checkpoint")
        if extra := sorted(set(saved["params"]) - set(names)):
            raise CheckpointError(f"optimizer: checkpoint parameter {extra[0]} is not in the model")
    # torch's load_state_dict matches parameters by position in the live groups: hand it those indices,
    # and let it apply its own dtype/device rules (e.g. where state["step"] lives for fused/capturable).
    index = {name: i for i, name in enumerate(n for names in live for n in names)}
    state = defaultdict(dict)
    for key, value in tensors.items():
        if key.startswith("optim."):
            name, field = key[len("optim."):].rsplit(".", 1)
            if name not in index:
                raise CheckpointError(f"optimizer: state for {name}, which is not an optimized parameter")
            # Moments take the live parameter's device and memory format (channels_last on GPU): the fused
            # AdamW kernel refuses state whose strides differ from its parameter's.
            param = named_params[name]
            state[index[name]][field] = value if field == "step" or value.shape != param.shape else \
                torch.empty_like(param, dtype=value.dtype).copy_(value)
    param_groups = []
    for group, saved, names in zip(optimizer.param_groups, groups, live):
        hyper = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()
                 if k not in (*_IMPL_KEYS, "params")}  # JSON turned tuples (betas) into lists
        merged = {**hyper, **group} if live_hyperparameters else {**group, **hyper}
        param_groups.append({**merged, "params": [index[n] for n in names]})
    optimizer.load_state_dict({"state": dict(state), "param_groups": param_groups})


@dataclass
class TrainingState:
    """The named parts of a training checkpoint: the trained module under its name ("unet", "vae"), its
    optimizer (state keyed by parameter name) and, for the UNet, its EMA (ldm_ddp.ema.EMA)."""
    name: str
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: Any = None

    def gather(self, shapes_only: bool = False) -> None:
        """A collective before every save (every rank calls it): what is split over the ranks comes together
        for rank 0 to save (train.shard_optimizer's moments, sharded_adamw.py). shapes_only: only their
        shapes, for the saver's buffers (no collective)."""
        gather_state = getattr(self.optimizer, "gather_state", None)
        if gather_state is not None:
            gather_state(shapes_only)


def module_tensors(tensors: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    """A module's state dict out of a checkpoint's tensors: the `part.` group ("unet", "ema", "vae", ...)."""
    return {k[len(part) + 1:]: v for k, v in tensors.items() if k.startswith(part + ".")}


def save_training_state(ckpt_dir, step: int, state: TrainingState, run_meta: dict[str, Any]) -> Path:
    """Write every part of `state` at `step` (atomic, save_checkpoint) with the run's metadata (config, data,
    architecture, ...). -> path."""
    return save_checkpoint(ckpt_dir, step, *training_state_tensors(state, run_meta))


def training_state_tensors(state: TrainingState, run_meta: dict[str, Any]) -> tuple[dict[str, torch.Tensor],
                                                                                   dict[str, Any]]:
    """-> (the live tensors of every part of `state`, the metadata): the run's metadata with the optimizer's
    and EMA's and the library versions added."""
    tensors = {f"{state.name}.{k}": v for k, v in state.module.state_dict().items()}
    names = {id(p): n for n, p in state.module.named_parameters()}
    optim_tensors, groups = optimizer_tensors(state.optimizer, names)
    tensors.update(optim_tensors)
    meta = {**run_meta, "optim": groups, "versions": versions()}
    if state.ema is not None:
        tensors.update(state.ema.state_tensors())
        meta["ema"] = state.ema.state_meta()
    return tensors, meta


def load_training_state(path, state: TrainingState, check: Callable[[dict], Any] = lambda meta: None) -> dict:
    """Verify the checkpoint at `path`, call `check(meta)` (which refuses a resume by raising), then restore
    every part of `state`: weights, EMA, optimizer state matched by parameter name (the optimizer keeps its
    own hyperparameters: the config's, where a change is allowed and recorded). -> the metadata."""
    tensors, meta = load_checkpoint(path)
    check(meta)
    state.module.load_state_dict(module_tensors(tensors, state.name))
    if state.ema is not None:
        state.ema.load(tensors, meta["ema"])
    load_optimizer_tensors(state.optimizer, dict(state.module.named_parameters()), tensors, meta["optim"],
                           live_hyperparameters=True)
    return meta


def versions() -> dict[str, str]:
    """Library versions and the package's git commit; "unknown"/"not installed" instead of failing. Read
    once per process (a copy each call): a save must not fork `git` from a process holding gigabytes."""
    return dict(_versions())


@functools.cache
def _versions() -> dict[str, str]:
    found = {"torch": torch.__version__, "ldm_ddp": __version__}
    for lib in ("diffusers", "transformers", "safetensors"):
        try:
            found[lib] = importlib.metadata.version(lib)
        except Exception:  # any failure to read it means the same: unknown here
            found[lib] = "not installed"
    try:
        found["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                             timeout=10, capture_output=True, text=True,
                                             check=True).stdout.strip() or "unknown"
    except Exception:  # any failure (no git, not a checkout, timeout): the version strings identify the code
        found["git_commit"] = "unknown"
    return found
