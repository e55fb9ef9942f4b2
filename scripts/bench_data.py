"""Benchmark the real data path: decoded-and-transformed samples per second on photo-like JPEGs.

    python scripts/bench_data.py [--make 256] [--dir DIR] [--resolution 256 512] [--workers 1 2]
        [--seconds 10] [--batch 32] [--gpu-img-per-s 256=600 512=140] [--json]

Makes --make JPEGs of 1.1-2.1 MP (quality 90, gradients + shapes + grain, so they compress like
photos) with metadata.jsonl captions in --dir, reusing those already there. Per resolution it times:
  per-core   one process, no DataLoader: ImageFolderSource[i] + ImageTransform(random crop, flip)
  no draft   the same with JPEG draft mode off (the image is loaded at full size first)
  loader     ShardedStream + make_loader with each --workers count, --batch samples a batch
and estimates the cores one GPU needs: its img/s over the per-core rate.
"""
import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import _path  # noqa: F401
import numpy as np
import PIL
import PIL.features
import torch
from PIL import Image, ImageDraw, ImageFilter

from ldm_ddp.data.folder import ImageFolderSource
from ldm_ddp.data.stream import ShardedStream, make_loader
from ldm_ddp.data.transforms import ImageTransform

SIZES = [(1280, 960), (1440, 1080), (1600, 1200), (960, 1280), (1200, 1600), (1536, 1024)]
PREFETCH = 2


def photo_like(seed: int) -> Image.Image:
    """A deterministic 1.1-2.1 MP RGB image with photo statistics: smooth regions, edges, grain."""
    rng = np.random.default_rng(seed)
    w, h = SIZES[seed % len(SIZES)]
    w, h = w + int(rng.integers(-64, 65)), h + int(rng.integers(-48, 49))
    # Low-frequency colour field: a tiny random image upscaled bicubically gives smooth gradients.
    field = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(int(rng.integers(8, 20))):  # objects: sharp edges are what cost JPEG bits
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(40, w // 2)), y0 + int(rng.integers(40, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        [draw.ellipse, draw.rectangle][int(rng.integers(2))]((x0, y0, x1, y1), fill=colour)
    field = field.filter(ImageFilter.GaussianBlur(1.0))  # lens softness: no aliased 1-px edges
    # Grain at half resolution, upscaled: texture that compresses like sensor noise, not white noise.
    grain = rng.normal(0.0, 12.0, (h // 2, w // 2, 3)).astype(np.float32)
    grain = np.asarray(Image.fromarray(grain.mean(2)).resize((w, h), Image.BILINEAR))[..., None]
    pixels = np.asarray(field, dtype=np.float32) + grain
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_images(root: Path, count: int) -> dict:
    """Write bench_XXXXX.jpg 0..count-1 (skipping existing ones) and metadata.jsonl; -> image stats."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = root / f"bench_{i:05d}.jpg"
        if not path.is_file():
            photo_like(i).save(path, quality=90)
    files = sorted(root.glob("bench_*.jpg"))  # a larger earlier set is reused whole: the source indexes all
    rows = [json.dumps({"file_name": f.name, "text": f"a photo of shapes, number {f.stem[6:]}"}) for f in files]
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    megapixels = []
    for f in files:
        with Image.open(f) as image:
            megapixels.append(image.width * image.height / 1e6)
    return {"dir": str(root), "count": len(files), "min_mp": round(min(megapixels), 3),
            "mean_mp": round(float(np.mean(megapixels)), 3),
            "mean_kb": round(float(np.mean([f.stat().st_size for f in files])) / 1024, 1)}


class NoDraftTransform(ImageTransform):
    """ImageTransform that decodes at full size: draft() is a no-op on an already loaded image."""

    def decode(self, image):
        image.load()
        return super().decode(image)


def tokenize(captions: list[str]) -> torch.Tensor:
    """Stand-in for the CLIP tokenizer (no model files needed): bytes padded to 77 ids."""
    ids = torch.zeros(len(captions), 77, dtype=torch.long)
    for row, text in enumerate(captions):
        data = list(text.encode()[:77])
        ids[row, :len(data)] = torch.tensor(data)
    return ids


def time_per_core(source, transform: ImageTransform, seconds: float) -> tuple[int, float]:
    """Samples decoded in one process until `seconds` pass (after warming the page cache) -> (n, s)."""
    def one(i):
        rng = np.random.default_rng(i)
        transform(source[i % len(source)]["image"], rng)

    for i in range(min(len(source), 8)):
        one(i)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        one(n)
        n += 1
    return n, time.perf_counter() - start


def time_loader(source, resolution: int, workers: int, batch: int, seconds: float) -> tuple[int, float]:
    """Samples out of the DataLoader until `seconds` pass -> (n, s).

    Warm-up drains the batches prefetched while workers started, so every timed batch was built
    inside the window and the rate is the workers' steady state, not a burst from the queue.
    """
    transform = ImageTransform(resolution, crop="random", random_flip=True)
    stream = ShardedStream(source, tokenize, resolution, batch, 1, 0, 1, seed=0, transform=transform)
    batches = iter(make_loader(stream, workers, PREFETCH, pin_memory=False))
    for _ in range(workers * (PREFETCH + 1)):
        next(batches)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += len(next(batches)["images"])
    elapsed = time.perf_counter() - start
    del batches  # shuts the workers down before the next cell starts its own
    return n, elapsed


def machine() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown")
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "pillow": PIL.__version__, "libjpeg_turbo": bool(PIL.features.check_feature("libjpeg_turbo")),
            "pillow_simd": "post" in PIL.__version__}  # Pillow-SIMD versions read like 9.5.0.post1


def cell(resolution, path, workers, n, elapsed) -> dict:
    rate = n / elapsed
    return {"resolution": resolution, "path": path, "workers": workers, "samples": n,
            "seconds": round(elapsed, 2), "samples_per_s": round(rate, 1),
            "per_core": round(rate / max(workers, 1), 1)}


def table(result: dict) -> str:
    m, img = result["machine"], result["images"]
    lines = [f"CPU: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, Pillow {m['pillow']} "
             f"(libjpeg-turbo: {m['libjpeg_turbo']}, Pillow-SIMD: {m['pillow_simd']})",
             f"Images: {img['count']} JPEGs, {img['min_mp']}-{img['mean_mp']} MP (min-mean), "
             f"{img['mean_kb']} KB mean, in {img['dir']}", "",
             "| resolution | path | workers | samples/s | per core |", "|---|---|---|---|---|"]
    names = {"per_core": "per-core (no DataLoader)", "per_core_no_draft": "per-core, draft off",
             "loader": "ShardedStream + DataLoader"}
    for c in result["cells"]:
        lines.append(f"| {c['resolution']} | {names[c['path']]} | {c['workers'] or '-'} | "
                     f"{c['samples_per_s']} | {c['per_core']} |")
    lines.append("")
    for res, est in result["cores_per_gpu"].items():
        lines.append(f"{res} px: a GPU at {est['gpu_img_per_s']} img/s needs ~{est['cores']} decode cores "
                     f"(at {est['per_core_rate']} samples/s per core)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make", type=int, default=256, help="JPEGs to have in --dir")
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "ldm_ddp_bench_data"))
    parser.add_argument("--resolution", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per cell, after warm-up")
    parser.add_argument("--gpu-img-per-s", nargs="*", default=["256=600", "512=140"], metavar="RES=RATE")
    parser.add_argument("--no-draft-cell", dest="draft_cell", action="store_false",
                        help="skip the draft-off per-core cell")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args()
    gpu_rates = {int(k): float(v) for k, v in (item.split("=") for item in args.gpu_img_per_s)}

    # One thread: the per-core cells measure one core, as a DataLoader worker (torch sets 1 there) has.
    torch.set_num_threads(1)
    images = make_images(Path(args.dir), args.make)
    source = ImageFolderSource(args.dir)
    cells, cores_per_gpu = [], {}
    for res in args.resolution:
        transform = ImageTransform(res, crop="random", random_flip=True)
        cells.append(cell(res, "per_core", 0, *time_per_core(source, transform, args.seconds)))
        per_core = cells[-1]["samples_per_s"]
        if args.draft_cell:
            no_draft = NoDraftTransform(res, crop="random", random_flip=True)
            cells.append(cell(res, "per_core_no_draft", 0, *time_per_core(source, no_draft, args.seconds)))
        for workers in args.workers:
            cells.append(cell(res, "loader", workers, *time_loader(source, res, workers, args.batch, args.seconds)))
        if res in gpu_rates:
            cores_per_gpu[res] = {"gpu_img_per_s": gpu_rates[res], "per_core_rate": per_core,
                                  "cores": round(gpu_rates[res] / per_core, 1)}
    result = {"machine": machine(), "images": images, "batch": args.batch, "cells": cells,
              "cores_per_gpu": cores_per_gpu}
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
