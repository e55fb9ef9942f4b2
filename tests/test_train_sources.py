"""scripts/train.py on every real data source: two processes (torchrun, gloo) on an image folder (with
unreadable files) and on WebDataset shards; one process on a shard set, Parquet, and an HF dataset
map-style and streamed (exact resume on every source is tested at the stream level in test_data_order.py;
the latent cache in test_latent_cache.py)."""

import io
import json
import tarfile

import numpy as np
import pytest
from conftest import train_here
from PIL import Image

from ldm_ddp.checkpoint import read_metadata

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def photo(i: int) -> tuple[bytes, str]:
    """A 72x64 JPEG with a coloured square and its caption."""
    name = list(COLOURS)[i % 3]
    pixels = np.full((64, 72, 3), 245, np.uint8)
    pixels[16 + i % 8:48, 20:52] = COLOURS[name]
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue(), f"a {name} square number {i}"


def folder(root, n=24, bad=0):
    """n good images and `bad` unreadable ones (bad_NN.jpg, with captions)."""
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        data, caption = photo(i)
        (root / f"{i:03d}.jpg").write_bytes(data)
        rows.append({"file_name": f"{i:03d}.jpg", "text": caption})
    for i in range(bad):
        (root / f"bad_{i:02d}.jpg").write_bytes(b"not a JPEG")
        rows.append({"file_name": f"bad_{i:02d}.jpg", "text": "broken"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root)


def webdataset(root, n=24):
    root.mkdir(parents=True)
    for s in range(3):
        with tarfile.open(root / f"train-{s:02d}.tar", "w") as tar:
            for i in range(s * n // 3, (s + 1) * n // 3):
                data, caption = photo(i)
                for ext, payload in (("jpg", data), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{i:05d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(root / "train-{00..02}.tar")


def train(run_script, tiny_args, out, data_args, nproc, resume=False):
    """Train 4 steps; with `resume`, 2 steps first and then the same command to step 4 (it resumes at 2).
    One process trains in this process (conftest.train_here), several under torchrun."""
    def run(steps: int) -> str:
        args = [*tiny_args(out, train__max_steps=steps), *data_args]
        if nproc == 1:
            return train_here(*args)
        done = run_script("scripts/train.py", *args, nproc=nproc, timeout=150)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    if resume:
        run(2)
    stdout = run(4)
    assert not resume or ("resumed from" in stdout and "step 2" in stdout)
    meta = read_metadata(out / "checkpoints" / "step_0000004.safetensors")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r][-4:] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    return meta


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["folder", "webdataset"])
def test_two_process_training_on_a_real_source(tmp_path, tiny_args, run_script, kind):
    path = folder(tmp_path / "data", bad=6) if kind == "folder" else webdataset(tmp_path / "data")
    args = [f"--data.source={kind}", f"--data.path={path}", "--data.num_workers=1", "--data.crop=random",
            "--data.random_flip=true"]
    meta = train(run_script, tiny_args, tmp_path / "run", args, nproc=2)
    assert meta["data"]["source"] == kind and meta["data"]["samples_seen"] == 4 * 2 * 2
    assert meta["data"]["fingerprint"].startswith(kind + (":n=30:" if kind == "folder" else ":n=24:"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    replaced = sum(r.get("bad_samples", 0) for r in records)
    # counted, all ranks
    assert meta["data"]["bad_samples"] == replaced and (replaced > 0) == (kind == "folder")
    # and each one named with its step, rank and reason
    listed = tmp_path / "run" / "bad_samples.jsonl"
    named = [json.loads(line) for line in listed.read_text().splitlines()] if listed.exists() else []
    assert len(named) == replaced
    assert all(r["key"].startswith("bad_") and r["reason"].startswith("UnidentifiedImageError")
               and 1 <= r["step"] <= 4 and r["rank"] in (0, 1) for r in named)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["shards", "hf_stream", "hf", "parquet"])
def test_training_on_the_other_sources(tmp_path, tiny_args, run_script, kind):
    source = folder(tmp_path / "images")
    if kind == "shards":
        from ldm_ddp.data.convert import make_shards
        from ldm_ddp.data.folder import ImageFolderSource
        make_shards(ImageFolderSource(source), str(tmp_path / "shards"), shard_size=5, log=lambda _: None)
        args = ["--data.source=shards", f"--data.path={tmp_path / 'shards'}", "--data.shuffle_window=2"]
    elif kind == "parquet":  # two files, row groups of 5
        import pyarrow as pa
        import pyarrow.parquet as pq
        for f in range(2):
            rows = [photo(i) for i in range(f * 12, f * 12 + 12)]
            pq.write_table(pa.table({"image": [r[0] for r in rows], "text": [r[1] for r in rows]}),
                           tmp_path / f"part-{f}.parquet", row_group_size=5)
        args = ["--data.source=parquet", f"--data.path={tmp_path}", "--data.shuffle_window=2"]
    else:  # the datasets "imagefolder" builder over the folder, map-style or streamed
        args = ["--data.source=hf", f"--data.path={source}",
                f"--data.hf_streaming={str(kind == 'hf_stream').lower()}",
                "--data.num_workers=2"]
    meta = train(run_script, tiny_args, tmp_path / "run", args, nproc=1)  # resume: test_data_order.py
    prefix = {"shards": "shards", "hf_stream": "hf-stream", "hf": "hf", "parquet": "parquet"}[kind]
    assert (meta["data"]["fingerprint"].startswith(f"{prefix}:n=24:")
            and meta["data"]["source"] == kind.split("_")[0])
