"""The latent cache: scripts/precompute_latents.py (one process and torchrun), moments equal to online
encoding position by position, flips and captions by the same seeded rules, fingerprint refusals."""

import json

import numpy as np
import pytest
import torch
from conftest import train_here
from PIL import Image
from safetensors import safe_open

from ldm_ddp.config import ConfigError, DataConfig, load_config
from ldm_ddp.data.latents import LatentSource, cache_fingerprint
from ldm_ddp.data.sources import build_source
from ldm_ddp.data.stream import ShardedStream
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
