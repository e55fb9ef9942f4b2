"""Aspect-ratio buckets: the table, each image's bucket, the crop, and the bucketed global order."""

import json
import math

import numpy as np
import pytest
import torch

from ldm_ddp.data.buckets import BucketedOrder, check_buckets, cover_crop, make_buckets, nearest_bucket
from ldm_ddp.data.stream import GlobalOrder


def test_the_table_of_512_px_buckets():
    buckets = make_buckets(512, 64)
    assert buckets == [(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (576, 448), (640, 384),
                       (768, 320), (1024, 256)]
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and w * h >= 0.9 * 512 * 512
        assert 1 / 4 <= w / h <= 4
    assert make_buckets(64, 16) == [(32, 128), (48, 80), (64, 64), (80, 48), (128, 32)]
    assert make_buckets(1024, 64, max_aspect=2.0)[0] == (768, 1344) and len(make_buckets(1024, 64, 2.0)) == 9
    with pytest.raises(ValueError, match="not a multiple of 64"):
        make_buckets(500, 64)


def test_a_given_list_is_checked():
    assert check_buckets([[512, 512], [640, 384]], 64) == [(512, 512), (640, 384)]
    for bad in ([[512, 500]], [[512]], [["512", 512]], [[512, 512], [512, 512]]):
        with pytest.raises(ValueError):
            check_buckets(bad, 64)


def test_each_image_goes_to_the_bucket_nearest_its_log_aspect():
    buckets = make_buckets(512, 64)
    sizes = np.array([[1000, 1000], [4000, 3000], [3000, 4000], [1920, 1080], [100, 1000], [7000, 100],
                      [0, 0]])
    names = [buckets[i] for i in nearest_bucket(sizes, buckets)]
    assert names == [(512, 512), (576, 448), (448, 576), (640, 384), (256, 1024), (1024, 256), (512, 512)]
    # The nearest in log space: 16:9 (log 0.575) is nearer 640x384 (log 0.511) than 768x320 (0.875).
    w, h = 1920, 1080
    best = min(buckets, key=lambda b: abs(math.log(w / h) - math.log(b[0] / b[1])))
    assert best == (640, 384)


def test_the_crop_covers_the_bucket_and_says_where_it_is():
    # 4000x3000 into 576x448: scale 0.149 (height-bound), crop 3857x3000 of the width, centred.
    box, top_left = cover_crop(4000, 3000, (576, 448), None)
    left, top, right, bottom = box
    assert (bottom - top) == 3000 and abs((right - left) / (bottom - top) - 576 / 448) < 1e-3
    assert left == (4000 - (right - left)) // 2 and top == 0
    assert top_left == (0, round(left * 448 / 3000))
    rng = np.random.Generator(np.random.PCG64(0))
    boxes = {cover_crop(4000, 3000, (576, 448), rng)[0] for _ in range(20)}
    assert len(boxes) > 5 and all(b[1] == 0 and 0 <= b[0] and b[2] <= 4000 for b in boxes)
    assert cover_crop(512, 512, (512, 512), None) == ((0, 0, 512, 512), (0, 0))


def order(bucket_of, batch, seed=0, shard_sizes=None, window=0):
    return BucketedOrder(GlobalOrder(len(bucket_of), seed, shard_sizes, window), bucket_of, batch)


@pytest.mark.parametrize("shard_sizes, window", [(None, 0), ([10] * 10, 3)])
def test_every_micro_batch_is_full_and_of_one_bucket_and_each_epoch_has_every_sample_once(shard_sizes,
                                                                                          window):
    rng = np.random.default_rng(1)
    bucket_of = rng.choice(5, size=100, p=[0.1, 0.2, 0.4, 0.2, 0.1])
    o = order(bucket_of, 4, shard_sizes=shard_sizes, window=window)
    counts = np.bincount(bucket_of, minlength=5)
    assert o.dropped == int((counts % 4).sum()) and o.epoch_length == 100 - o.dropped
    for epoch in range(3):
        seq = [o.index(epoch * o.epoch_length + g) for g in range(o.epoch_length)]
        assert len(set(seq)) == len(seq)  # nothing twice within an epoch
        blocks = np.array(seq).reshape(-1, 4)
        assert all(len(set(bucket_of[b])) == 1 for b in blocks)  # one bucket per micro-batch
        per_bucket = np.bincount(bucket_of[seq], minlength=5)
        assert (per_bucket == counts - counts % 4).all()  # each bucket's leftover, and no more, left out
    first = [o.index(g) for g in range(o.epoch_length)]
    again = order(bucket_of, 4, shard_sizes=shard_sizes, window=window)  # a pure function of (seed, g)
    assert [again.index(g) for g in reversed(range(o.epoch_length))] == first[::-1]
    assert first != [o.index(o.epoch_length + g) for g in range(o.epoch_length)]  # reshuffled per epoch
    assert first != [order(bucket_of, 4, seed=1, shard_sizes=shard_sizes, window=window).index(g)
                     for g in range(o.epoch_length)]


def test_reads_stay_within_a_window_of_shards():
    """With shard windows a batch holds samples of its own window, or carried from the one before."""
    bucket_of = np.arange(200) % 2
    o = order(bucket_of, 4, shard_sizes=[20] * 10, window=2)
    base = o.base
    seq = [o.index(g) for g in range(o.epoch_length)]
    base._windows(0)
    window_of = {int(i): w for w in range(5) for i in base._members(0, w)}
    windows = [window_of[i] for i in seq]
    assert windows == sorted(windows)  # the epoch reads window after window


def test_a_bad_sample_is_replaced_from_its_own_bucket():
    bucket_of = np.arange(64) % 3
    o = order(bucket_of, 2)
    for index in (0, 5, 63):
        subs = o.substitutes(index, 16)
        assert subs[0] == index and len(set(subs)) == len(subs) == 16
        assert all(bucket_of[s] == bucket_of[index] for s in subs)
    assert len(o.substitutes(0, 100)) == 22  # a small bucket: each member once
    with pytest.raises(ValueError, match="no bucket holds"):
        order(np.arange(6), 2)


def test_the_transform_fills_a_bucket_and_reports_the_original_size_and_the_crop():
    import io

    from PIL import Image

    from ldm_ddp.data.transforms import ImageTransform

    # 400x300 (4:3) into 80x48 (5:3): scale max(80/400, 48/300) = 0.2, a crop of 400x240, 30 px from the top
    image = Image.new("RGB", (400, 300), (200, 10, 10))
    pixels, original, top_left = ImageTransform(64).to_bucket(image, (80, 48))
    assert pixels.shape == (3, 48, 80) and pixels.dtype == torch.uint8
    assert original == (300, 400) and top_left == (6, 0)  # 30 px of the image, 6 px of the bucket
    # Stored landscape, shown portrait (EXIF orientation 6): the original size is the upright one.
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("RGB", (400, 300), (0, 0, 200)).save(buffer, format="JPEG", exif=exif)
    pixels, original, _ = ImageTransform(64).to_bucket(Image.open(buffer), (48, 80))
    assert original == (400, 300) and pixels.shape == (3, 80, 48)
    # A mirrored crop is reported where it lies in the mirrored image.
    rng = np.random.Generator(np.random.PCG64(3))
    wide = Image.new("RGB", (400, 100))
    flipped = ImageTransform(64, crop="random", random_flip=True)
    seen = set()
    for _ in range(30):
        _, _, (top, left) = flipped.to_bucket(wide, (64, 64), rng)
        assert top == 0 and 0 <= left <= 256 - 64
        seen.add(left)
    assert len(seen) > 10
    # The square path is the square bucket.
    square = ImageTransform(64)(image)
    assert square.shape == (3, 64, 64)
    assert torch.equal(square, ImageTransform(64).to_bucket(image, (64, 64))[0])


def mixed_aspect_folder(root, bad: int = 0) -> str:
    """JPEGs of three aspects (3:1, 1:3, about 1:1; 4, 4 and 6 of them) with captions, `bad` broken ones."""
    import json

    from PIL import Image

    root.mkdir(parents=True)
    rows = []
    sizes = [(240, 80)] * 4 + [(80, 240)] * 4 + [(120, 100)] * 6
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (40 * i % 256, 120, 200)).save(root / f"{i:02d}.jpg", quality=90)
        rows.append({"file_name": f"{i:02d}.jpg", "text": f"a picture number {i}"})
    for i in range(bad):
        (root / f"bad_{i}.jpg").write_bytes(b"not a JPEG")
        rows.append({"file_name": f"bad_{i}.jpg", "text": "broken"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root)


@pytest.mark.slow
def test_a_mixed_aspect_folder_trains_with_buckets_and_resumes_only_with_the_same_grouping(tmp_path,
                                                                                          tiny_args):
    from conftest import train_here
    from test_train import metrics

    from ldm_ddp.checkpoint import read_metadata
    from ldm_ddp.config import ConfigError

    out = tmp_path / "run"
    args = dict(data__source="folder", data__path=mixed_aspect_folder(tmp_path / "images"),
                data__resolution=128, data__buckets="auto", data__batch_per_gpu=2, ckpt__every=2)
    printed = train_here(*tiny_args(out, train__max_steps=2, **args))
    # 128² px with the demo VAE (factor 8): buckets of multiples of 64 px; 1:3 and 3:1 go to 1:4 and 4:1
    assert ("data: 3 aspect-ratio buckets (width x height, aspect, samples); each epoch leaves out 0 samples"
            in printed)
    assert "64x256   0.25  4 samples" in printed and "128x128   1.00  6 samples" in printed
    assert "256x64   4.00  4 samples" in printed
    printed = train_here(*tiny_args(out, train__max_steps=4, **args))
    assert "resumed from" in printed and [r["step"] for r in metrics(out)] == [1, 2, 3, 4]
    meta = read_metadata(out / "checkpoints" / "step_0000004.safetensors")
    assert meta["config"]["data"]["buckets"] == "auto"
    with pytest.raises(ConfigError, match="bucketed micro-batches shape the sample order"):
        train_here(*tiny_args(out, train__max_steps=6, **{**args, "data__batch_per_gpu": 1},
                              train__global_batch=2))


SLOW_BACKEND = """import os, runpy, sys, time
from torch._dynamo import register_backend
from torch._dynamo.backends.registry import lookup_backend


@register_backend
def slow_on_rank_1(graph, inputs):  # a compile that takes {sleep} s more on rank 1
    if os.environ.get("RANK") == "1":
        time.sleep({sleep})
    return lookup_backend("eager")(graph, inputs)


sys.path.insert(0, "scripts")
sys.argv[0] = "scripts/train.py"
runpy.run_path("scripts/train.py", run_name="__main__")
"""


@pytest.mark.slow
def test_a_rank_compiling_a_new_bucket_shape_is_waited_for_past_the_collective_timeout(tmp_path, tiny_args,
                                                                                        run_script):
    """Compiled with buckets under DDP, each rank compiles a shape's graph at its first batch of it, which
    can come after the first step, while its peers wait in the gradients' all-reduce. Here rank 1's compiles
    take 8 s longer than the 3 s collective timeout; the run goes on (the start-up timeout holds until no
    rank has a shape left to meet) and ends."""
    launcher = tmp_path / "train_slow_compile.py"
    launcher.write_text(SLOW_BACKEND.format(sleep=8))
    out = tmp_path / "run"
    args = tiny_args(out, train__max_steps=6, data__source="folder", data__resolution=128,
                     data__path=mixed_aspect_folder(tmp_path / "images"), data__buckets="auto",
                     data__batch_per_gpu=2, train__compile="full", train__collective_timeout_s=3.0,
                     ckpt__every=6)
    result = run_script(str(launcher), *args, nproc=2, timeout=400,
                        env={"LDM_DDP_COMPILE_BACKEND": "slow_on_rank_1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").open() if '"loss"' in line]
    assert [r["step"] for r in records][-1] == 6 and records[-1]["compiled_graphs"] >= 3
