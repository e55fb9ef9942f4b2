"""GPU cost of a Diffusion-DPO step against a diffusion step: the SD1.5 UNet (random weights, random
latents and contexts), bf16 autocast, eager, fused AdamW, the objectives called as the trainer calls them.

    python scripts/bench_dpo.py [--res 512] [--images 16] [--steps 10] [--warmup 3] [--json OUT]
        [--trainer off full] [--pairs 256] [--work DIR] [--set KEY=VALUE ...]

A DPO step on N images is N/2 pairs: the trained model's forward and backward on all N, and the frozen
reference's forward on all N.

--trainer: the trainer itself under torchrun on a Pick-a-Pic Parquet set (`data.source = pickapic`: --pairs
rows of two JPEGs, a 0/1 label and a caption, made here), tuned from a checkpoint of the preset's UNet (one
step of training, random init, the random-init SD1.5-shaped bundle of bench.py), for each train.compile
given: img/s, pairs/s and the peak of its steady log intervals, with its start and compile time; the run is
killed once 30 steps are logged. --preset and --set (trainer settings, last) for other models: SDXL with
--preset sdxl_1024 --res 1024 --set model.pretrained=DIR (e.g. the folder scripts/bench_sdxl.py writes).
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import _path  # noqa: F401
import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--res", type=int, default=512, help="px (latents of res / 8)")
    parser.add_argument("--images", type=int, default=16, help="images per step (DPO: half as many pairs)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--trainer", nargs="*", default=[], choices=["off", "full", "regional"],
                        help="the trainer on Pick-a-Pic Parquet with each of these train.compile modes")
    parser.add_argument("--pairs", type=int, default=256, help="--trainer: rows of the Parquet set")
    parser.add_argument("--preset", default="sd15_512", help="--trainer: the run's preset")
    parser.add_argument("--work", default="/tmp/ldm_ddp_bench_dpo")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="--trainer: more settings")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: bench_dpo.py measures a GPU; none is visible", file=sys.stderr)
        return 1
    if args.trainer:
        figures = trainer(args)
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1))
        return 0
    from ldm_ddp.config import ModelConfig
    from ldm_ddp.models import build_unet
    from ldm_ddp.objectives import DiffusionDPOLoss, VPredictionLoss
    from ldm_ddp.schedule import NoiseSchedule

    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    unet = build_unet(ModelConfig(unet="sd15"), args.res // 8, 768, device)  # channels-last on CUDA
    schedule = NoiseSchedule(1000, "scaled_linear", 0.00085, 0.012, True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-8, fused=True)
    figures = {}
    for name, pairs in (("diffusion", 0), ("dpo", args.images // 2)):
        objective = (DiffusionDPOLoss(schedule, unet, 2500.0, True, {}) if pairs
                     else VPredictionLoss(schedule))
        latents = torch.randn(args.images, 4, args.res // 8, args.res // 8, device=device)
        context = torch.randn(pairs or args.images, 77, 768, device=device)
        torch.cuda.reset_peak_memory_stats()
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                torch.cuda.synchronize()
                start = time.perf_counter()
            loss = objective(unet, latents, {"encoder_hidden_states": context},
                             torch.Generator(device).manual_seed(i), True)
            loss.weighted.mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.steps
        figures[name] = {"s_per_step": round(seconds, 4), "img_per_s": round(args.images / seconds, 1),
                         "pairs_per_s": round(pairs / seconds, 1) if pairs else None,
                         "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
        print(name, figures[name], flush=True)
        del objective
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "args": vars(args), **figures}, f, indent=1)
    return 0


def pickapic_set(root: Path, pairs: int, res: int) -> Path:
    """`pairs` Pick-a-Pic rows (jpg_0, jpg_1, label_0 of 0 or 1, caption) of photo-like JPEGs, shorter side
    `res` (square), in one Parquet file of row groups of 64."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from bench import make_images

    if (root / "part.parquet").is_file():
        return root
    images = make_images(root / "jpg", 2 * pairs, res, square=True)  # one bucket: one compiled shape
    data = [(images / f"{i:05d}.jpg").read_bytes() for i in range(2 * pairs)]
    table = pa.table({"caption": [f"a large red circle in the center {i % 7}" for i in range(pairs)],
                      "jpg_0": data[0::2], "jpg_1": data[1::2],
                      "label_0": [float(i % 2) for i in range(pairs)]})
    pq.write_table(table, root / "part.parquet", row_group_size=64)
    return root


def trainer(args) -> dict:
    """--trainer: a start checkpoint, then a DPO run per compile mode (figures of its steady intervals)."""
    from bench import make_bundle, torchrun
    from bench_sdxl import attempt, interval_figures

    work = Path(args.work)
    common = [f"--preset={args.preset}", f"--model.pretrained={make_bundle(work / 'bundle')}",
              "--log.progress=lines", "--sample.every=0", f"--data.batch_per_gpu={args.images // 2}",
              *(f"--{x}" for x in args.set)]
    start = work / "start" / "checkpoints" / "step_0000001.safetensors"
    if not start.is_file():  # the model to tune: one step from random init, saved
        torchrun(1, "scripts/train.py", [*common, f"--train.out_dir={start.parents[1]}",
                                         "--data.source=shapes", "--train.max_steps=1", "--train.compile=off",
                                         "--ckpt.resume=none"],
                 1800, work / "logs" / "start.log")
    data = pickapic_set(work / "pickapic", args.pairs, args.res)
    figures = {"pairs_per_step": args.images // 2}
    for mode in args.trainer:
        out = work / f"dpo_{mode}"
        shutil.rmtree(out, ignore_errors=True)
        began = time.perf_counter()
        records, _ = attempt([*common, "--train.objective=dpo", f"--model.unet_init={start}",
                              "--data.source=pickapic", f"--data.path={data}", f"--train.out_dir={out}",
                              "--train.max_steps=1000000", f"--train.compile={mode}", "--log.every=5",
                              "--ckpt.every=1000000", "--ckpt.resume=none"], out,
                             work / "logs" / f"dpo_{mode}.log", 30)
        steady = interval_figures(records, 0, 30)
        steady["pairs_per_s"] = steady["img_per_s"] and steady["img_per_s"] / 2
        figures[mode] = {**steady, "wall_s": time.perf_counter() - began,
                         "reward_accuracy": [r.get("dpo_reward_accuracy") for r in records]}
        print(mode, json.dumps(figures[mode]), flush=True)
    return figures


if __name__ == "__main__":
    sys.exit(main())
