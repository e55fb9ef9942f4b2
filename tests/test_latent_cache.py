"""The latent cache: scripts/precompute_latents.py (one process and torchrun), moments equal to online
encoding position by position, flips and captions by the same seeded rules, fingerprint refusals."""

import itertools
import json
import re

import numpy as np
import pytest
import torch
from conftest import train_here
from PIL import Image
from safetensors import safe_open

from ldm_ddp.config import ConfigError, DataConfig, load_config
from ldm_ddp.data.buckets import nearest_bucket, resolve_buckets
from ldm_ddp.data.latents import LatentSource, cache_fingerprint
from ldm_ddp.data.sources import build_source
from ldm_ddp.data.stream import AUGMENT_STREAM, ShardedStream, make_loader
from ldm_ddp.data.transforms import ImageTransform
from ldm_ddp.models import load_frozen

N = 10


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """N photo-like 80x64 images with one or two captions each, and one unreadable file."""
    root = tmp_path_factory.mktemp("images")
    rows = []
    for i in range(N):
        pixels = np.random.default_rng(i).integers(0, 256, (64, 80, 3), dtype=np.uint8)
        pixels[:, :40] //= 3  # a left-right asymmetry, so a flip shows
        Image.fromarray(pixels).save(root / f"{i:02d}.png")
        rows.append({"file_name": f"{i:02d}.png",
                     "text": [f"image {i}", f"picture {i}"] if i % 2 else f"image {i}"})
    (root / "broken.png").write_bytes(b"not a png")
    rows.append({"file_name": "broken.png", "text": "broken"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def config(images, *extra):
    return load_config(None, ["--data.source=folder", f"--data.path={images}", "--data.random_flip=true",
                              "--model.frozen_dtype=fp32", "--train.device=cpu",
                              "--data.num_workers=0", *extra])


@pytest.fixture(scope="module")
def cache(images, tmp_path_factory):
    from ldm_ddp.precompute import precompute_latents
    out = tmp_path_factory.mktemp("cache")
    manifest = precompute_latents(config(images), str(out), batch=4, shard_size=4)
    return out, manifest


def test_cache_layout_manifest_and_skipped(cache):
    out, manifest = cache
    # broken.png sorts last
    assert manifest["num_samples"] == N and [s["count"] for s in manifest["shards"]] == [4, 4, 2]
    assert [json.loads(line)["key"]
            for line in (out / "skipped.jsonl").read_text().splitlines()] == ["broken.png"]
    with safe_open(out / "latents-000000.safetensors", framework="pt") as f:
        assert (f.get_slice("moments").get_dtype() == "F16"
                and f.get_slice("moments").get_shape() == [4, 8, 8, 8])
        assert f.get_slice("input_ids").get_shape()[:2] == [4, 2]  # two captions at most, padded
    assert manifest["fingerprint"]["random_flip"] is True and manifest["fingerprint"]["vae_dtype"] == "fp32"


def test_cached_stream_matches_online_encoding_position_by_position(images, cache):
    out, _ = cache
    cfg = config(images)
    frozen = load_frozen(cfg.model.pretrained, "fp32", torch.device("cpu"))
    folder = build_source(cfg.data)
    latents = build_source(DataConfig(source="latents", path=str(out)))
    latents.check_matches(cache_fingerprint(frozen, cfg.data, "fp32"))
    transform = ImageTransform(cfg.data.resolution, "center", True)
    # The folder has N + 1 files (one bad) and the cache N samples: compare by key, position by position.
    online = ShardedStream(folder, frozen.tokenize, 64, 5, 1, 0, 1, seed=0, transform=transform)
    cached = ShardedStream(latents, frozen.tokenize, 64, 5, 1, 0, 1, seed=0, transform=transform)
    cached_batch = cached.micro_batch(0)
    flips = []
    for position, key, moments, ids in zip(cached.positions(0), cached_batch["keys"], cached_batch["moments"],
                                           cached_batch["input_ids"]):
        index = folder.files.index(key)
        sample, _ = online.load(index, position)  # the online path's pixels for this position
        expected = frozen.encode_moments(sample["image"][None])[0]
        torch.testing.assert_close(moments.float(), expected.float(), atol=2e-3, rtol=2e-3)
        unflipped = frozen.encode_moments(ImageTransform(64)(Image.open(images / key))[None])[0]
        flips.append(not torch.allclose(expected.float(), unflipped.float(), atol=1e-3))
        pick = frozen.tokenize([folder[index]["caption"]])[0]  # the caption rule of the image path
        assert torch.equal(ids, pick)
    assert any(flips) and not all(flips)  # both draws occur in 5 positions with this seed
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    drawn = frozen.latents_from_moments(cached_batch["moments"], gen())
    assert drawn.shape == (5, 4, 8, 8) and drawn.dtype == torch.float32
    moments = cached_batch["moments"].float()
    mean, logvar = moments.chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=gen())
    torch.testing.assert_close(drawn, (mean + torch.exp(0.5 * logvar) * noise) * frozen.scaling_factor)


def test_a_cache_for_another_config_is_refused_in_one_line(images, cache):
    out, _ = cache
    frozen = load_frozen(config(images).model.pretrained, "fp32", torch.device("cpu"))
    source = LatentSource(str(out))
    for extra, key in ((["--data.random_flip=false"], "random_flip"),
                       (["--data.resolution=32"], "resolution")):
        cfg = config(images, *extra)
        with pytest.raises(ConfigError, match=f"made with {key}=") as err:
            source.check_matches(cache_fingerprint(frozen, cfg.data, "fp32"))
        assert "\n" not in str(err.value)
    # A run loading the VAE in bf16 against an fp32 cache: named as the dtype, not as other weights.
    in_bf16 = load_frozen(config(images).model.pretrained, "bf16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="made with the VAE in fp32, this run loads it in bf16; set "
                                          "--model.frozen_dtype=fp32"):
        source.check_matches(cache_fingerprint(in_bf16, config(images).data, "bf16"))
    with torch.no_grad():
        next(frozen.vae.parameters()).add_(1e-3)  # other VAE weights
    with pytest.raises(ConfigError, match="made with vae="):
        source.check_matches(cache_fingerprint(frozen, config(images).data, "fp32"))
    with pytest.raises(ConfigError, match="no manifest.json"):
        LatentSource(str(out / "nowhere"))


def test_random_crop_is_refused(images, tmp_path):
    from ldm_ddp.precompute import precompute_latents
    with pytest.raises(ConfigError, match="data.crop"):
        precompute_latents(config(images, "--data.crop=random"), str(tmp_path))


@pytest.mark.slow
def test_torchrun_precompute_writes_the_same_cache(images, cache, tmp_path, run_script):
    out, manifest = cache
    args = [str(tmp_path / "cache2"), "--batch=4", "--shard-size=4", "--data.source=folder",
            f"--data.path={images}",
            "--data.random_flip=true", "--model.frozen_dtype=fp32", "--train.device=cpu",
            "--data.num_workers=0"]
    done = run_script("scripts/precompute_latents.py", *args, nproc=2, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads((tmp_path / "cache2" / "manifest.json").read_text())
    assert again["id"] == manifest["id"] and again["made_with"]["world_size"] == 2
    for shard in manifest["shards"]:
        with safe_open(out / shard["file"], framework="pt") as a, \
                safe_open(tmp_path / "cache2" / shard["file"], framework="pt") as b:
            for name in ("input_ids", "num_captions"):
                assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name
            for name in ("moments", "moments_flipped"):  # 1 thread per process here vs all cores above
                torch.testing.assert_close(a.get_tensor(name), b.get_tensor(name), atol=2e-3, rtol=2e-3)


@pytest.mark.slow
def test_training_from_the_cache_and_refusing_a_mismatched_one(cache, tmp_path, tiny_args, run_script):
    out, _ = cache
    args = [*tiny_args(tmp_path / "run", train__max_steps=2), "--data.source=latents", f"--data.path={out}",
            "--model.frozen_dtype=fp32", "--data.random_flip=true", "--data.num_workers=1"]
    train_here(*args)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert ([r["step"] for r in records if "loss" in r] == [1, 2]
            and all(np.isfinite(r["loss"]) for r in records if "loss" in r))
    refused = run_script("scripts/train.py", *args, "--data.random_flip=false", "--train.max_steps=3",
                         timeout=120)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "made with random_flip=True" in lines[0]


def test_a_validation_set_from_a_mismatched_cache_is_refused_before_step_1(cache, tmp_path, tiny_args):
    """val.source=latents is checked as the training cache is: made with random_flip, refused by a run
    without it, naming the setting."""
    out, _ = cache
    with pytest.raises(ConfigError, match=r"^val.path: the latent cache .* made with random_flip=True"):
        train_here(*tiny_args(tmp_path / "run", train__max_steps=1), "--model.frozen_dtype=fp32",
                   "--val.every=1", "--val.source=latents", f"--val.path={out}", "--val.num_samples=2")
    assert not list((tmp_path / "run").glob("checkpoints/*.safetensors"))


def test_a_remade_cache_is_no_cache_until_done_and_its_id_covers_the_images(images, cache, tmp_path,
                                                                            monkeypatch):
    """Remaking a cache in the same folder removes the old manifest first (a killed remake must not leave it
    vouching for a mix of old and new shards); the id a checkpoint records differs for other images."""
    import shutil

    from ldm_ddp import precompute
    from ldm_ddp.data.latents import write_manifest

    out, manifest = cache
    remade = tmp_path / "remade"
    shutil.copytree(out, remade)

    def killed(*args):
        raise KeyboardInterrupt  # the remake dies at its first shard

    monkeypatch.setattr(precompute, "_write_shard", killed)
    with pytest.raises(KeyboardInterrupt):
        precompute.precompute_latents(config(images), str(remade), batch=4, shard_size=4)
    assert not (remade / "manifest.json").exists() and (remade / "latents-000000.safetensors").exists()
    with pytest.raises(ConfigError):
        build_source(DataConfig(source="latents", path=str(remade)))

    other = {**manifest["made_with"], "source_fingerprint": "folder:n=10:otherimages"}
    again = write_manifest(str(tmp_path), manifest["fingerprint"], manifest["shards"], manifest["made_with"])
    assert again["id"] == manifest["id"]  # the same inputs, the same id
    assert write_manifest(str(tmp_path), manifest["fingerprint"], manifest["shards"],
                          other)["id"] != manifest["id"]


def test_the_demos_shapes_source_can_be_cached(tmp_path, tiny_args):
    """scripts/precompute_latents.py's default preset (demo: the shapes source) makes a cache whose moments
    are the online encoding's: the shapes are rendered, stored losslessly and encoded as the trainer would."""
    from ldm_ddp.precompute import precompute_latents
    cfg = load_config(None,
                      [*tiny_args(tmp_path / "run"), "--data.shapes_num_samples=6", "--train.device=cpu",
                             "--data.random_flip=false"], preset="demo")
    manifest = precompute_latents(cfg, str(tmp_path / "cache"), batch=3, shard_size=4)
    assert manifest["num_samples"] == 6 and [s["count"] for s in manifest["shards"]] == [4, 2]
    frozen = load_frozen(cfg.model.pretrained, cfg.model.frozen_dtype, torch.device("cpu"))
    shapes, transform = build_source(cfg.data), ImageTransform(cfg.data.resolution, "center", False)
    with safe_open(tmp_path / "cache" / "latents-000000.safetensors", framework="pt") as f:
        moments = f.get_tensor("moments")
    expected = frozen.encode_moments(torch.stack([transform(shapes[i]["image"]) for i in range(4)]))
    torch.testing.assert_close(moments.float(), expected.float(), atol=2e-3, rtol=2e-3)


# Aspect-ratio buckets in the cache. At 128 px the demo VAE (factor 8) gives buckets of multiples of 64 px.
BUCKETS = [(64, 256), (128, 128), (256, 64)]
BUCKETED = ["--data.resolution=128", "--data.buckets=auto"]
# Wide, tall and near-square photos (4, 4 and 6: every bucket fills micro-batches of 2). Odd sizes put a
# mirrored centre crop a pixel away from the unmirrored one; the 600 px JPEGs decode at half size (draft).
PHOTO_SIZES = ([(241, 80), (250, 81), (239, 79), (600, 203)] + [(80, 243), (81, 250), (79, 238), (205, 610)]
               + [(121, 100), (133, 111), (101, 120), (97, 97), (127, 129), (301, 250)])


def mixed_aspect_photos(root, broken: bool = False):
    """Noise photos of PHOTO_SIZES (darker on the left, so a flip shows), one or two captions each; with
    `broken`, one unreadable file besides."""
    root.mkdir(parents=True)
    rows = []
    for i, (w, h) in enumerate(PHOTO_SIZES):
        pixels = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        pixels[:, :w // 3] //= 3
        name = f"{i:02d}.jpg" if max(w, h) >= 300 else f"{i:02d}.png"
        Image.fromarray(pixels).save(root / name)
        rows.append({"file_name": name, "text": [f"photo {i}", f"shot {i}"] if i % 3 == 0 else f"photo {i}"})
    if broken:
        (root / "99_broken.png").write_bytes(b"not a png")
        rows.append({"file_name": "99_broken.png", "text": "broken"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return mixed_aspect_photos(tmp_path_factory.mktemp("photos") / "clean")


@pytest.fixture(scope="module")
def bucketed_cache(photos, tmp_path_factory):
    """One cache shard: the cache's order is then the folder's (one permutation of the same 14 samples)."""
    from ldm_ddp.precompute import precompute_latents
    out = tmp_path_factory.mktemp("bucketed")
    return out, precompute_latents(config(photos, *BUCKETED), str(out), batch=3, shard_size=64)


@pytest.fixture(scope="module")
def sharded_bucketed_cache(tmp_path_factory):
    """Shards of 4 from a folder with a broken file, which is left out."""
    from ldm_ddp.precompute import precompute_latents
    root = mixed_aspect_photos(tmp_path_factory.mktemp("photos") / "with_a_broken_one", broken=True)
    out = tmp_path_factory.mktemp("sharded")
    return root, out, precompute_latents(config(root, *BUCKETED), str(out), batch=3, shard_size=4)


def demo_vae():
    return load_frozen(config(".").model.pretrained, "fp32", torch.device("cpu"))


def test_a_bucketed_cache_holds_one_moments_tensor_per_bucket_and_each_samples_size_and_crop(bucketed_cache):
    out, manifest = bucketed_cache
    assert manifest["fingerprint"]["buckets"] == [list(b) for b in BUCKETS] and manifest["num_samples"] == 14
    with safe_open(out / "latents-000000.safetensors", framework="pt") as f:
        shapes = {name: f.get_slice(name).get_shape() for name in f.keys() if name.startswith("moments")}
        assert shapes == {"moments.64x256": [4, 8, 32, 8], "moments_flipped.64x256": [4, 8, 32, 8],
                          "moments.128x128": [6, 8, 16, 16], "moments_flipped.128x128": [6, 8, 16, 16],
                          "moments.256x64": [4, 8, 8, 32], "moments_flipped.256x64": [4, 8, 8, 32]}
        # files in sorted order: wide, tall, near-square; rows count up within each bucket
        assert f.get_tensor("bucket").tolist() == [2] * 4 + [0] * 4 + [1] * 6
        assert f.get_tensor("bucket_row").tolist() == [0, 1, 2, 3] * 2 + list(range(6))
        original, crop = f.get_tensor("original_size"), f.get_tensor("crop_top_left")
        assert original.dtype == crop.dtype == torch.int32 and original.shape == crop.shape == (14, 2)
        assert original[0].tolist() == [80, 241] and original[7].tolist() == [610, 205]
        assert not torch.equal(crop, f.get_tensor("crop_top_left_flipped"))  # odd margins: a pixel apart


def test_a_bucketed_cache_serves_the_online_bucket_sequence_with_the_vaes_moments(photos, bucketed_cache):
    out, _ = bucketed_cache
    cfg, frozen = config(photos, *BUCKETED), demo_vae()
    assert resolve_buckets(cfg.data.buckets, 128, 8 * frozen.downsample) == BUCKETS
    folder, latents = build_source(cfg.data), LatentSource(str(out))
    latents.check_matches(cache_fingerprint(frozen, cfg.data, "fp32"))
    # Each cached sample's size is its bucket, which maps back to that very bucket.
    assert (nearest_bucket(latents.image_sizes(), BUCKETS)
            == nearest_bucket(folder.image_sizes(), BUCKETS)).all()
    transform = ImageTransform(128, "center", True)
    online, cached = (ShardedStream(source, frozen.tokenize, 128, 2, 1, 0, 1, seed=0, transform=transform,
                                    buckets=BUCKETS) for source in (folder, latents))
    for k in range(14):  # two epochs of micro-batches of 2
        a, b = online.micro_batch(k), cached.micro_batch(k)
        assert b["keys"] == a["keys"] and torch.equal(b["input_ids"], a["input_ids"])
        assert b["moments"].shape[2:] == (a["images"].shape[2] // 8, a["images"].shape[3] // 8)
        assert torch.equal(b["original_size"], a["original_size"]), k
        assert torch.equal(b["crop_top_left"], a["crop_top_left"]), k
        # The VAE of to_bucket's pixels, mirrored or not by the position's draw
        torch.testing.assert_close(b["moments"].float(), frozen.encode_moments(a["images"]).float(),
                                   atol=2e-3, rtol=2e-3)
    flips = [np.random.Generator(np.random.PCG64([0, AUGMENT_STREAM, p])).random() < 0.5 for p in range(28)]
    assert any(flips) and not all(flips)


def drawing(flip: bool) -> np.random.Generator:
    """A generator whose first draw makes ImageTransform mirror the image (flip) or not."""
    seed = next(s for s in range(100) if (np.random.Generator(np.random.PCG64(s)).random() < 0.5) == flip)
    return np.random.Generator(np.random.PCG64(seed))


def test_every_cached_sample_is_its_bucket_encoded_across_shards_and_a_broken_one_is_left_out(
        sharded_bucketed_cache):
    root, out, manifest = sharded_bucketed_cache
    assert manifest["num_samples"] == 14 and [s["count"] for s in manifest["shards"]] == [4, 4, 4, 2]
    assert [json.loads(line)["key"]
            for line in (out / "skipped.jsonl").read_text().splitlines()] == ["99_broken.png"]
    frozen, latents = demo_vae(), LatentSource(str(out))
    sizes = latents.image_sizes()
    assert [tuple(s) for s in sizes] == [BUCKETS[2]] * 4 + [BUCKETS[0]] * 4 + [BUCKETS[1]] * 6
    transform = ImageTransform(128, "center", True)
    for i in range(len(latents)):
        for flip in (False, True):
            item = latents.latent_item(i, flip)
            pixels, original, crop = transform.to_bucket(Image.open(root / item["key"]), tuple(sizes[i]),
                                                         drawing(flip))
            expected = frozen.encode_moments(pixels[None])[0]
            torch.testing.assert_close(item["moments"].float(), expected.float(), atol=2e-3, rtol=2e-3)
            assert (item["original_size"], item["crop_top_left"]) == (original, crop), (i, flip)


def test_a_cache_made_with_other_buckets_is_refused_in_one_line(photos, bucketed_cache, cache):
    frozen, source = demo_vae(), LatentSource(str(bucketed_cache[0]))
    made_with = "[[64, 256], [128, 128], [256, 64]]"
    for extra, now in ((["--data.buckets=off"], "'off'"),
                       (["--data.buckets=[[128, 128], [256, 64]]"], "[[128, 128], [256, 64]]")):
        cfg = config(photos, "--data.resolution=128", *extra)
        with pytest.raises(ConfigError, match=re.escape(f"made with buckets={made_with}, this run has {now}; "
                                                        "make a new cache")) as err:
            source.check_matches(cache_fingerprint(frozen, cfg.data, "fp32"))
        assert "\n" not in str(err.value)
    # A square cache (made before buckets, or without them) for a bucketed run
    square = LatentSource(str(cache[0]))
    with pytest.raises(ConfigError, match=re.escape("made with buckets='off', this run has [[64, 64]]")):
        square.check_matches(cache_fingerprint(frozen, config(photos, "--data.buckets=auto").data, "fp32"))
    square.check_matches(cache_fingerprint(frozen, config(photos).data, "fp32"))
    with pytest.raises(ConfigError, match="was made with buckets"):  # the stream itself checks the shapes
        ShardedStream(source, None, 128, 2, 1, 0, 1, seed=0)


def test_a_square_cache_serves_sizes_and_crops_and_one_made_before_them_serves_the_square(cache, tmp_path):
    from safetensors.torch import save_file

    out, _ = cache

    def first_batch(path) -> dict:
        transform = ImageTransform(64, "center", True)
        return ShardedStream(LatentSource(str(path)), None, 64, 5, 1, 0, 1, seed=0,
                             transform=transform).micro_batch(0)

    batch = first_batch(out)  # 80x64 images: a centre crop 8 px from either side
    assert batch["original_size"].tolist() == [[64, 80]] * 5
    assert batch["crop_top_left"].tolist() == [[0, 8]] * 5
    before = tmp_path / "before"  # the same cache as written before sizes and crops were recorded
    before.mkdir()
    for file in out.iterdir():
        if file.suffix != ".safetensors":
            (before / file.name).write_bytes(file.read_bytes())
            continue
        with safe_open(file, framework="pt") as f:
            save_file({name: f.get_tensor(name) for name in f.keys()
                       if name in ("moments", "moments_flipped", "input_ids", "num_captions")},
                      before / file.name, metadata=f.metadata())
    old = first_batch(before)
    assert old["keys"] == batch["keys"] and torch.equal(old["moments"], batch["moments"])
    assert old["original_size"].tolist() == [[64, 64]] * 5 and old["crop_top_left"].tolist() == [[0, 0]] * 5


def consume_cache(path, world, accum, num_workers, steps, start_step=0) -> dict[int, tuple]:
    """{global position: (key, moments, original_size, crop_top_left)} for `steps` optimizer steps of every
    rank (micro-batches of 2, shuffle windows of 2 cache shards), from start_step."""
    seen = {}
    for rank in range(world):
        stream = ShardedStream(LatentSource(str(path)), None, 128, 2, accum, rank, world, 0, start_step,
                               ImageTransform(128, "center", True), shuffle_window=2, buckets=BUCKETS)
        loader = make_loader(stream, num_workers, prefetch_batches=2, pin_memory=False)
        for b in itertools.islice(iter(loader), steps * accum):
            assert len({tuple(m.shape) for m in b["moments"]}) == 1  # one bucket per micro-batch
            for position, *sample in zip(stream.positions(b["k"]), b["keys"], b["moments"],
                                         b["original_size"].tolist(), b["crop_top_left"].tolist()):
                assert position not in seen, f"position {position} delivered twice"
                seen[position] = sample
    return seen


def assert_same(seen: dict, expected: dict):
    for position, (key, moments, size, crop) in seen.items():
        assert (key, size, crop) == tuple(expected[position][i] for i in (0, 2, 3)), position
        assert torch.equal(moments, expected[position][1]), position


def test_a_bucketed_cache_keeps_one_order_on_1_and_2_ranks_and_resumes_exactly(sharded_bucketed_cache):
    _, out, _ = sharded_bucketed_cache
    reference = consume_cache(out, 1, 1, 0, steps=14)  # two epochs of 14 samples (4, 4 and 6 a bucket)
    for epoch in range(2):
        assert len({reference[p][0] for p in range(epoch * 14, (epoch + 1) * 14)}) == 14
    assert_same(consume_cache(out, 2, 1, 2, steps=7), reference)
    # G = 4: two ranks, then one with grad accum 2, then two again
    seen = consume_cache(out, 2, 1, 0, steps=1)
    seen |= consume_cache(out, 1, 2, 0, steps=2, start_step=1)
    seen |= consume_cache(out, 2, 1, 2, steps=4, start_step=3)
    assert sorted(seen) == list(range(28))
    assert_same(seen, reference)


@pytest.mark.slow
def test_training_from_a_bucketed_cache(bucketed_cache, tmp_path, tiny_args):
    out, _ = bucketed_cache
    printed = train_here(*tiny_args(tmp_path / "run", train__max_steps=3), "--data.source=latents",
                         f"--data.path={out}", *BUCKETED, "--model.frozen_dtype=fp32",
                         "--data.random_flip=true")
    assert "data: 3 aspect-ratio buckets" in printed
    assert "64x256   0.25  4 samples" in printed and "128x128   1.00  6 samples" in printed
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert ([r["step"] for r in records if "loss" in r] == [1, 2, 3]
            and all(np.isfinite(r["loss"]) for r in records if "loss" in r))
