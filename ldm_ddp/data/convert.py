"""Turn any random-access source into an indexed shard set (shards.py): `scripts/make_shards.py`.

The source's samples are taken in a seeded permutation (or in source order), cut into shards of
`shard_size` candidates, and each shard is prepared by one worker process: read the raw record, check
the caption, read the image header (minimum size filter), optionally decode it fully (verify) and
shrink it, keeping its aspect, to a shorter side of `resize` px or an area of `resize_area`² px
(re-encoded as JPEG). Each image's upright size goes into its shard's index (aspect-ratio buckets read
it there instead of every image's header). A sample that fails any check is left
out and listed, by key and reason, in skipped.jsonl; the rules are deterministic, so the same input and
options give the same shards, whatever the number of workers. index.json is written last, and an
earlier one in the folder is removed first; when every sample is left out there is no index at all
(`NothingToWrite`), so an empty or half-written set never looks valid.
"""
from __future__ import annotations

import collections
import io
import json
import math
import multiprocessing
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image, ImageOps

from .samples import caption_list, open_image, upright_size
from .shards import INDEX, write_index, write_shard
from .transforms import DECODE_BUDGET_BYTES, check_decode_budget, pixel_limit, to_rgb

# Stored as they are; others become PNG. MPO is a camera's multi-picture JPEG: a JPEG to every reader.
KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
_job: dict = {}  # the source and options: set here, and in each worker process by _start_job


class NothingToWrite(ValueError):
    """Every sample of the source was left out: no shard set is written."""


def prepare(raw: dict, resize: int, min_size: int, verify: bool, quality: int,
            max_decode_bytes: int = DECODE_BUDGET_BYTES, resize_area: int = 0) -> dict:
    """One raw record -> {"key", "image": bytes, "ext", "captions", "size": upright (width, height)};
    raises ValueError naming what is wrong. `resize` shrinks the shorter side to it, `resize_area` the pixel
    count to resize_area² (for aspect-ratio buckets of that area); both keep the aspect, neither enlarges."""
    captions = caption_list(raw["captions"])
    data = raw["image"]["bytes"] if isinstance(raw["image"], dict) else raw["image"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = open_image(data)
        if min(image.size) < min_size:
            raise ValueError(f"smaller than --min-size: {image.size[0]}x{image.size[1]} px < {min_size}")
        w, h = image.size
        scale = min(1.0, resize / min(w, h) if resize else 1.0,
                    resize_area / math.sqrt(w * h) if resize_area else 1.0)
        shrink = scale < 1
        if not (verify or shrink or image.format not in KEPT_FORMATS):
            return {"key": raw["key"], "image": data, "ext": KEPT_FORMATS[image.format], "captions": captions,
                    "size": upright_size(image)}
        if shrink and image.format in ("JPEG", "MPO"):  # decode at the smallest DCT scale that stays >= it
            image.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
        check_decode_budget(image, max_decode_bytes)  # from the header (at the draft size), before decoding
        image.load()  # a truncated or corrupt file raises here
    if not shrink and image.format in KEPT_FORMATS:
        return {"key": raw["key"], "image": data, "ext": KEPT_FORMATS[image.format], "captions": captions,
                "size": upright_size(image)}
    image = to_rgb(ImageOps.exif_transpose(image))
    out = io.BytesIO()
    if shrink:
        size = upright_target(image.size, (w, h), scale)
        image.resize(size, Image.LANCZOS, reducing_gap=3.0).save(out, format="JPEG", quality=quality)
        return {"key": raw["key"], "image": out.getvalue(), "ext": "jpg", "captions": captions, "size": size}
    image.save(out, format="PNG")  # BMP, TIFF, GIF ...: lossless into a format every reader knows
    return {"key": raw["key"], "image": out.getvalue(), "ext": "png", "captions": captions,
            "size": image.size}


def upright_target(decoded: tuple[int, int], stored: tuple[int, int], scale: float) -> tuple[int, int]:
    """The resized (width, height) of an image stored as `stored`, now decoded upright as `decoded` (maybe
    turned by its EXIF orientation, maybe reduced by JPEG draft decoding): the stored size times `scale`."""
    w, h = stored
    turned = (decoded[0] > decoded[1]) != (w > h)
    w, h = (h, w) if turned else (w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def nothing_written(n: int, skipped: list[list[str]], listing: str) -> str:
    """Why no sample is left: the commonest reason (its type and first words) and where each is named."""
    if not n:
        return "the source has no samples"
    reasons = collections.Counter(":".join(reason.split(":")[:2]) for _, reason in skipped)
    reason, count = reasons.most_common(1)[0]
    return f"all {n} inputs were left out, {count} of them for {reason!r}; each is named in {listing}"


def _start_job(job: dict) -> None:
    _job.update(job)


def _make_shard(number: int) -> tuple[dict | None, list[list[str]]]:
    """Worker: shard `number` of the job -> (its index entry or None if nothing survived, [[key, reason]])."""
    source, opts = _job["source"], _job["opts"]
    indices = _job["order"][number * opts["shard_size"]:(number + 1) * opts["shard_size"]]
    records, skipped = [], []
    for i in indices:
        i = int(i)
        try:
            with pixel_limit(opts["max_image_pixels"]):
                records.append(prepare(source.raw(i), opts["resize"], opts["min_size"], opts["verify"],
                                       opts["quality"], opts["max_decode_bytes"], opts["resize_area"]))
        except Exception as err:  # any failure leaves the sample out, named; the conversion goes on
            skipped.append([source.key(i), f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"])
    entry = write_shard(_job["out_dir"], number, records, number * opts["shard_size"]) if records else None
    return entry, skipped


def make_shards(source, out_dir: str, shard_size: int = 2000, workers: int = 1, resize: int = 0,
                min_size: int = 0, verify: bool = True, quality: int = 95, shuffle_seed: int | None = 0,
                max_image_pixels: int = 178_956_970, max_decode_bytes: int = DECODE_BUDGET_BYTES,
                log=print, resize_area: int = 0) -> dict:
    """Write `source` as a shard set in `out_dir` (local); -> the index (also in out_dir/index.json).

    Raises NothingToWrite (after writing skipped.jsonl) when every sample is left out."""
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, INDEX)):  # an earlier set: incomplete once shards are rewritten
        os.remove(os.path.join(out_dir, INDEX))
    n = len(source)
    order = (np.arange(n) if shuffle_seed is None
             else np.random.Generator(np.random.PCG64([shuffle_seed, 4])).permutation(n))
    opts = {"shard_size": shard_size, "resize": resize, "resize_area": resize_area, "min_size": min_size,
            "verify": verify,
            "quality": quality, "max_image_pixels": max_image_pixels, "max_decode_bytes": max_decode_bytes}
    _job.update(source=source, opts=opts, order=order, out_dir=out_dir)
    numbers = range((n + shard_size - 1) // shard_size)
    start, entries, skipped = time.perf_counter(), [], []
    if workers > 1:
        # forkserver, not fork: a child forked from a process with threads (torch's, a tokenizer's) can
        # inherit a lock held by one of them and wait on it forever. The executor, unlike
        # multiprocessing.Pool, raises BrokenProcessPool when a worker dies instead of waiting for its result.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"),
                                 initializer=_start_job, initargs=(dict(_job),)) as pool:
            results = pool.map(_make_shard, numbers)  # in shard order, whatever finishes first
            for number, (entry, failed) in zip(numbers, results):
                entries.append(entry)
                skipped += failed
                log(f"shard {number + 1}/{len(numbers)}: {entry['count'] if entry else 0} samples")
    else:
        for number in numbers:
            entry, failed = _make_shard(number)
            entries.append(entry)
            skipped += failed
            log(f"shard {number + 1}/{len(numbers)}: {entry['count'] if entry else 0} samples")
    _job.clear()
    with open(os.path.join(out_dir, "skipped.jsonl"), "w") as f:
        f.writelines(json.dumps({"key": key, "reason": reason}) + "\n" for key, reason in skipped)
    if not any(entries):
        raise NothingToWrite(nothing_written(n, skipped, os.path.join(out_dir, "skipped.jsonl")))
    made_with = {"made_with": {**opts, "shuffle_seed": shuffle_seed,
                               "source_fingerprint": source.fingerprint(), "input_samples": n,
                               "skipped": len(skipped)}}
    index = write_index(out_dir, [e for e in entries if e], made_with)
    log(f"{index['num_samples']} samples in {len(index['shards'])} shards, {len(skipped)} left out "
        f"(skipped.jsonl), {time.perf_counter() - start:.1f} s")
    return index
