"""What one checkpoint holds, for a person or a program (scripts/inspect_checkpoint.py): its metadata, tensor
groups (unet, ema and each EMA profile, optim) and a table of tensors or blocks with their norms."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_checkpoint


def _block(name: str) -> str:
    """'unet.down_blocks.0.resnets.1.conv1.weight' -> 'unet.down_blocks.0.*'; optim keeps its state name."""
    group, *parts = name.split(".")
    state = f".{parts.pop()}" if group == "optim" and len(parts) > 1 else ""
    top = parts[:2] if len(parts) > 2 and parts[1].isdigit() else parts[:1]
    return ".".join([group, *top]) + (".*" if len(parts) > len(top) else "") + state


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _row(label: str, ts: list[torch.Tensor], one_tensor: bool) -> dict[str, Any]:
    """One line of the tensor table: a tensor, or a block of tensors with their joint norm."""
    size = ({"shape": list(ts[0].shape)} if one_tensor
            else {"tensors": len(ts), "params": sum(t.numel() for t in ts)})
    norm = math.sqrt(sum(t.to(torch.float64).square().sum().item() for t in ts))
    return {"name": label, **size, "dtype": ",".join(sorted({_dtype(t) for t in ts})),
            "norm": norm if math.isfinite(norm) else str(norm)}  # strict JSON has no NaN/inf


def describe_checkpoint(path, verify: bool = True, max_rows_per_group: int = 24) -> dict[str, Any]:
    """Everything a person or a program wants to know about one checkpoint, as JSON-able data."""
    path = Path(path)
    tensors, meta = load_checkpoint(path, verify=verify)
    by_group = {group: [] for group in ("unet", "ema", "optim", "other")}
    for name in sorted(tensors):
        prefix = name.split(".", 1)[0]
        if prefix.startswith("ema_"):  # another EMA profile (ema_0p9999, ema_std0p1): a group of its own
            by_group.setdefault(prefix, [])
        by_group.get(prefix, by_group["other"]).append(name)
    groups, rows = {}, []
    for group, names in ((g, names) for g, names in by_group.items() if names):
        groups[group] = {"tensors": len(names), "params": sum(tensors[n].numel() for n in names),
                         "dtypes": sorted({_dtype(tensors[n]) for n in names})}
        per_tensor = len(names) <= max_rows_per_group  # else one row per top-level block, to stay readable
        blocks = defaultdict(list)
        for n in names:
            blocks[n if per_tensor else _block(n)].append(tensors[n])
        rows += [_row(label, ts, per_tensor) for label, ts in blocks.items()]
    shown = ("format", "step", "samples_seen", "versions", "config", "integrity")
    return {"file": str(path), "size_bytes": path.stat().st_size, "format": meta["format"],
            "step": meta["step"], "samples_seen": meta.get("samples_seen"), "versions": meta.get("versions"),
            "integrity": (f"verified: sha256 of {len(tensors)} tensors and the metadata" if verify
                          else "not checked"),
            "groups": groups, "tensors": rows, "config": meta.get("config"),
            "metadata": {k: v for k, v in meta.items() if k not in shown}}
