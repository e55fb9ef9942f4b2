"""scripts/make_shards.py and the indexed shard format: every kind of bad input left out and named,
deterministic output for any worker count, resizing, the minimum-size filter, WebDataset compatibility."""

import filecmp
import io
import json
import os
import runpy
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ldm_ddp.config import ConfigError, DataConfig
from ldm_ddp.data.convert import make_shards
from ldm_ddp.data.folder import ImageFolderSource
from ldm_ddp.data.shards import ShardsSource
from ldm_ddp.data.sources import build_source
from ldm_ddp.data.webdataset import WebDatasetSource

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jpeg(size, seed=0, mode="RGB", exif_rotate=False) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    out = io.BytesIO()
    exif = Image.Exif()
    if exif_rotate:
        exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(out, format="JPEG", quality=90, exif=exif)
    return out.getvalue()


def every_kind_of_input(root) -> tuple[dict, dict]:
    """A folder with good images of many modes and every kind of bad file;
    -> ({good name: caption}, {bad name: reason})."""
    root.mkdir(parents=True, exist_ok=True)
    good, bad, rows = {}, {}, []

    def add(name, data, caption):
        (root / name).write_bytes(data)
        rows.append({"file_name": name, "text": caption})

    for i in range(8):
        add(f"photo_{i}.jpg", jpeg((60 + 4 * i, 48), seed=i), f"photo {i}")
        good[f"photo_{i}.jpg"] = f"photo {i}"
    buffers = {"cmyk.jpg": jpeg((50, 50), mode="CMYK"), "rotated.jpg": jpeg((64, 40), exif_rotate=True)}
    for name, image in {"grey16.png": Image.fromarray(np.full((40, 56), 30000, np.uint16)),
                        "alpha.png": Image.new("RGBA", (48, 48), (255, 0, 0, 128)),
                        "palette.gif": Image.new("P", (48, 40), 3),
                        "la.png": Image.new("LA", (40, 44), (90, 200))}.items():
        out = io.BytesIO()
        image.save(out, format=name.rsplit(".", 1)[1].replace("jpg", "jpeg").upper())
        buffers[name] = out.getvalue()
    for name, data in buffers.items():
        add(name, data, f"mode {name}")
        good[name] = f"mode {name}"
    truncated = jpeg((64, 64), seed=9)
    add("truncated.jpg", truncated[:len(truncated) // 2], "cut in half")
    add("zero.png", b"", "nothing")
    add("notes.jpg", b"this is not a JPEG", "text")
    add("uncaptioned.png", buffers["alpha.png"], "")
    add("small.jpg", jpeg((20, 30)), "too small")
    big = io.BytesIO()
    Image.new("L", (400, 400)).save(big, format="PNG")
    add("bomb.png", big.getvalue(), "too many pixels")
    costly = io.BytesIO()
    Image.new("RGB", (160, 160)).save(costly, format="PNG")  # 76800 bytes as RGB, over convert()'s budget
    add("costly.png", costly.getvalue(), "too costly to decode")
    bad = {"truncated.jpg": "OSError", "zero.png": "zero-byte", "notes.jpg": "not an image",
           "uncaptioned.png":
           "empty caption", "small.jpg": "smaller than --min-size", "bomb.png": "Decompression",
           "costly.png": "decode budget"}
    (root / "orphan.png").write_bytes(buffers["alpha.png"])  # no metadata row
    bad["orphan.png"] = "no row in metadata.jsonl"
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return good, bad


def convert(source, out, **kwargs):
    kwargs = {"shard_size": 5, "min_size": 32, "max_image_pixels": 100_000, "max_decode_bytes": 70_000,
              "log": lambda _: None, **kwargs}
    return make_shards(source, str(out), **kwargs)


@pytest.mark.slow
def test_every_bad_input_is_left_out_and_named_and_good_ones_kept(tmp_path):
    good, bad = every_kind_of_input(tmp_path / "in")
    index = convert(ImageFolderSource(str(tmp_path / "in")), tmp_path / "out", workers=2)
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert {s["key"] for s in skipped} == set(bad)
    for s in skipped:
        assert bad[s["key"]] in s["reason"], s
    source = ShardsSource(str(tmp_path / "out"))
    assert len(source) == index["num_samples"] == len(good)
    samples = {source.key(i).split("/", 1)[1]: source[i] for i in range(len(source))}
    assert {k: s["caption"] for k, s in samples.items()} == good
    for sample in samples.values():
        sample["image"].load()  # every kept image decodes
    assert samples["rotated.jpg"]["image"].format == "JPEG"  # kept as it was: orientation applied at training
    assert samples["grey16.png"]["image"].format == "PNG" and samples["palette.gif"]["image"].format == "PNG"
    assert index["made_with"]["min_size"] == 32 and index["made_with"]["skipped"] == len(bad)


@pytest.mark.slow
def test_output_is_the_same_for_any_worker_count_and_readable_as_webdataset(tmp_path):
    every_kind_of_input(tmp_path / "in")
    source = ImageFolderSource(str(tmp_path / "in"))
    convert(source, tmp_path / "one", workers=1)
    convert(source, tmp_path / "three", workers=3)
    names = sorted(os.listdir(tmp_path / "one"))
    assert names == sorted(os.listdir(tmp_path / "three")) and "index.json" in names
    assert all(filecmp.cmp(tmp_path / "one" / n, tmp_path / "three" / n, shallow=False) for n in names)
    shards, wds = ShardsSource(str(tmp_path / "one")), WebDatasetSource(str(tmp_path / "one"))
    assert len(wds) == len(shards) and shards.shard_sizes() == wds.shard_sizes()
    assert [wds[i]["caption"] for i in range(len(wds))] == [shards[i]["caption"] for i in range(len(shards))]
    unshuffled = convert(source, tmp_path / "ordered", shuffle_seed=None)
    listing = ShardsSource(str(tmp_path / "ordered"))
    keys = [listing.key(i).split("/", 1)[1] for i in range(len(listing))]
    assert keys == sorted(keys) and unshuffled["made_with"]["shuffle_seed"] is None


def test_resize_shrinks_the_shorter_side_and_never_enlarges(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    sizes = {"wide.jpg": (200, 100), "tall.png": (90, 180), "small.jpg": (40, 50)}
    for name, size in sizes.items():
        out = io.BytesIO()
        pixels = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(out, format="PNG" if name.endswith("png") else "JPEG")
        (root / name).write_bytes(out.getvalue())
        (root / name).with_suffix(".txt").write_text(name)
    convert(ImageFolderSource(str(root)), tmp_path / "out", resize=64, min_size=0)
    source = ShardsSource(str(tmp_path / "out"))
    got = {source[i]["caption"]: (source[i]["image"].size, source[i]["image"].format) for i in range(3)}
    assert got == {"wide.jpg": ((128, 64), "JPEG"), "tall.png": ((64, 128), "JPEG"),
                   "small.jpg": ((40, 50), "JPEG")}


def test_shard_set_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no index.json .*make_shards") as err:
        ShardsSource(str(tmp_path))
    assert "\n" not in str(err.value)
    (tmp_path / "index.json").write_text('{"format": "something else"}')
    with pytest.raises(ConfigError, match="not a ldm_ddp.shards/1 index"):
        build_source(DataConfig(source="shards", path=str(tmp_path)))


def test_nothing_to_write_fails_with_one_line_and_leaves_no_set(tmp_path, monkeypatch, capsys):
    """All inputs left out: exit non-zero naming the input and why, and no index.json (an earlier set's goes
    first, as its shards are about to be overwritten), so nothing looks like a valid empty set."""
    root, out = tmp_path / "in", tmp_path / "out"
    root.mkdir()
    for name, data in (("a.png", b"this is not a PNG"), ("b.png", b""), ("c.jpg", jpeg((20, 30)))):
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text(f"caption of {name}")
    out.mkdir()
    (out / "index.json").write_text('{"format": "ldm_ddp.shards/1"}')
    monkeypatch.syspath_prepend(os.path.join(REPO, "scripts"))
    monkeypatch.setattr(sys, "argv", ["make_shards.py", "--source", "folder", "--path", str(root), str(out),
                                      "--min-size", "64", "--replace"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(os.path.join(REPO, "scripts", "make_shards.py"), run_name="__main__")
    assert done.value.code not in (0, None)
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and str(root) in error[0] and "all 3 inputs were left out" in error[0], error
    assert sorted(p.name for p in out.iterdir()) == ["skipped.jsonl"]
    assert len((out / "skipped.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_make_shards_script_and_training_config(tmp_path):
    every_kind_of_input(tmp_path / "in")
    done = subprocess.run([sys.executable, "scripts/make_shards.py", "--source", "folder", "--path",
                           str(tmp_path / "in"), str(tmp_path / "out"), "--shard-size", "4",
                           "--min-size", "32",
                           "--workers", "2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "samples in" in done.stdout and "left out" in done.stdout
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert ([s["count"] for s in index["shards"]]
            and sum(s["count"] for s in index["shards"]) == index["num_samples"])
    bad = subprocess.run([sys.executable, "scripts/make_shards.py", "--source", "folder", "--path",
                          str(tmp_path / "nowhere"), str(tmp_path / "x")], cwd=REPO, capture_output=True,
                          text=True,
                         timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "nowhere" in bad.stderr


def test_a_cameras_multi_picture_jpeg_is_kept_as_a_jpeg():
    """MPO (a phone's or camera's multi-picture JPEG): stored as it is, as a .jpg, not re-encoded as PNG."""
    from ldm_ddp.data.convert import prepare
    first, second = Image.new("RGB", (64, 48), (200, 10, 10)), Image.new("RGB", (64, 48), (10, 200, 10))
    buf = io.BytesIO()
    first.save(buf, format="MPO", save_all=True, append_images=[second])
    data = buf.getvalue()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    kept = prepare({"key": "photo", "image": data, "captions": "a photo"}, 0, 0, False, 90)
    assert kept["ext"] == "jpg" and kept["image"] == data
    shrunk = prepare({"key": "photo", "image": data, "captions": "a photo"}, 24, 0, False, 90)
    assert shrunk["ext"] == "jpg" and Image.open(io.BytesIO(shrunk["image"])).size == (32, 24)


def test_an_output_folder_in_use_is_refused_unless_replaced_whole(tmp_path, monkeypatch, capsys):
    root, out = tmp_path / "in", tmp_path / "out"
    root.mkdir()
    for n, size in enumerate(((40, 30), (30, 40), (64, 16))):
        (root / f"{n}.jpg").write_bytes(jpeg(size))
        (root / f"{n}.txt").write_text(f"caption {n}")
    monkeypatch.syspath_prepend(os.path.join(REPO, "scripts"))

    def make(*extra) -> int:
        monkeypatch.setattr(sys, "argv", ["make_shards.py", "--source", "folder", "--path", str(root),
                                          str(out), "--shard-size", "1", "--no-shuffle", *extra])
        with pytest.raises(SystemExit) as done:
            runpy.run_path(os.path.join(REPO, "scripts", "make_shards.py"), run_name="__main__")
        return done.value.code

    assert make() == 0 and len(list(out.glob("shard-*.tar"))) == 3
    capsys.readouterr()
    assert make("--shard-size", "2") == 2  # an earlier set: refused, untouched
    assert "holds a shard set already" in capsys.readouterr().err and len(list(out.glob("shard-*.tar"))) == 3
    assert make("--shard-size", "2", "--replace", "--resize-area", "24") == 0
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "shard-000000.json", "shard-000000.tar",
                                                     "shard-000001.json", "shard-000001.tar", "skipped.jsonl"]
    # Each image's upright size is in its shard's index, shrunk to at most 24² px with its aspect kept.
    sizes = [size for name in ("shard-000000.json", "shard-000001.json")
             for size in json.loads((out / name).read_text())["sizes"]]
    assert sizes == [[28, 21], [21, 28], [48, 12]]
    from ldm_ddp.data.shards import ShardsSource
    assert ShardsSource(str(out)).image_sizes().tolist() == sizes
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert make("--replace") == 2 and "not a shard set's (notes.txt" in capsys.readouterr().err
