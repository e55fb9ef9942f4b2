"""Benchmark the real data path: decoded-and-transformed samples per second on photo-like JPEGs.

    python scripts/bench_data.py [--make 256] [--dir DIR] [--resolution 256 512] [--workers 1 2]
        [--seconds 10] [--batch 32] [--gpu-img-per-s 256=600 512=140] [--json]

Makes --make JPEGs per image set in --dir (reusing those already there), with metadata.jsonl captions:
  1mp          1.0-1.35 MP photos (quality 90, gradients + shapes + grain, so they compress like photos)
  2mp          2.0-2.3 MP photos, the same kind
  pre-resized  the 1mp photos with the shorter side resized to R (Lanczos, quality 95): what
               `make_shards.py --resize R` writes, the fast path at scale
Per resolution R it times:
  per core     ShardedStream micro-batches (ImageFolderSource, ImageTransform with random crop and flip,
               --batch samples) built in one process, no DataLoader, per second of its CPU time; on each
               set, and on 1mp with JPEG draft mode off (the image loaded at full size first)
  loader       ShardedStream + make_loader with each --workers count, wall clock (1mp, pre-resized)
Each cell also says how many cores the whole machine kept busy meanwhile: on a shared machine, more
than the cell's own (about 1, or workers + a little) means other load slowed its wall-clock figure.
It checks quality (PSNR of the transform's centre crops against a float32 Lanczos resize of the
full-size original) and estimates the worker cores one GPU needs: its img/s over the per-core rate.
"""
import argparse
import io
import json
import math
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
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

# (width, height) before a jitter of +0..48 x +0..36 px; 1.0-1.35 MP and 2.0-2.3 MP,
# landscape, portrait, square.
SIZES = {"1mp": [(1216, 880), (1280, 960), (880, 1216), (1248, 832), (1104, 1104), (960, 1280)],
         "2mp": [(1632, 1224), (1728, 1152), (1224, 1632), (1440, 1440)]}
PRE_RESIZED_QUALITY = 95  # make_shards.py's default for the images it resizes
PREFETCH = 2


def photo_like(seed: int, sizes: list[tuple[int, int]]) -> Image.Image:
    """A deterministic RGB image of about one of `sizes`, with photo statistics:
    smooth regions, edges, grain."""
    rng = np.random.default_rng(seed)
    w, h = sizes[seed % len(sizes)]
    w, h = w + int(rng.integers(0, 49)), h + int(rng.integers(0, 37))
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


def pre_resized(path: Path, resolution: int) -> bytes:
    """The JPEG at `path` with its shorter side resized to `resolution`,
    as make_shards.py --resize writes it."""
    with Image.open(path) as image:
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        out = io.BytesIO()
        image.convert("RGB").resize(size, Image.LANCZOS).save(out, "JPEG", quality=PRE_RESIZED_QUALITY)
    return out.getvalue()


def write_image(path: Path, index: int, kind: str, resolution: int) -> None:
    if kind == "pre-resized":
        path.write_bytes(pre_resized(path.parent.parent / "1mp" / path.name, resolution))
    else:
        photo_like(index, SIZES[kind]).save(path, quality=90)


def make_images(root: Path, count: int, kind: str, resolution: int = 0) -> dict:
    """Write bench_XXXXX.jpg 0..count-1 of one set (skipping existing ones) and metadata.jsonl;
    -> image stats."""
    root.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(count) if not (root / f"bench_{i:05d}.jpg").is_file()]
    with ProcessPoolExecutor(min(len(missing), os.cpu_count() or 1) or 1) as pool:  # seconds, not minutes
        list(pool.map(write_image, [root / f"bench_{i:05d}.jpg" for i in missing], missing,
                      [kind] * len(missing), [resolution] * len(missing)))
    files = sorted(root.glob("bench_*.jpg"))  # a larger earlier set is reused whole: the source indexes all
    rows = [json.dumps({"file_name": f.name, "text": f"a photo of shapes, number {f.stem[6:]}"})
            for f in files]
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    megapixels = []
    for f in files:
        with Image.open(f) as image:
            megapixels.append(image.width * image.height / 1e6)
    return {"set": kind if kind != "pre-resized" else f"pre-resized {resolution}", "dir": str(root),
            "count": len(files), "min_mp": round(min(megapixels), 3), "max_mp": round(max(megapixels), 3),
            "mean_mp": round(float(np.mean(megapixels)), 3),
            "mean_kb": round(float(np.mean([f.stat().st_size for f in files])) / 1024, 1)}


class NoDraftTransform(ImageTransform):
    """ImageTransform that decodes at full size: draft() is a no-op on an already loaded image."""

    def decode(self, image, size=None):
        image.load()
        return super().decode(image, size)


def psnr_vs_reference(files: list[Path], originals: list[Path], resolution: int) -> float:
    """Mean PSNR (dB) of ImageTransform's centre crops of `files` against a float32 Lanczos resize of the same
    square of the full-size `originals`: what draft decoding, the resize filter, uint8 rounding (and for
    pre-resized files, their resize and re-encoding) lose."""
    transform, values = ImageTransform(resolution), []
    for f, original in zip(files, originals):
        out = transform(Image.open(f)).permute(1, 2, 0).numpy().astype(np.float64)
        drafted = transform.decode(Image.open(f))  # the transform's own geometry: its square,
        # in decoded pixels
        side = min(drafted.size)
        left, top = (drafted.width - side) // 2, (drafted.height - side) // 2
        with Image.open(original) as full:
            full = full.convert("RGB")
        sx, sy = full.width / drafted.width, full.height / drafted.height
        box = (left * sx, top * sy, (left + side) * sx, (top + side) * sy)
        bands = [Image.fromarray(np.asarray(b, np.float32), "F")
                 .resize((resolution, resolution), Image.LANCZOS, box=box)
                 for b in full.split()]
        reference = np.clip(np.stack([np.asarray(b) for b in bands], axis=-1), 0, 255)
        values.append(10 * math.log10(255 ** 2 / np.mean((out - reference) ** 2)))
    return round(float(np.mean(values)), 1)


def tokenize(captions: list[str]) -> torch.Tensor:
    """Stand-in for the CLIP tokenizer (no model files needed): bytes padded to 77 ids."""
    ids = torch.zeros(len(captions), 77, dtype=torch.long)
    for row, text in enumerate(captions):
        data = list(text.encode()[:77])
        ids[row, :len(data)] = torch.tensor(data)
    return ids


def time_per_core(source, transform: ImageTransform, batch: int, seconds: float) -> tuple[int, float]:
    """ShardedStream micro-batches built in this process until `seconds` of its CPU time pass -> (n, CPU s).

    All that a DataLoader worker does (read, decode, transform, stack, tokenize) but the hand-off to the
    main process, on this process's CPU clock: other load on a shared machine does not lower the figure.
    """
    stream = ShardedStream(source, tokenize, transform.resolution, batch, 1, 0, 1, seed=0,
                           transform=transform)
    stream.micro_batch(0)  # warms the page cache
    n, k, start = 0, 1, time.process_time()
    while time.process_time() - start < seconds:
        n += len(stream.micro_batch(k)["images"])
        k += 1
    return n, time.process_time() - start


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


def machine_busy() -> tuple[int, int]:
    """(busy, all) CPU ticks of the whole machine so far, from /proc/stat; (0, 0) where there is none."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0, 0
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # idle and iowait are not busy; steal is


def cell(resolution, images, path, workers, timer) -> dict:
    """Run timer() -> (samples, seconds) and describe it, with how many cores the whole machine kept busy
    meanwhile (this cell's own: about 1 per-core, workers + a little for a loader; more means other load)."""
    busy, total = machine_busy()
    n, elapsed = timer()
    busy, total = (now - then for now, then in zip(machine_busy(), (busy, total)))
    rate = n / elapsed
    return {"resolution": resolution, "images": images, "path": path, "workers": workers, "samples": n,
            "seconds": round(elapsed, 2), "samples_per_s": round(rate, 1),
            "per_core": round(rate / max(workers, 1), 1),
            "busy_cores": round(busy / total * (os.cpu_count() or 1), 1) if total else None}


def table(result: dict) -> str:
    m = result["machine"]
    lines = [(f"CPU: {m['cpu']}, {m['cores']} cores; torch {m['torch']}, Pillow {m['pillow']} "
              f"(libjpeg-turbo: {m['libjpeg_turbo']}, Pillow-SIMD: {m['pillow_simd']})")]
    lines += [f"Images {s['set']}: {s['count']} JPEGs, {s['min_mp']}-{s['max_mp']} MP (mean {s['mean_mp']}), "
              f"{s['mean_kb']} KB mean, in {s['dir']}" for s in result["images"]]
    lines += ["", "| resolution | images | path | workers | samples/s | per core | machine busy (cores) |",
              "|---|---|---|---|---|---|---|"]
    names = {"per_core": "per core (stream, one process, CPU time)",
             "per_core_no_draft": "per core, draft off", "loader": "ShardedStream + DataLoader"}
    for c in result["cells"]:
        lines.append(f"| {c['resolution']} | {c['images']} | {names[c['path']]} | {c['workers'] or '-'} | "
                     f"{c['samples_per_s']} | {c['per_core']} | {c['busy_cores']} |")
    lines.append("")
    for res, psnr in result["psnr_db"].items():
        lines.append(f"{res} px quality: PSNR of centre crops vs a float32 Lanczos resize of the full-size "
                     "original: " + ", ".join(f"{name} {value} dB" for name, value in psnr.items()))
    for res, est in result["cores_per_gpu"].items():
        lines.append(f"{res} px: a GPU at {est['gpu_img_per_s']} img/s needs "
                     + ", ".join(f"~{cores} worker cores from {name} JPEGs"
                                 for name, cores in est["by_images"].items())
                     + " (at the per-core rates), plus the training process's own")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make", type=int, default=256, help="JPEGs to have in each image set")
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
    root = Path(args.dir)
    images = [make_images(root / kind, args.make, kind) for kind in SIZES]
    cells, psnr_db, cores_per_gpu = [], {}, {}
    for res in args.resolution:
        images.append(make_images(root / f"pre{res}", args.make, "pre-resized", res))
        sets = {"1mp": root / "1mp", "2mp": root / "2mp", "pre-resized": root / f"pre{res}"}
        sources = {name: ImageFolderSource(str(path)) for name, path in sets.items()}
        originals = {"1mp": "1mp", "2mp": "2mp", "pre-resized": "1mp"}
        psnr_db[res] = {name: psnr_vs_reference(sorted(path.glob("bench_*.jpg"))[:8],
                                                sorted((root / originals[name]).glob("bench_*.jpg"))[:8], res)
                        for name, path in sets.items()}
        transform = ImageTransform(res, crop="random", random_flip=True)
        per_core = {}
        for name, source in sources.items():
            cells.append(cell(res, name, "per_core", 0, partial(time_per_core, source, transform, args.batch,
                                                                args.seconds)))
            per_core[name] = cells[-1]["per_core"]
        if args.draft_cell:
            no_draft = NoDraftTransform(res, crop="random", random_flip=True)
            cells.append(cell(res, "1mp", "per_core_no_draft", 0,
                              partial(time_per_core, sources["1mp"], no_draft, args.batch, args.seconds)))
        for name in ("1mp", "pre-resized"):
            for workers in args.workers:
                cells.append(cell(res, name, "loader", workers,
                                  partial(time_loader, sources[name], res, workers, args.batch,
                                          args.seconds)))
        if res in gpu_rates:
            cores_per_gpu[res] = {"gpu_img_per_s": gpu_rates[res], "by_images": {
                name: round(gpu_rates[res] / per_core[name], 1) for name in ("1mp", "pre-resized")}}
    result = {"machine": machine(), "images": images, "batch": args.batch, "cells": cells,
              "psnr_db": psnr_db, "cores_per_gpu": cores_per_gpu}
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
