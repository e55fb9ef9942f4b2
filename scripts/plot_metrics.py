"""Plot a run's metrics.jsonl without wandb: loss (total and per timestep bucket), lr, throughput, gradient
norm (total and per UNet block group), data-wait share and MFU.

    python scripts/plot_metrics.py RUN_DIR [--out RUN_DIR/metrics.png]

Needs matplotlib (`pip install -e ".[plot]"`).
"""
import argparse
import json
import sys
from pathlib import Path

import _path  # noqa: F401

from ldm_ddp.metrics import read_records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="PNG path (default: RUN_DIR/metrics.png)")
    args = parser.parse_args()
    path = args.run_dir / "metrics.jsonl"
    try:
        records = read_records(path)  # one timeline, whatever attempts and resumes wrote
    except (OSError, json.JSONDecodeError) as err:
        print(f"error: {path}: cannot read metrics ({err})", file=sys.stderr)
        return 1
    if not records:
        print(f"error: {path}: no records yet", file=sys.stderr)
        return 1
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print('error: plotting needs matplotlib: pip install -e ".[plot]"', file=sys.stderr)
        return 1

    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(3, 2, figsize=(11, 10), constrained_layout=True)
    axes[0, 0].plot(steps, [r["loss"] for r in records])
    axes[0, 0].set(title="loss", xlabel="step", yscale="log")
    buckets = len(records[-1].get("loss_by_t", []))
    for i in range(buckets):
        points = [(r["step"], r["loss_by_t"][i]) for r in records if r["loss_by_t"][i] is not None]
        if points:
            axes[0, 1].plot(*zip(*points), label=f"t bucket {i}",
                            color=plt.cm.viridis(i / max(1, buckets - 1)))
    axes[0, 1].set(title="loss per timestep bucket (0 = least noise)", xlabel="step", yscale="log")
    if buckets:
        axes[0, 1].legend(fontsize=7, ncol=2)
    axes[1, 0].plot(steps, [r["lr"] for r in records])
    axes[1, 0].set(title="learning rate", xlabel="step")
    axes[1, 1].plot(steps, [r["img_per_s"] for r in records], label="img/s")
    axes[1, 1].plot(steps, [r["img_per_s_per_gpu"] for r in records], label="img/s per GPU")
    axes[1, 1].set(title="throughput", xlabel="step")
    axes[1, 1].legend()
    axes[2, 0].plot(steps, [r["grad_norm"] for r in records], color="black", label="total")
    groups = list(dict.fromkeys(g for r in records for g in r.get("grad_norm_by_block", {})))
    for i, group in enumerate(groups):
        points = [(r["step"], r["grad_norm_by_block"][group]) for r in records
                  if group in r.get("grad_norm_by_block", {})]
        axes[2, 0].plot(*zip(*points), label=group, color=plt.cm.tab20(i % 20), linewidth=1)
    axes[2, 0].set(title="gradient norm before clipping (total, per block group)", xlabel="step",
                   yscale="log")
    axes[2, 0].legend(fontsize=6, ncol=2)
    for key, label in (("data_wait_share", "data-wait share"), ("mfu", "MFU")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            axes[2, 1].plot(*zip(*points), label=label)
    axes[2, 1].set(title="utilisation (fraction)", xlabel="step", ylim=(0, 1))
    axes[2, 1].legend()
    out = args.out or args.run_dir / "metrics.png"
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
