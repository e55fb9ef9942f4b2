"""Where a run resumes from, and whether it may: what changed since the checkpoint is refused or recorded.

Refused (one line naming the difference), because the saved state would no longer mean the same thing:
the architecture (UNet, VAE and text-encoder configs as built), the data fingerprint, the data seed and the
global batch (the global sample order). Everything else (learning rate, total steps, logging, world size
at the same global batch, library versions) is allowed, printed and appended to <out_dir>/resumes.jsonl.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from . import checkpoint, dist
from .config import Config, ConfigError
from .metrics import append_jsonl

_BOOKKEEPING = ("transformers_version", "torch_dtype", "dtype")  # and every "_"-prefixed key


class FolderInUse(ConfigError):
    """Another live process holds the run folder's lock (run_folder_lock)."""


@contextlib.contextmanager
def run_folder_lock(out_dir: Path):
    """Rank 0 holds an exclusive lock on <out_dir>/.lock while the run lives. A second run started on the same
    folder (a double launch, a requeued job whose old one still runs) is refused with one line: two runs in
    one folder delete each other's temp files and checkpoints. A POSIX record lock (lockf), not flock: it
    belongs to this process alone (the DataLoader workers it forks do not inherit it, so a rank killed with -9
    frees the folder at once), and network filesystems support it.
    Where locking fails otherwise: a warning."""
    check_writable(out_dir, "train.out_dir")
    path = out_dir / ".lock"
    with open(path, "a+") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                print(f"warning: cannot lock {path} ({err.strerror}): make sure no other run uses this "
                      "folder", flush=True)
                yield
                return
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise FolderInUse(f"train.out_dir: {out_dir} is in use by another run ({holder}); one folder per "
                              "run (two would delete each other's checkpoints)") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.lockf(f, fcntl.LOCK_UN)


def check_writable(folder: Path, key: str) -> None:
    """Create `folder` if needed and write, fsync and delete a probe file in it; a folder that cannot take a
    file (read-only, another owner, a full disk) is a ConfigError naming it, before any step rather than at
    the first save, ckpt.every steps of work later."""
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"ldm_ddp")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"{key}: cannot write to {folder} ({err.strerror or err})") from None


def resume_point(cfg: Config, ckpt_dir: Path, remote=None) -> Path | None:
    """The checkpoint to resume from (chosen on rank 0, agreed by all ranks), or None.

    Temporary files of saves that a crash interrupted are removed first, whatever ckpt.resume says (an SD-size
    one is ~14 GB): nothing else is writing yet; so are a remote folder's unfinished uploads. With a remote
    folder (remote.Remote, rank 0), a newer checkpoint there than any valid one here is downloaded first:
    a fresh machine resumes from the remote copy.
    """
    if dist.is_main():
        checkpoint.remove_stale_temp_files(ckpt_dir)
        if remote is not None:
            try:
                remote.remove_partials()
            except Exception as err:  # noqa: BLE001 -- a partial never counts; the next start tries again
                print(f"warning: ckpt.remote: cannot list {remote.url} ({checkpoint.one_line(err)})",
                      flush=True)
    if cfg.ckpt.resume == "none":
        return None
    if cfg.ckpt.resume != "auto":
        return Path(cfg.ckpt.resume)
    step = -1
    if dist.is_main():
        path = checkpoint.find_latest_valid(ckpt_dir) if ckpt_dir.exists() else None
        step = int(checkpoint.read_metadata(path)["step"]) if path else -1
        try:
            fetched = remote.fetch_newest(ckpt_dir, newer_than=step) if remote is not None else None
        except Exception as err:  # noqa: BLE001 -- unreachable now: resume from what is here, and say so
            print(f"warning: ckpt.remote: cannot read {remote.url} ({checkpoint.one_line(err)}); resuming "
                  f"from {ckpt_dir} alone", flush=True)
            fetched = None
        if fetched:
            step = int(checkpoint.read_metadata(fetched)["step"])
    step = dist.broadcast_int(step)
    return checkpoint.checkpoint_path(ckpt_dir, step) if step >= 0 else None


def _json(value):
    return json.loads(json.dumps(value, default=str))  # tuples -> lists, as a checkpoint's metadata has them


def architecture(unet, frozen, lora_rank: int = 0) -> dict:
    """What the weights mean: the configs of the UNet, the VAE and the text encoder(s) as built (JSON
    values), and the rank of the UNet's LoRA adapters (0: none; models.add_lora)."""
    second = {"text_encoder_2": frozen.text_encoder_2.config.to_dict()} if frozen.text_encoder_2 else {}
    return {**architecture_from({"unet": dict(unet.config), "vae": dict(frozen.vae.config),
                                 "text_encoder": frozen.text_encoder.config.to_dict(), **second}),
            "lora": {"rank": lora_rank}}


def architecture_from(configs: dict) -> dict:
    """{name: a model's config dict} -> the same as JSON values, without bookkeeping keys."""
    return {name: {k: v for k, v in _json(config).items() if not k.startswith("_") and k not in _BOOKKEEPING}
            for name, config in configs.items()}


def _first_difference(then: dict, now: dict, prefix: str = "") -> str | None:
    """The first key both sides have with different values. A key on one side only is no difference: library
    releases add and drop config entries (transformers 5 dropped `torchscript`, diffusers adds UNet
    arguments), and an upgrade must not block a resume;
    a real change of shape still fails loading the weights."""
    for key in sorted(then.keys() & now.keys()):
        a, b = then[key], now[key]
        if isinstance(a, dict) and isinstance(b, dict):
            if found := _first_difference(a, b, f"{prefix}{key}."):
                return found
        elif a != b:
            return f"{prefix}{key} {json.dumps(a)} in the checkpoint, {json.dumps(b)} now"
    return None


def _flat(tree: dict) -> dict:
    return {f"{section}.{key}": value for section, values in tree.items() for key, value in values.items()}


def check_resumable(meta: dict, cfg: Config, arch: dict, global_batch: int, fingerprint: str,
                    path: Path) -> dict:
    """Refuse a checkpoint whose state would mean something else now (ConfigError, one line naming the
    difference); -> the allowed changes:
    {"config": {key: [then, now]}, "versions": {...}, "world_size": [...]}."""
    refuse = "; resume needs the same one (or start a new out_dir, or --ckpt.resume=none)"
    if "architecture" in meta and (diff := _first_difference(meta["architecture"], arch)):
        raise ConfigError(f"{path.name}: model architecture changed: {diff}{refuse}")
    data = meta["data"]
    if data["global_batch"] != global_batch:
        raise ConfigError(f"{path.name}: global batch {data['global_batch']} in the checkpoint, "
                          f"{global_batch} now (train.global_batch must match to continue the same sample "
                          "sequence)")
    if data["fingerprint"] != fingerprint:
        raise ConfigError(f"{path.name}: data fingerprint {data['fingerprint']} in the checkpoint, "
                          f"{fingerprint} now" + refuse)
    if data["seed"] != cfg.data.seed:
        raise ConfigError(f"{path.name}: data.seed {data['seed']} in the checkpoint, {cfg.data.seed} now "
                          "(the seed orders the samples: another one would repeat some and skip others)"
                          + refuse)
    window = data.get("shuffle_window", cfg.data.shuffle_window)  # older checkpoints: not recorded
    sharded = fingerprint.startswith(("shards:", "webdataset:", "parquet:", "latents:"))
    if window != cfg.data.shuffle_window and sharded:
        raise ConfigError(f"{path.name}: data.shuffle_window {window} in the checkpoint, "
                          f"{cfg.data.shuffle_window} now (the window shapes the sample order of a sharded "
                          "source)" + refuse)
    then_data, now_data = meta["config"].get("data", {}), cfg.data
    buckets = then_data.get("buckets", "off")  # older checkpoints: square images
    regrouped = buckets != "off" and then_data["batch_per_gpu"] != now_data.batch_per_gpu
    if buckets != now_data.buckets or regrouped:
        raise ConfigError(
            f"{path.name}: data.buckets {json.dumps(buckets)} with data.batch_per_gpu "
            f"{then_data['batch_per_gpu']} in the checkpoint, {json.dumps(now_data.buckets)} with "
            f"{now_data.batch_per_gpu} now (bucketed micro-batches shape the sample order)" + refuse)
    then, now = _flat(meta["config"]), _flat(_json(cfg.to_dict()))
    versions = checkpoint.versions()
    # Keys the checkpoint lacks came with a newer ldm_ddp: the version change records that.
    changes = {"config": {k: [then[k], now[k]] for k in now if k in then and then[k] != now[k]},
               "versions": {k: [v, versions.get(k)] for k, v in meta.get("versions", {}).items()
                            if versions.get(k) != v}}
    if meta.get("world_size") != dist.world_size():
        changes["world_size"] = [meta.get("world_size"), dist.world_size()]
    return changes


def record_resume(out_dir: Path, path: Path, step: int, changes: dict) -> None:
    """Rank 0: one line on stdout, one record in <out_dir>/resumes.jsonl (appended, never rewritten)."""
    if not dist.is_main():
        return
    print(f"resumed from {path} at step {step}", flush=True)
    described = [f"{k} {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in changes["config"].items()]
    described += [f"{k} {a} -> {b}" for k, (a, b) in changes["versions"].items()]
    if "world_size" in changes:
        described.append("world size {} -> {}".format(*changes["world_size"]))
    if described:
        print(f"changed since {path.name}: {'; '.join(described)}", flush=True)
    record = {"time": time.time(), "step": step, "checkpoint": str(path), **changes}
    append_jsonl(out_dir / "resumes.jsonl", record)
