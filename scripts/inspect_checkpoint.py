"""Show what an ldm_ddp checkpoint holds (EMA profiles included): python scripts/inspect_checkpoint.py CKPT
[--json] [--no-verify]."""

import argparse
import json
import sys
from pathlib import Path

try:
    import ldm_ddp  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm_ddp.checkpoint import CheckpointError
from ldm_ddp.checkpoint_info import describe_checkpoint
from ldm_ddp.ema import checkpoint_profiles


def shorten(value, limit: int = 6):
    """Long lists (e.g. a param group's parameter names) as their first items and a count."""
    if isinstance(value, dict):
        return {k: shorten(v, limit) for k, v in value.items()}
    if isinstance(value, list) and len(value) > limit:
        return [shorten(v, limit) for v in value[:3]] + [f"... {len(value)} in all"]
    return [shorten(v, limit) for v in value] if isinstance(value, list) else value


def print_report(d: dict) -> None:
    print(f"file          {d['file']} ({d['size_bytes'] / 2**20:,.1f} MiB)")
    print(f"step          {d['step']}    samples seen {d['samples_seen']}")
    print(f"format        {d['format']}")
    print(f"integrity     {d['integrity']}")
    print("versions      " + "  ".join(f"{k} {v}" for k, v in (d["versions"] or {}).items()))
    ema = d["metadata"].get("ema") or {}
    print(f"\nEMA profiles  {ema.get('num_updates', '?')} updates; pick one with --weights NAME (sample.py, "
          "export_diffusers.py)")
    for p in d["ema_profiles"]:
        kind = (f"decay {p['decay']}" + (" with warmup" if ema.get("warmup") else "") if "decay" in p
                else f"power function, sigma_rel {p['std']} (gamma {p['gamma']:.2f})")
        print(f"  {p['name']:<14} {kind:<48} tensors {p['tensors']}.*")
    print("\ntensor groups")
    for group, g in d["groups"].items():
        print(f"  {group:<6} {g['tensors']:>6} tensors {g['params']:>15,} params  {', '.join(g['dtypes'])}")
    print("\ntensors")
    width = max((len(r["name"]) for r in d["tensors"]), default=0)
    for r in d["tensors"]:
        size = str(r["shape"]) if "shape" in r else f"{r['tensors']} tensors, {r['params']:,} params"
        norm = f"{r['norm']:.6g}" if isinstance(r["norm"], float) else r["norm"]
        print(f"  {r['name']:<{width}}  {size:<32} {r['dtype']:<10} norm {norm}")
    print("\nconfig")
    print(json.dumps(d["config"], indent=2, sort_keys=True))
    print("\nother metadata")
    for key, value in d["metadata"].items():
        print(f"  {key}: {json.dumps(shorten(value), sort_keys=True)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("ckpt", help="a step_*.safetensors file")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a report")
    parser.add_argument("--no-verify", action="store_true", help="skip the integrity digests (faster)")
    args = parser.parse_args()
    try:
        described = describe_checkpoint(args.ckpt, verify=not args.no_verify)
    except CheckpointError as e:
        print(e, file=sys.stderr)
        return 1
    described["ema_profiles"] = checkpoint_profiles(described["metadata"].get("ema") or {})
    if args.json:
        print(json.dumps(described, indent=2))
    else:
        print_report(described)
    return 0


if __name__ == "__main__":
    sys.exit(main())
