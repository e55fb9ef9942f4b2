"""The trainer with the SDXL preset on a GPU at 1024 px (`--preset sdxl_1024`, under torchrun): speed and peak
memory per configuration, a kill -9 and resume, and the export to a StableDiffusionXLPipeline.

    python scripts/bench_sdxl.py [--parts speed resume configs export] [--batch 8] [--compile full]
        [--configs 4:off 4:off:gc 8:off] [--save-at 100] [--steps 30] [--images 128]
        [--pretrained DIR] [--work DIR] [--json OUT] [--set KEY=VALUE ...]

Without --pretrained it writes a random-init folder of SDXL's layout and shapes (no download): the VAE
(scaling factor 0.13025), text_encoder (CLIP ViT-L: 12 layers of width 768), text_encoder_2 (OpenCLIP ViT-bigG
with its projection: 32 layers of width 1280) and two word-level tokenizers that pad to 77 tokens. It makes
square 1024 px JPEGs and caches their latents (scripts/precompute_latents.py, the preset's buckets: all in
1024x1024), then trains from the cache with EMA every step:
  speed    --batch and --compile; a background save of the whole state (41 GB) at step --save-at; the run is
           killed -9 once that checkpoint is committed and --steps more are logged. img/s of the steady log
           intervals before the save and while it is written, the peak memory, the img/s of the interval
           that holds the save's stall (the copy aside), and a torch.profiler summary of 3 steps just before
           the save (logs/, run/profile/)
  resume   the same command again: it resumes from that checkpoint; the losses of the steps done twice
           (after speed, in the same call)
  configs  each BATCH:COMPILE[:gc] (gc: model.gradient_checkpointing) for --steps steps, no save: img/s, peak
  export   scripts/export_diffusers.py --dtype fp32 of the run's newest checkpoint (speed leaves one);
           StableDiffusionXLPipeline loads it (the warnings it logs are recorded) and samples 1024 px from
           the noise our sampler is given
A run is killed rather than ended: its final save would need a second 41 GB on the disk. Each part's figures
(or its error) go to --json as soon as it ends.
"""
import argparse
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import _path  # noqa: F401
import bench
import chaos
import numpy as np
import torch

REPO = bench.REPO


def run_args(args, out: Path, cache: Path, batch: int, compile_mode: str, gc: bool, every: int) -> list[str]:
    return ["--preset=sdxl_1024", f"--model.pretrained={args.pretrained}", f"--train.out_dir={out}",
            "--train.max_steps=1000000", f"--data.batch_per_gpu={batch}", f"--train.compile={compile_mode}",
            f"--model.gradient_checkpointing={str(gc).lower()}", "--data.source=latents",
            f"--data.path={cache}", f"--log.every={every}", "--log.progress=lines", "--sample.every=0",
            "--ckpt.keep=1", "--ckpt.resume=auto", *(f"--{x}" for x in args.set)]


def attempt(args: list[str], out: Path, log: Path, until: int, committed: Path | None = None,
            timeout: float = 1500.0) -> tuple[list[dict], str]:
    """torchrun (1 process) of scripts/train.py until it logs step `until` and `committed` has been seen, then
    rank 0 is killed -9 (no final save). -> the metric records it wrote, and its log."""
    chaos.wait_for_exit_of_all(out)
    log.parent.mkdir(parents=True, exist_ok=True)
    launched = time.time()
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc_per_node", "1", str(REPO / "scripts/train.py"), *args],
                                cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"})
    deadline, seen = time.monotonic() + timeout, committed is None
    try:
        while not ((seen := seen or committed.is_file())
                   and max((r["step"] for r in records_since(out, launched)), default=0) >= until):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the run ended (exit {proc.returncode}) or stalled before step {until}:\n"
                                   f"{log.read_text()[-3000:]}")
            time.sleep(0.1)
    finally:
        rank0 = chaos.wait_for_worker(proc, 0, time.monotonic() + 10)
        if rank0:
            os.kill(rank0, signal.SIGKILL)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        chaos.wait_for_exit_of_all(out)
    return records_since(out, launched), log.read_text()


def records_since(out: Path, launched: float) -> list[dict]:
    """The metric records written after `launched` (a resumed run sets the records past its checkpoint aside,
    but only once it has started)."""
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    records = (json.loads(x) for x in lines if x.startswith("{") and x.endswith("}"))  # a killed write: cut
    return [r for r in records if r.get("time", 0.0) >= launched]


def interval_figures(records: list[dict], first: int, last: int) -> dict:
    """img/s, data wait and the peak of the steady log intervals ending in (first, last]: the first interval
    (compilation, autotuning) and any in which a graph was compiled are left out."""
    timed = [r for r in records if "img_per_s" in r]
    steady = [r for i, r in enumerate(timed) if i and first < r["step"] <= last
              and r.get("compiled_graphs", 0) == timed[i - 1].get("compiled_graphs", 0)]
    return {"img_per_s": float(np.mean([r["img_per_s"] for r in steady])) if steady else None,
            "tflops_per_gpu": float(np.mean([r.get("tflops_per_gpu", 0) for r in steady] or [np.nan])),
            "data_wait_share": float(np.mean([r.get("data_wait_share", 0) for r in steady] or [np.nan])),
            "intervals": len(steady), "peak_mem_gib": max((r.get("peak_mem_gib", 0) for r in records),
                                                           default=0.0),
            "compiled_graphs": timed[-1].get("compiled_graphs", 0) if timed else 0,
            "compile_s": timed[-1].get("compile_s", 0.0) if timed else 0.0}


def newest(out: Path) -> Path:
    return sorted((out / "checkpoints").glob("step_*.safetensors"))[-1]


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def export_check(checkpoint: Path, folder: Path, steps: int) -> dict:
    """Export (fp32), load with StableDiffusionXLPipeline recording what it logs and warns, and sample one
    1024 px image with the pipeline and with our sampler from the same initial noise."""
    from diffusers import StableDiffusionXLPipeline

    from ldm_ddp.models import load_trained
    from ldm_ddp.sampling import generate, initial_noise
    from ldm_ddp.schedule import NoiseSchedule

    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "scripts/export_diffusers.py"), str(checkpoint), str(folder),
                    "--dtype", "fp32"], cwd=REPO, check=True)
    exported = time.perf_counter() - start
    logged: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: logged.append(record.getMessage())
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = StableDiffusionXLPipeline.from_pretrained(folder).to("cuda")
    logged += [str(w.message) for w in caught]
    cfg, unet, frozen = load_trained(str(checkpoint), "ema", torch.device("cuda"), frozen_dtype="fp32")
    d = cfg.diffusion
    schedule = NoiseSchedule(d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end,
                             d.zero_terminal_snr)
    prompt, size = ["a photograph of an astronaut riding a horse"], 1024
    ours = generate(unet, frozen, schedule, prompt, [7], steps, 7.5, 0.7, "trailing", autocast=False,
                    size=(size, size)).cpu()
    noise = initial_noise([7], (4, size // 8, size // 8)).cuda()
    theirs = pipe(prompt, height=size, width=size, latents=noise, num_inference_steps=steps,
                  guidance_scale=7.5, guidance_rescale=0.7, output_type="pt").images.cpu() * 2 - 1
    return {"export_s": exported, "pipeline_warnings": logged, "sample_steps": steps,
            "shape": list(theirs.shape), "max_abs_diff": float((theirs - ours).abs().max()),
            "mean_abs_diff": float((theirs - ours).abs().mean())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["speed", "resume", "configs", "export"],
                        choices=["speed", "resume", "configs", "export"])
    parser.add_argument("--batch", type=int, default=8, help="speed and resume: images per GPU")
    parser.add_argument("--compile", default="full", choices=["off", "full", "regional"],
                        help="speed and resume: train.compile")
    parser.add_argument("--save-at", type=int, default=100, help="speed: the step of the background save")
    parser.add_argument("--steps", type=int, default=30, help="steps logged after the save; configs: steps")
    parser.add_argument("--configs", nargs="*", default=["4:off", "4:off:gc", "8:off"],
                        help="BATCH:COMPILE[:gc]")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--pretrained", default="", help="an SDXL folder (default: random, SDXL's shapes)")
    parser.add_argument("--work", default="/tmp/ldm_ddp_bench_sdxl")
    parser.add_argument("--json", default="")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more trainer settings, last (also given to the latent precompute)")
    args = parser.parse_args()
    if args.steps > args.save_at:  # the save of step 2 x save-at could be written (41 GB) before the kill
        parser.error("--steps must not exceed --save-at")
    if "resume" in args.parts and "speed" not in args.parts:
        parser.error("resume compares with the losses of the speed part's run: give both")
    if not torch.cuda.is_available():
        print("error: bench_sdxl.py measures a GPU; none is visible", file=sys.stderr)
        return 1
    work = Path(args.work)
    args.pretrained = args.pretrained or str(bench.make_bundle(work / "bundle", sdxl=True))
    cache = work / "latents_1024"
    if not (cache / "manifest.json").is_file():
        images = bench.make_images(work / "images_1024", args.images, 1024, square=True)
        bench.torchrun(1, "scripts/precompute_latents.py",
                       [str(cache), "--preset=sdxl_1024", f"--model.pretrained={args.pretrained}",
                        "--data.source=folder", f"--data.path={images}", "--batch=16",
                        "--data.num_workers=8", *(f"--{x}" for x in args.set)],
                       1800, work / "logs" / "precompute.log")
    results: dict = {"batch": args.batch, "compile": args.compile, "save_at": args.save_at}
    # log intervals of the resumed run are those of the first attempt after the save: comparable losses
    out, every = work / "run", math.gcd(args.save_at, 10)
    checkpoint = out / "checkpoints" / f"step_{args.save_at:07d}.safetensors"
    speed_args = run_args(args, out, cache, args.batch, args.compile, False, every)

    def part(name: str, work_of) -> None:
        start = time.perf_counter()
        try:
            results[name] = {**work_of(), "wall_s": time.perf_counter() - start}
        except Exception as err:  # the other parts still run, and this one's error is kept
            results[name] = {"error": f"{type(err).__name__}: {err}"[-3000:]}
        print(json.dumps({name: results[name]}), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))

    def speed() -> dict:
        shutil.rmtree(out, ignore_errors=True)
        # torch.profiler records 3 steps in the log interval before the save, which the figures leave out
        records, _ = attempt([*speed_args, f"--ckpt.every={args.save_at}",
                              f"--log.profile_at={args.save_at - every + 1}"], out,
                             work / "logs" / "speed.log", args.save_at + args.steps, committed=checkpoint)
        results["first_attempt"] = records
        saved = [r for r in records if r.get("ckpt_step") == args.save_at]
        summary = out / "profile" / "summary_rank0.json"
        return {"before_save": interval_figures(records, 0, args.save_at - every),
                "profile": json.loads(summary.read_text()) if summary.is_file() else None,
                "while_writing": interval_figures(records, args.save_at, args.save_at + args.steps),
                "save_interval_img_per_s": next((r["img_per_s"] for r in records
                                                 if r["step"] == args.save_at + every), None),
                "save": {k: v for k, v in (saved[0] if saved else {}).items() if k.startswith("ckpt_")},
                "logged_until": max(losses(records))}

    def resume() -> dict:
        before = losses(results.get("first_attempt") or [])
        records, log = attempt([*speed_args, f"--ckpt.every={args.save_at}"], out,
                               work / "logs" / "resume.log", args.save_at + 2 * every)
        after = {k: v for k, v in losses(records).items() if k > args.save_at}
        redone = sorted(set(before) & set(after))
        return {"resumed_line": next((x for x in log.splitlines() if x.startswith("resumed from")), None),
                "redone": [[k, before[k], after[k]] for k in redone],
                "redone_max_rel_diff": max((abs(after[k] - before[k]) / abs(before[k]) for k in redone),
                                           default=None),
                "figures": interval_figures(records, args.save_at, args.save_at + 2 * every)}

    def configs() -> dict:
        figures = {}
        for spec in args.configs:
            batch, mode, *gc = spec.split(":")
            run = work / f"run_{batch}_{mode}{'_gc' if gc else ''}"
            shutil.rmtree(run, ignore_errors=True)
            records, _ = attempt([*run_args(args, run, cache, int(batch), mode, bool(gc), 5),
                                  "--ckpt.every=1000000"], run, work / "logs" / f"{run.name}.log", args.steps)
            figures[spec] = interval_figures(records, 0, args.steps)
            shutil.rmtree(run, ignore_errors=True)
        return figures

    for name, work_of in (("speed", speed), ("resume", resume), ("configs", configs),
                          ("export", lambda: export_check(newest(out), work / "export", 4))):
        if name in args.parts:
            part(name, work_of)
    results.pop("first_attempt", None)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
