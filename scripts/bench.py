"""GPU speed, side by side in one run: the bare UNet training step vs the real trainer, fed from the latent
cache and from online VAE encoding; SD1.5 UNet (bare: --unet sdxl too); one GPU and several under torchrun.

    python scripts/bench.py [--gpus 1 2] [--res 256 512] [--batch 256=64 512=16] [--steps 40]
        [--compile off|full|regional] [--sdpa auto|flash|cudnn|efficient|math] [--cudnn-benchmark on|off]
        [--channels-last on|off] [--ema-compile on|off|both] [--ema-overlap on|off] [--profile]
        [--pretrained DIR] [--work DIR] [--json OUT.json] [--set KEY=VALUE ...]

Without --pretrained it writes a random-init SD1.5-shaped VAE, 12-layer CLIP text encoder and a
77-token tokenizer (same shapes and FLOPs as the real ones; no download). It makes pre-resized
JPEGs, caches their latents with scripts/precompute_latents.py, then for each resolution and GPU count:
  bare     scripts/bench_bare.py under torchrun: UNet forward + backward (bf16 autocast,
           channels-last), grad clip, fused AdamW, EMA, on random tensors; DDP as the trainer wraps it
  ceiling  the same process's forward + backward + fused AdamW alone (no clip, no EMA): every row's
           share of it is the "share" column (of the bare step for a row without a ceiling)
  cache    scripts/train.py --data.source=latents (the trainer: loader, text encoder, draws, metrics)
  online   scripts/train.py --data.source=folder (the VAE encodes each batch)
  buckets  online, with --data.buckets=auto: the same JPEGs (5:4 and 3:4) in their aspect-ratio buckets
           (576x448 and 448x576 at 512 px) instead of square crops; one compiled graph per bucket
The bare step also times variants of its EMA in the same process (VARIANTS), printed below the table.
img/s come from steady-state steps (log intervals in which nothing was compiled; the first, with
compilation, is dropped); the trainer rows also give the graphs compiled and the seconds it took. MFU counts
the UNet's training FLOPs (torch.utils.flop_counter) against 989 TFLOP/s (H100 SXM dense bf16) and
against this card's measured bf16 matmul rate. --profile adds a torch.profiler record of 3 steps of each
path (Chrome trace, op table; the share of wall time the GPU was busy goes into the table).
"""
import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import _path  # noqa: F401
import bench_bare
import numpy as np
from bench_bare import SWITCHES, VARIANTS

REPO = Path(__file__).resolve().parent.parent
H100_PEAK = 989.0
def make_bundle(root: Path, sdxl: bool = False) -> Path:
    """A random-init SD1.5-shaped vae/, text_encoder/ and tokenizer/ (77 tokens) in `root`; `sdxl`: SDXL's
    shapes, with text_encoder_2/ and tokenizer_2/ too (OpenCLIP bigG's width and depth)."""
    if (root / "vae" / "config.json").is_file():
        return root
    from diffusers import AutoencoderKL

    from ldm_ddp.data.shapes import vocabulary
    from ldm_ddp.models import write_demo_text_encoder
    write_demo_text_encoder(root, vocabulary(), width=768, max_length=77, layers=12, heads=12)
    if sdxl:
        write_demo_text_encoder(root, vocabulary(), width=1280, max_length=77, second=True, layers=32,
                                heads=20)
    AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                  block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                  sample_size=1024 if sdxl else 512,
                  scaling_factor=0.13025 if sdxl else 0.18215).save_pretrained(root / "vae")
    return root


def make_images(root: Path, count: int, resolution: int, square: bool = False) -> Path:
    """`count` photo-like JPEGs, captioned, shorter side `resolution` (as make_shards.py --resize leaves
    them): 5:4 and 3:4 in turn, or all square."""
    from PIL import Image
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        path = root / f"{i:05d}.jpg"
        if not path.is_file():
            rng = np.random.default_rng(i)
            size = ((resolution,) * 2 if square else
                    (resolution * 5 // 4, resolution) if i % 2 else (resolution, resolution * 4 // 3))
            field = (Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=np.uint8))
                     .resize(size, Image.BICUBIC))
            pixels = np.asarray(field, np.float32) + rng.normal(0, 10, (size[1], size[0], 1))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        rows.append(json.dumps({"file_name": path.name, "text": f"a large red circle in the center {i % 7}"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def command(nproc: int, script: str, args: list[str]) -> list[str]:
    """`script` with `args`, under torchrun when nproc > 1."""
    launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                    str(nproc)] if nproc > 1 else [])
    return [*launcher, str(REPO / script), *args]


def torchrun(nproc: int, script: str, args: list[str], timeout: float, log: Path) -> str:
    """Run `script` (under torchrun when nproc > 1) with its output in `log` (kept, for a run that hangs or is
    killed); -> its stdout and stderr."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as sink:
        done = subprocess.run(command(nproc, script, args), cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output = log.read_text()
    if done.returncode:
        raise RuntimeError(f"{script} {' '.join(args[:3])} ... failed:\n{output[-4000:]}")
    return output


def trainer_args(args, res: int, batch: int, data: list[str], out: Path, every: int) -> list[str]:
    """scripts/train.py's arguments for a bench run: the sd15 preset and the trainer's own settings (live
    samples only with --sample-every). The fast-path switches of the bare step are not the trainer's: it runs
    its defaults (channels-last, cuDNN autotuning, one compiled graph under DDP)."""
    return [f"--preset=sd15_{res}", f"--model.pretrained={args.pretrained}", f"--train.out_dir={out}",
            f"--train.max_steps={args.steps}", f"--data.batch_per_gpu={batch}", f"--log.every={every}",
            f"--sample.every={args.sample_every}", "--log.progress=lines", f"--train.compile={args.compile}",
            f"--train.cuda_graphs={args.cuda_graphs}", f"--train.fp8={str(args.fp8 == 'on').lower()}",
            f"--train.grad_reduce={args.grad_reduce}", f"--train.shard_optimizer={args.shard_optimizer}",
            f"--ema.update_every={args.ema_every}", "--data.buckets=off", *data,
            *(f"--{setting}" for setting in args.set)]


def trainer(args, nproc: int, res: int, batch: int, data: list[str], out: Path) -> dict:
    """Run the real trainer for args.steps steps; -> steady-state figures from its metrics.jsonl."""
    every = max(1, args.steps // 4)
    run_args = [*trainer_args(args, res, batch, data, out, every), f"--ckpt.every={10 * args.steps}",
                "--ckpt.resume=none",
                # profiled: 3 steps in the last log interval, which the figures leave out
                *([f"--log.profile_at={args.steps - every + 1}"] if args.profile else [])]
    shutil.rmtree(out, ignore_errors=True)  # an earlier bench's run here would add its records and profile
    start = time.perf_counter()
    torchrun(nproc, "scripts/train.py", run_args, 1800, out.parent / "logs" / f"{out.name}.log")
    result = {**steady_figures(out), "wall_s": time.perf_counter() - start}
    summary = out / "profile" / "summary_rank0.json"
    if summary.is_file():
        result["profile"] = json.loads(summary.read_text())
    return result


def steady_figures(out: Path) -> dict:
    """Figures of a trainer run from its metrics.jsonl, in steady state: the first log interval (compilation,
    autotuning), the last (the profiler, the final save) and any in which a graph was compiled are dropped."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
               if line.startswith("{") and line.endswith("}")]  # a killed run's last line may be cut
    timed = [r for r in records if "img_per_s" in r]
    compiled = [r.get("compiled_graphs", 0) for r in timed]  # a bucket's first batch compiles its graph
    steady = [r for i, r in enumerate(timed[:-1]) if i and compiled[i] == compiled[i - 1]] or timed[-1:]
    return {"img_per_s": float(np.mean([r["img_per_s"] for r in steady])),
            "data_wait_share": float(np.mean([r["data_wait_share"] for r in steady])),
            "tflops_per_gpu": float(np.mean([r.get("tflops_per_gpu", np.nan) for r in steady])),
            "peak_mem_gib": max(r.get("peak_mem_gib", 0) for r in records),
            "compiled_graphs": compiled[-1] if compiled else 0,
            "compile_s": timed[-1].get("compile_s", 0.0) if timed else 0.0, "steady_intervals": len(steady)}


def kill_and_resume(nproc: int, run_args: list[str], out: Path, save_at: int, every: int,
                    timeout: float) -> dict:
    """Kill and resume under torchrun: the trainer saves at step `save_at`, rank 0 is killed -9 one log
    interval later, and the same command resumes from that checkpoint to the end. -> where it stopped and
    resumed, the losses of the steps done twice (same data and draws: they should agree), and the mean loss
    over two log intervals on either side of the resume point (a jump would show here)."""
    import shutil

    import chaos
    chaos.wait_for_exit_of_all(out)  # ranks of an earlier attempt would write into the fresh folder
    shutil.rmtree(out, ignore_errors=True)
    (out.parent / "logs").mkdir(parents=True, exist_ok=True)
    checkpoint_file = out / "checkpoints" / f"step_{save_at:07d}.safetensors"
    start = time.perf_counter()
    with (out.parent / "logs" / f"{out.name}_killed.log").open("w") as sink:
        proc = subprocess.Popen(command(nproc, "scripts/train.py", run_args), cwd=REPO, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout
    while not (checkpoint_file.is_file() and chaos.last_step(out) >= save_at + every):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            chaos.wait_for_exit_of_all(out)  # torchrun's workers run in sessions of their own
            raise RuntimeError(f"the first attempt ended or stalled before step {save_at + every} "
                               f"(see {out.parent / 'logs' / (out.name + '_killed.log')})")
        time.sleep(0.05)
    rank0 = proc.pid if nproc == 1 else chaos.worker_pid(proc.pid, 0)
    if rank0 is None:
        raise RuntimeError(f"rank 0 of launcher {proc.pid} not found")
    os.kill(rank0, signal.SIGKILL)
    proc.wait(timeout=300)
    chaos.wait_for_exit_of_all(out)
    first_attempt = (out / "metrics.jsonl").read_text().splitlines()
    torchrun(nproc, "scripts/train.py", run_args, timeout, out.parent / "logs" / f"{out.name}_resumed.log")

    def losses(part: list[str]) -> dict[int, float]:
        records = [json.loads(line) for line in part if line.startswith("{") and line.endswith("}")]
        return {r["step"]: r["loss"] for r in records if "loss" in r}
    # The resume sets the first attempt's records past the checkpoint aside: metrics.jsonl then holds the
    # steps up to it and the resumed run's after it.
    before = losses(first_attempt)
    after = {k: v for k, v in losses((out / "metrics.jsonl").read_text().splitlines()).items() if k > save_at}
    redone = sorted(set(before) & set(after))
    return {"saved_at": save_at, "killed_after_step": max(before), "resumed_first_log": min(after),
            "redone": [[step, before[step], after[step]] for step in redone],
            "redone_max_rel_diff": max((abs(after[k] - before[k]) / abs(before[k]) for k in redone),
                                       default=None),
            "loss_before": float(np.mean([v for k, v in before.items()
                                          if save_at - 2 * every < k <= save_at])),
            "loss_after": float(np.mean([v for k, v in after.items() if save_at < k <= save_at + 2 * every])),
            "final_step": max(after), "wall_s": time.perf_counter() - start}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1])
    parser.add_argument("--res", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch", nargs="+", default=["256=64", "512=16"], help="per-GPU batch by res")
    parser.add_argument("--steps", type=int, default=40, help="timed steps (trainer: steps per run)")
    parser.add_argument("--warmup", type=int, default=8, help="untimed bare steps first")
    parser.add_argument("--images", type=int, default=1024, help="synthetic images per resolution")
    bench_bare.add_switches(parser)  # --unet, --compile, --sdpa, ... --ema-every, --ema-overlap
    parser.add_argument("--sample-every", type=int, default=0, help="trainer: sample grids every N steps")
    parser.add_argument("--profile", action="store_true", help="torch.profiler: 3 steps of each path")
    parser.add_argument("--parts", nargs="+", default=["bare", "cache", "online"],
                        choices=["bare", "cache", "online", "buckets", "resume"],
                        help="resume: the trainer from the cache saves at --steps/2, rank 0 is killed -9, "
                             "and the same command resumes (reported below the table)")
    parser.add_argument("--online-workers", type=int, default=8, help="DataLoader workers per GPU, online")
    parser.add_argument("--pretrained", default="", help="vae/, text_encoder/, tokenizer/ (default: random)")
    parser.add_argument("--work", default="/tmp/ldm_ddp_bench")
    parser.add_argument("--json", default="")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="trainer rows: more settings, last (e.g. train.compile_vae=off)")
    args = parser.parse_args()
    work, batches = Path(args.work), {int(k): int(v) for k, v in (b.split("=") for b in args.batch)}
    trainer_parts = {"cache", "online", "buckets", "resume"} & set(args.parts)
    if trainer_parts:
        args.pretrained = args.pretrained or str(make_bundle(work / "bundle"))
    rows = []
    for res in args.res:
        batch = batches[res]
        images = make_images(work / f"images_{res}", args.images, res) if trainer_parts else None
        # One cache per image count and VAE: another --images or --pretrained must not reuse a stale one.
        cache = work / (f"latents_{res}_"
                        f"{hashlib.sha1(f'{args.images}|{args.pretrained}'.encode()).hexdigest()[:8]}")
        if {"cache", "resume"} & set(args.parts) and not (cache / "manifest.json").is_file():
            torchrun(max(args.gpus), "scripts/precompute_latents.py",
                     [str(cache), f"--preset=sd15_{res}", f"--model.pretrained={args.pretrained}",
                      "--data.buckets=off",  # square latents, as the trainer rows train (trainer_args)
                      "--data.source=folder", f"--data.path={images}", "--batch=64", "--data.num_workers=8"],
                     1800, work / "logs" / f"precompute_{res}.log")
        for gpus in args.gpus:
            row = {"res": res, "gpus": gpus, "batch_per_gpu": batch,
                   "switches": {k: getattr(args, k)
                                for k in (*SWITCHES, "sample_every", "steps", "warmup", "set")}}
            if "bare" in args.parts:
                out = torchrun(gpus, "scripts/bench_bare.py",
                               ["--res", str(res), "--batch", str(batch),
                                "--steps", str(args.steps), "--warmup", str(args.warmup),
                                *(x for k in SWITCHES
                                  for x in ("--" + k.replace("_", "-"), str(getattr(args, k)))),
                                "--work", str(work), *(["--profile"] if args.profile else [])],
                               1800, work / "logs" / f"bare_{res}_{gpus}.log")
                row["bare"] = json.loads(next(line[6:] for line in out.splitlines()
                                              if line.startswith("BENCH ")))
                print_part(row, "bare")
            if "cache" in args.parts:
                row["cache"] = trainer(args, gpus, res, batch,
                                       ["--data.source=latents", f"--data.path={cache}"],
                                       work / f"run_cache_{res}_{gpus}")
                print_part(row, "cache")
            if "online" in args.parts:
                row["online"] = trainer(args, gpus, res, batch,
                                        ["--data.source=folder", f"--data.path={images}",
                                         f"--data.num_workers={args.online_workers}"],
                                        work / f"run_online_{res}_{gpus}")
                print_part(row, "online")
            if "buckets" in args.parts:
                row["buckets"] = trainer(args, gpus, res, batch,
                                         ["--data.source=folder", f"--data.path={images}",
                                          f"--data.num_workers={args.online_workers}", "--data.buckets=auto"],
                                         work / f"run_buckets_{res}_{gpus}")
                print_part(row, "buckets")
            if "resume" in args.parts:  # save, kill -9, the same command again
                every = max(1, args.steps // 8)
                out = work / f"run_resume_{res}_{gpus}"
                run_args = [*trainer_args(args, res, batch, ["--data.source=latents", f"--data.path={cache}"],
                                          out, every),
                            f"--ckpt.every={args.steps // 2}", "--ckpt.resume=auto"]
                row["resume"] = kill_and_resume(gpus, run_args, out, args.steps // 2, every, 3600)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:  # first: the figures are kept even if the table cannot be printed
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print_table(rows)
    return 0


def print_part(row: dict, part: str) -> None:
    """One path's figures as soon as they are in (a call cut short keeps them): `PART {json}`."""
    print("PART " + json.dumps({"res": row["res"], "gpus": row["gpus"], "batch_per_gpu": row["batch_per_gpu"],
                                part: row[part]}), flush=True)


def print_table(rows: list[dict]) -> None:
    """The figures of every path, each as a share of the ceiling (the bare step's forward, backward and
    fused AdamW alone, timed in its process) where there is one, else of the bare step."""
    print(f"\n{'res':>4} {'gpus':>4} {'batch':>5}  {'path':<7} {'img/s':>8} {'/GPU':>7} {'MFU989':>7} "
          f"{'MFUmm':>6} {'share':>7} {'wait':>5} {'mem GiB':>7} {'GPU busy':>8}")
    for row in rows:
        bare = row.get("bare", {})
        ceiling = bare.get("variants", {}).get("ceiling")
        top = ceiling or bare.get("img_per_s")
        paths = {"ceiling": {"img_per_s": ceiling, "peak_mem_gib": float("nan")}} if ceiling else {}
        paths.update((path, row[path]) for path in ("bare", "cache", "online", "buckets") if path in row)
        for path, r in paths.items():
            gpus = row["gpus"]
            per_gpu = r["img_per_s"] / gpus
            # the trainer's own count where no bare step ran in the call (its metrics' FLOPs per image)
            tflops = (per_gpu * bare["flops_per_image"] / 1e12 if bare.get("flops_per_image")
                      else r.get("tflops_per_gpu", float("nan")))
            mfu_mm = tflops / bare["matmul_tflops"] if bare.get("matmul_tflops") else float("nan")
            versus = r["img_per_s"] / top if top else float("nan")
            print(f"{row['res']:>4} {gpus:>4} {row['batch_per_gpu']:>5}  {path:<7} {r['img_per_s']:>8.1f} "
                  f"{per_gpu:>7.1f} {tflops / H100_PEAK:>7.1%} {mfu_mm:>6.1%} {versus:>7.1%} "
                  f"{r.get('data_wait_share', 0):>5.1%} {r['peak_mem_gib']:>7.1f} "
                  f"{r.get('profile', {}).get('device_busy_share', float('nan')):>8.1%}")
    for row in rows:
        for path in ("cache", "online", "buckets"):
            if row.get(path, {}).get("compiled_graphs"):
                r = row[path]
                print(f"{row['res']} px, {row['gpus']} GPUs, {path}: {r['compiled_graphs']} graphs "
                      f"compiled in {r['compile_s']:.0f} s (rank 0); {r['steady_intervals']} steady log "
                      "intervals timed")
    card = next((row["bare"]["card"] for row in rows if "bare" in row), "")
    print(f"card: {card}" if card else "")
    if rows:
        print("switches: " + ", ".join(f"{k}={v}" for k, v in rows[0]["switches"].items()))
    for row in rows:
        for name, img_per_s in row.get("bare", {}).get("variants", {}).items():
            print(f"bare {row['res']} px, {row['gpus']} GPUs, {name} ({VARIANTS.get(name, '')}; "
                  f"same process): {img_per_s:.1f} img/s "
                  f"({img_per_s / row['bare']['img_per_s']:.1%} of the bare row)")
        if "resume" in row:
            r = row["resume"]
            diff = "n/a" if r["redone_max_rel_diff"] is None else f"{r['redone_max_rel_diff']:.2e}"
            print(f"resume {row['res']} px, {row['gpus']} GPUs: saved at step {r['saved_at']}, killed after "
                  f"step {r['killed_after_step']}, resumed to {r['final_step']}; {len(r['redone'])} log "
                  f"lines redone, largest relative loss difference {diff}; mean loss two intervals before "
                  f"the resume point {r['loss_before']:.4f}, after {r['loss_after']:.4f}; "
                  f"{r['wall_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
