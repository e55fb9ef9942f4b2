"""FP8 against bf16 in the trainer: img/s and the loss curve of the same run with train.fp8 on and off.

    python scripts/bench_fp8.py [--runs bf16 fp8 bf16_seed1] [--steps 2000] [--res 256] [--batch 32]
        [--warmup 1000] [--images 8192] [--window 100] [--work DIR] [--out DIR] [--together]
    python scripts/bench_fp8.py --report DIR [DIR ...]     # runs made by several calls, compared

The task: SD1.5 at --res px (the sd15_<res> preset: the SD1.5 UNet from random init) on the synthetic shapes
set, from a latent cache of --images samples made first with scripts/precompute_latents.py (bench.py's
random-init SD1.5-shaped VAE and text encoder, square images), no checkpoints, no live samples, the preset's
learning rate (1e-4) reached after --warmup steps (the preset's own 10,000 would leave a 2,000-step run in
its warmup; with 100, a bf16 run at batch 32 died at step ~350, 1 x H200, 2026-12-04, --together with fp8:
its loss went from 0.10 to 0.375 and stayed, most blocks' gradients near 1e-4, while fp8 went on). Runs:
  bf16        train.seed=0
  fp8         train.seed=0 and train.fp8=true: the same init, data and draws as bf16
  bf16_seed1  train.seed=1 (another init and other draws, the same data): the run-to-run spread
Each run leaves <out>/<run>/metrics.jsonl (copied there every 15 s while it runs, so that a call cut short
keeps it) and <out>/<run>/summary.json (steady img/s, peak memory, the mean loss per window of --window
steps); the final checkpoint is deleted. --report reads a run without a summary from its metrics.jsonl.
The report prints the curves side by side, and over the second half of the run (past the first fast drop)
fp8's mean distance from the bf16 curve against bf16_seed1's: the curves agree within the run-to-run spread
when fp8's is at most bf16_seed1's. img/s compare only within one call (one host): bench.py --fp8 on/off
gives them side by side.
--together starts the runs at once on the one GPU (each its own process): the curves in about the time of
one run's compile plus the runs' GPU work, the img/s then shared and not a figure of either.
"""
import argparse
import concurrent.futures
import json
import math
import shutil
import socket
import sys
import threading
from pathlib import Path

import _path  # noqa: F401
import numpy as np
from bench import make_bundle, steady_figures, torchrun

RUNS = {"bf16": ["--train.seed=0"], "fp8": ["--train.seed=0", "--train.fp8=true"],
        "bf16_seed1": ["--train.seed=1"]}


def window_losses(metrics: Path, window: int) -> dict[int, float]:
    """metrics.jsonl -> {last step of the window: mean loss of its log intervals}, for the windows of
    `window` steps."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.startswith("{")]
    sums: dict[int, list[float]] = {}
    for r in records:
        if "loss" in r and "step" in r:
            sums.setdefault(-(-r["step"] // window) * window, []).append(r["loss"])
    return {end: float(np.mean(losses)) for end, losses in sorted(sums.items())}


def run(args, name: str, bundle: Path, cache: Path) -> dict:
    out = Path(args.work) / f"run_{name}"
    shutil.rmtree(out, ignore_errors=True)
    kept = Path(args.out) / name
    kept.mkdir(parents=True, exist_ok=True)
    every = math.gcd(50, args.window)  # log intervals inside the windows
    done = threading.Event()

    def mirror() -> None:  # the curve so far, where a call cut short still finds it
        while not done.wait(15):
            if (out / "metrics.jsonl").is_file():
                shutil.copy(out / "metrics.jsonl", kept / "metrics.jsonl")

    threading.Thread(target=mirror, daemon=True).start()
    try:
        torchrun(1, "scripts/train.py",
                 [f"--preset=sd15_{args.res}", f"--model.pretrained={bundle}", f"--train.out_dir={out}",
                  "--data.source=latents", f"--data.path={cache}", "--data.buckets=off",
                  f"--data.batch_per_gpu={args.batch}", f"--train.max_steps={args.steps}",
                  f"--log.every={every}", "--log.progress=lines", "--sample.every=0",
                  f"--ckpt.every={10 * args.steps}", "--ckpt.resume=none",
                  f"--optim.warmup_steps={args.warmup}", *RUNS[name]],
                 7200, Path(args.work) / "logs" / f"{name}.log")
    finally:
        done.set()
    shutil.copy(out / "metrics.jsonl", kept / "metrics.jsonl")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the final save: 14 GB for SD1.5
    summary = summarize(kept, name, args.window, {"res": args.res, "batch": args.batch, "steps": args.steps,
                                                   "host": socket.gethostname(), "together": args.together})
    (kept / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def summarize(folder: Path, name: str, window: int, known: dict) -> dict:
    """A run's summary from the metrics.jsonl in `folder`; `known`: what the records do not say."""
    return {"run": name, **known, **steady_figures(folder),
            "window_losses": window_losses(folder / "metrics.jsonl", window)}


def report(dirs: list[str], window: int) -> int:
    """The runs' summaries found under `dirs` (the last of each name wins), side by side."""
    found = {}
    for d in dirs:
        for folder in sorted(x for x in Path(d).iterdir() if x.is_dir()):
            if (folder / "summary.json").is_file():
                summary = json.loads((folder / "summary.json").read_text())
            elif folder.name in RUNS and (folder / "metrics.jsonl").is_file():  # a call cut it short
                summary = summarize(folder, folder.name, window,
                                    {"res": "?", "batch": "?", "host": "?", "cut_short": True})
                losses = summary["window_losses"]  # keyed as a summary.json read back is: by str
                summary.update(steps=max(losses), window_losses={str(k): v for k, v in losses.items()})
            else:
                continue
            found[summary["run"]] = summary
    for name, s in found.items():
        print(f"{name:>11}: {s['img_per_s']:.1f} img/s, {s['peak_mem_gib']:.1f} GiB peak, "
              f"{s['res']} px, batch {s['batch']}, {s['steps']} steps"
              + (" (cut short: no summary; from its metrics.jsonl)" if s.get("cut_short") else ""))
    if any(s.get("together") for s in found.values()):
        print("(runs made with --together shared the GPU: their img/s are not figures of either)")
    if "bf16" in found and "fp8" in found:
        same = found["bf16"].get("host") == found["fp8"].get("host")
        print(f"fp8 against bf16: {found['fp8']['img_per_s'] / found['bf16']['img_per_s'] - 1:+.1%} img/s"
              + ("" if same else " (other hosts: compare bench.py --fp8 on/off rows of one call instead)"))
    names = [n for n in RUNS if n in found]
    ends = sorted({int(e) for n in names for e in found[n]["window_losses"]})
    print("  step " + "".join(f"{n:>12}" for n in names))
    for end in ends:
        print(f"{end:>6} " + "".join(f"{found[n]['window_losses'].get(str(end), float('nan')):>12.5f}"
                                      for n in names))
    if {"bf16", "fp8", "bf16_seed1"} <= set(found):
        base = found["bf16"]["window_losses"]
        late = [e for e in base if int(e) > max(map(int, base)) / 2]  # past the first fast drop

        def gaps(name: str) -> list[float]:
            other = found[name]["window_losses"]
            return [other[e] - base[e] for e in late if e in other]

        fp8, spread = gaps("fp8"), gaps("bf16_seed1")
        fp8_distance, spread_distance = float(np.mean(np.abs(fp8))), float(np.mean(np.abs(spread)))
        verdict = "agree" if fp8_distance <= spread_distance else "do not agree"
        print(f"second half, against bf16 per window: fp8 {fp8_distance:.5f} apart ({np.mean(fp8):+.5f} on "
              f"average), bf16_seed1 {spread_distance:.5f} ({np.mean(spread):+.5f}) -> the curves {verdict} "
              f"within the run-to-run spread")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--res", type=int, default=256, choices=[256, 512])
    parser.add_argument("--batch", type=int, default=32, help="images per step")
    parser.add_argument("--warmup", type=int, default=1000, help="steps to the full learning rate")
    parser.add_argument("--images", type=int, default=8192, help="shapes samples in the latent cache")
    parser.add_argument("--window", type=int, default=100, help="steps per window of the loss curve")
    parser.add_argument("--work", default="/tmp/ldm_ddp_bench_fp8")
    parser.add_argument("--out", default="bench_fp8", help="the runs' metrics and summaries")
    parser.add_argument("--together", action="store_true", help="the runs at once on the one GPU")
    parser.add_argument("--report", nargs="+", metavar="DIR", help="only compare runs kept in these folders")
    args = parser.parse_args()
    if args.report:
        return report(args.report, args.window)
    work = Path(args.work)
    bundle = make_bundle(work / "bundle")
    cache = work / f"latents_shapes_{args.res}_{args.images}"
    if not (cache / "manifest.json").is_file():
        torchrun(1, "scripts/precompute_latents.py",
                 [str(cache), f"--preset=sd15_{args.res}", f"--model.pretrained={bundle}",
                  "--data.buckets=off", "--data.source=shapes", f"--data.shapes_num_samples={args.images}",
                  "--batch=64"],
                 3600, work / "logs" / "precompute.log")
    with concurrent.futures.ThreadPoolExecutor(len(args.runs) if args.together else 1) as pool:
        for summary in pool.map(lambda name: run(args, name, bundle, cache), args.runs):
            print(f"{summary['run']}: {summary['img_per_s']:.1f} img/s", flush=True)
    return report([args.out], args.window)


if __name__ == "__main__":
    sys.exit(main())
