"""What a checkpoint save costs training on a GPU host: the save as one thread did it, the parallel writer,
the background save, and the preemption save of an SD1.5 and an SDXL training state.

    python scripts/bench_save.py [--unet sd15 sdxl] [--dir DIR] [--trainer] [--json OUT]

For each UNet, a training state on the GPU (random-init UNet in fp32, fused AdamW moments after one step, the
EMA), then, each file deleted after it is timed:
  serial    the save as one thread did it: device-to-host copy, digests, write, fsync (each timed)
  parallel  the same host copy, then checkpoint.commit_checkpoint (threads hash and write; fsync; rename)
  device    the background save (saver.Saver) with a GPU copy: the stall, then the background job
  host      the same with the copy into pinned host memory
  preempt   from the signal to the commit of a save that must commit, with no save in flight, the pinned
            buffers allocated before (the trainer pins them after its first step)
--trainer adds runs of scripts/train.py (SD1.5 at 256 px, batch 32, eager, shapes source, random-init
bundle): a save every --trainer-every steps in the background and inline; each step's seconds logged, the
step after a save against the median.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _path  # noqa: F401
import torch

REPO = Path(__file__).resolve().parent.parent


def disk_rate(folder: Path, gib: int = 8) -> dict:
    """GiB/s of writing `gib` GiB in 64 MiB blocks, with and without the final fsync."""
    block = os.urandom(2**26)
    path = folder / "disk-probe"
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(gib * 16):
            f.write(block)
        written = time.perf_counter() - start
        os.fsync(f.fileno())
    synced = time.perf_counter() - start
    path.unlink()
    return {"gib": gib, "write_gib_s": gib / written, "write_fsync_gib_s": gib / synced}


def training_state(unet_name: str, device):
    from ldm_ddp.checkpoint import TrainingState
    from ldm_ddp.config import EMAConfig, ModelConfig
    from ldm_ddp.ema import EMA
    from ldm_ddp.models import build_unet

    sdxl = unet_name == "sdxl"
    width = 2048 if sdxl else 768 if unet_name == "sd15" else json.loads(Path(unet_name).read_text())[
        "cross_attention_dim"]  # a JSON config: its own
    unet = build_unet(ModelConfig(kind="sdxl" if sdxl else "sd", unet=unet_name), 128 if sdxl else 64,
                      width, device, pooled_width=1280 if sdxl else 0)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-8, fused=device.type == "cuda")
    for p in unet.parameters():  # one step's moments without a forward pass
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return TrainingState("unet", unet, optimizer, EMA(unet, EMAConfig()))


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def serial_save(folder: Path, tensors: dict, raw: dict) -> dict:
    """The one-thread save: snapshot, digests, then one sequential write, fsync, rename."""
    from ldm_ddp import checkpoint_file as cf

    t = [time.perf_counter()]
    cpu = {k: v.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
           for k, v in tensors.items()}
    t.append(time.perf_counter())
    digests = cf.tensor_digests(cpu)
    t.append(time.perf_counter())
    integrity = {"algorithm": "sha256", "metadata": cf.metadata_digest(raw), "tensors": digests}
    order, header = cf.layout(cpu, {**raw, "integrity": json.dumps(integrity)})
    path = folder / "serial.safetensors"
    with open(path, "wb") as f:
        f.write(cf.header_bytes(header))
        for name in order:
            f.write(cpu[name].reshape(-1).view(torch.uint8).numpy())
        t.append(time.perf_counter())
        os.fsync(f.fileno())
    t.append(time.perf_counter())
    path.unlink()
    parts = dict(zip(("to_host", "digests", "write", "fsync"), (b - a for a, b in zip(t, t[1:]))))
    return {**parts, "total": t[-1] - t[0]}


def bench_unet(unet_name: str, folder: Path, device, parts: list[str]) -> dict:
    from ldm_ddp import checkpoint
    from ldm_ddp.saver import Saver

    state = training_state(unet_name, device)
    tensors, meta = checkpoint.training_state_tensors(state, {"bench": unet_name})
    raw = checkpoint.checkpoint_metadata(1, meta)
    gb = sum(t.nbytes for t in tensors.values()) / 1e9
    row = {"unet": unet_name, "state_gb": round(gb, 2), "tensors": len(tensors)}
    print(f"{unet_name}: {gb:.2f} GB in {len(tensors)} tensors", flush=True)
    sync(device)
    ckpt_dir = folder / "ckpt"
    if "serial" in parts:
        row["serial"] = serial_save(folder, tensors, raw)
        print(f"  serial {row['serial']}", flush=True)
    if "parallel" in parts:
        start = time.perf_counter()
        cpu = checkpoint.snapshot(tensors)
        copied = time.perf_counter()
        path = checkpoint.commit_checkpoint(ckpt_dir, 1, cpu, raw)
        row["parallel"] = {"to_host": copied - start, "write_fsync_rename": time.perf_counter() - copied,
                           "total": time.perf_counter() - start}
        if "check" in parts:  # the file reads back bit for bit
            loaded, _ = checkpoint.load_checkpoint(path)
            row["parallel"]["bitwise"] = all(torch.equal(loaded[k], cpu[k]) for k in cpu)
        path.unlink()
        del cpu
        print(f"  parallel {row['parallel']}", flush=True)
    for where in ("device", "host"):
        if where not in parts:
            continue
        saver = Saver(where, background=True)
        for attempt in ("first", "again"):  # the first allocates the pinned buffers
            start = time.perf_counter()
            stall = saver.start(1, tensors, lambda host: checkpoint.commit_checkpoint(ckpt_dir, 1, host, raw))
            outcome = saver.wait()
            if outcome.error is not None:
                raise outcome.error
            row[f"{where}_{attempt}"] = {"stall": stall, **outcome.timings,
                                         "total": time.perf_counter() - start}
            if "check" in parts and attempt == "again":  # the copy aside holds the state's bits
                loaded, _ = checkpoint.load_checkpoint(outcome.path)
                row[f"{where}_{attempt}"]["bitwise"] = all(torch.equal(loaded[k], tensors[k].cpu())
                                                           for k in tensors)
            outcome.path.unlink()
            print(f"  {where} {attempt} {row[f'{where}_{attempt}']}", flush=True)
        del saver
    if "preempt" in parts:  # Run.save of a must-commit save: copy aside, then wait for the write
        saver = Saver("auto", background=True)
        start = time.perf_counter()
        saver.prepare(tensors, wait=True)  # as the trainer does after its first step
        pinned = time.perf_counter() - start
        start = time.perf_counter()
        saver.start(1, tensors, lambda host: checkpoint.commit_checkpoint(ckpt_dir, 1, host, raw))
        outcome = saver.wait()
        row["preempt"] = {"total": time.perf_counter() - start, "where": saver.where, **outcome.timings,
                          "pin_buffers_before": pinned}
        outcome.path.unlink()
        print(f"  preempt {row['preempt']}", flush=True)
        del saver
    del state, tensors
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return row


def trainer_rows(folder: Path, every: int, steps: int, modes: list[str]) -> dict:
    """Short runs of the real trainer, saving every `every` steps in the background and/or inline."""
    sys.path.insert(0, str(REPO / "scripts"))
    from bench import make_bundle

    bundle = make_bundle(folder / "bundle")
    rows = {}
    for mode in modes:
        out = folder / f"run_async_{mode}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "scripts/train.py", "--preset=sd15_256", f"--model.pretrained={bundle}",
               "--data.source=shapes", "--data.shapes_num_samples=4096", "--data.buckets=off",
               "--data.batch_per_gpu=32", "--data.num_workers=6", "--train.compile=off",
               f"--train.out_dir={out}", f"--train.max_steps={steps}", "--log.every=1",
               "--log.progress=lines", "--sample.every=0", f"--ckpt.every={every}", "--ckpt.keep=1",
               f"--ckpt.async_save={mode}"]
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
        if done.returncode:
            rows[mode] = {"error": done.stdout[-2000:] + done.stderr[-2000:]}
            continue
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        step_s = {r["step"]: 32 / r["img_per_s"] for r in records if "img_per_s" in r}
        steady = sorted(s for k, s in step_s.items() if k > 3 and k % every != 1)
        after = [step_s[k] for k in range(every + 1, steps, every)]
        median = steady[len(steady) // 2]
        rows[mode] = {"median_step_s": median, "steps_after_a_save_s": after,
                      "stall_per_save_s": [a - median for a in after],
                      "saves": [{k: r[k] for k in r if k.startswith("ckpt_")}
                                for r in records if "ckpt_step" in r],
                      "step_s": step_s, "wall_s": time.perf_counter() - start}
        print(f"trainer async_save={mode}: {rows[mode]}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", nargs="*", default=["sd15", "sdxl"],
                        help="sd15 | sdxl | a UNet JSON config")
    parser.add_argument("--parts", nargs="+", default=["serial", "parallel", "device", "host", "preempt"],
                        choices=["serial", "parallel", "device", "host", "preempt", "check"])
    parser.add_argument("--sdxl-parts", nargs="+", default=["parallel", "preempt"],
                        help="the parts for the SDXL state (41 GB: one file at a time fits a 64 GiB disk)")
    parser.add_argument("--dir", default="bench_save", help="where the files are written (and deleted)")
    parser.add_argument("--trainer", action="store_true")
    parser.add_argument("--trainer-every", type=int, default=60, help="steps between the trainer's saves")
    parser.add_argument("--trainer-steps", type=int, default=125)
    parser.add_argument("--trainer-modes", nargs="+", default=["true", "false"],
                        help="ckpt.async_save values")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    figures = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "cpus": os.cpu_count(), "torch": torch.__version__, "disk": disk_rate(folder)}
    print(f"disk {figures['disk']}", flush=True)

    def dump() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1))

    for name in args.unet:
        parts = args.sdxl_parts if name == "sdxl" else args.parts
        figures[name] = bench_unet(name, folder, device, parts)
        dump()
    if args.trainer:
        figures["trainer"] = trainer_rows(folder, args.trainer_every, args.trainer_steps, args.trainer_modes)
        dump()
    shutil.rmtree(folder / "ckpt", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
