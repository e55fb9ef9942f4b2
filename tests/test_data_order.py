"""Every source through the real stream and DataLoader: exactly once per epoch and the same global order
for 1, 2 and 4 ranks x 0 and 2 workers; resume at random steps; elastic resume 2 -> 1 -> 4 ranks; the
two-level shuffle; fsspec URLs; the unreadable-shard policy."""

import itertools
import json
import os
import tarfile

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before `datasets` is imported: no hub, ever

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from source_helpers import R, png, tokenize

from ldm_ddp.config import ConfigError, DataConfig
from ldm_ddp.data.convert import make_shards
from ldm_ddp.data.sources import build_source
from ldm_ddp.data.stream import GlobalOrder, ShardedStream, make_loader
from ldm_ddp.data.transforms import ImageTransform

N = 18
SOURCES = ["shapes", "folder", "parquet", "webdataset", "hf", "hf_stream", "shards"]


def write_tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, __import__("io").BytesIO(data))


def make_folder(root) -> str:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(N):
        (root / f"img_{i:02d}.png").write_bytes(png(10 + i))
        rows.append({"file_name": f"img_{i:02d}.png", "text": f"image {i}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root)


def build(kind: str, root) -> DataConfig:
    """A DataConfig for `kind` over N samples (image i is 10 + i px wide, caption "image i")."""
    if kind == "shapes":
        return DataConfig(source="shapes", shapes_num_samples=N, resolution=32)
    if kind == "folder":
        return DataConfig(source="folder", path=make_folder(root / "folder"))
    if kind == "parquet":  # two files, row groups of 4: uneven shards
        root.mkdir(exist_ok=True)
        for f, rows in enumerate([range(10), range(10, N)]):
            table = pa.table({"image": [png(10 + i) for i in rows], "text": [f"image {i}" for i in rows]})
            pq.write_table(table, root / f"part-{f}.parquet", row_group_size=4)
        return DataConfig(source="parquet", path=str(root), shuffle_window=2)
    if kind == "webdataset":  # shards of 5, 1 and 12 samples
        (root / "wds").mkdir(parents=True)
        bounds = [0, 5, 6, N]
        for s in range(3):
            members = {}
            for i in range(bounds[s], bounds[s + 1]):
                members[f"s{i:03d}.png"], members[f"s{i:03d}.txt"] = png(10 + i), f"image {i}".encode()
            write_tar(root / "wds" / f"shards-{s:03d}.tar", members)
        return DataConfig(source="webdataset", path=str(root / "wds" / "shards-{000..002}.tar"),
                          shuffle_window=2)
    if kind in ("hf", "hf_stream"):
        features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
        data = {"image": [{"bytes": png(10 + i), "path": None} for i in range(N)],
                "text": [f"image {i}" for i in range(N)]}
        datasets.Dataset.from_dict(data, features=features).save_to_disk(str(root / "hf"))
        return DataConfig(source="hf", path=str(root / "hf"), hf_streaming=kind == "hf_stream")
    if kind == "shards":  # shards of 4 samples (the last has 2), converted from a folder
        folder = build("folder", root)
        make_shards(build_source(folder), str(root / "shards"), shard_size=4, log=lambda _: None)
        return DataConfig(source="shards", path=str(root / "shards"), shuffle_window=2)
    raise ValueError(kind)


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict:
    return {kind: build(kind, tmp_path_factory.mktemp(kind)) for kind in SOURCES}


def consume(cfg, world, batch, accum, num_workers, steps, start_step=0, buckets=None) -> dict[int, tuple]:
    """{global position: (key, caption, image)} for `steps` optimizer steps of every rank, from start_step."""
    seen = {}
    for rank in range(world):
        stream = ShardedStream(build_source(cfg), tokenize, R, batch, accum, rank, world, cfg.seed,
                               start_step,
                               ImageTransform(R, crop="random", random_flip=True), cfg.shuffle_window,
                               buckets=buckets)
        loader = make_loader(stream, num_workers, prefetch_batches=2, pin_memory=False)
        for b in itertools.islice(iter(loader), steps * accum):
            for position, key, caption, image in zip(stream.positions(b["k"]), b["keys"], b["captions"],
                                                     b["images"]):
                assert position not in seen, f"position {position} delivered twice"
                seen[position] = (key, caption, image)
    return seen


@pytest.fixture(scope="module")
def reference(configs) -> dict:
    """Two epochs of each source read by one process without workers: the order every split must give."""
    return {kind: consume(cfg, 1, 6, 1, 0, steps=2 * N // 6) for kind, cfg in configs.items()}


def assert_same(seen: dict, expected: dict):
    for position, (key, caption, image) in seen.items():
        assert (key, caption) == expected[position][:2], position
        assert torch.equal(image, expected[position][2]), position


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("kind", SOURCES)
def test_each_source_delivers_every_sample_once_per_epoch_in_the_global_order(configs, reference, kind, world,
                                                                             num_workers):
    batch = 3 if world < 4 else 1  # G = 3, 6 or 4 images per step
    steps = 2 * N // (batch * world)  # two epochs
    seen = consume(configs[kind], world, batch, 1, num_workers, steps)
    assert sorted(seen) == list(range(2 * N))
    ident = 1 if kind == "hf_stream" else 0  # a stream's keys name positions; its captions are unique here
    for epoch in range(2):
        # each sample once per epoch
        assert len({seen[p][ident] for p in range(epoch * N, (epoch + 1) * N)}) == N
    assert_same(seen, reference[kind])


@pytest.mark.parametrize("kind", SOURCES)
def test_resume_at_random_steps_continues_the_uninterrupted_stream(configs, reference, kind):
    rng = np.random.default_rng(SOURCES.index(kind))
    for start_step in sorted(rng.choice(np.arange(1, 5), size=2, replace=False)):
        # G = 4, grad accum 2
        resumed = consume(configs[kind], 2, 1, 2, 2, steps=1, start_step=int(start_step))
        assert sorted(resumed) == list(range(4 * start_step, 4 * start_step + 4))
        assert_same(resumed, reference[kind])


@pytest.mark.parametrize("kind", ["shards", "hf_stream", "webdataset"])
def test_elastic_resume_two_then_one_then_four_ranks_continues_one_sequence(configs, reference, kind):
    cfg = configs[kind]  # G = 12 images per step throughout; three steps are the reference's two epochs
    seen = consume(cfg, 2, 6, 1, 2, steps=1)  # step 0 on two ranks
    seen |= consume(cfg, 1, 6, 2, 0, steps=1, start_step=1)  # step 1 on one rank, grad accum 2
    seen |= consume(cfg, 4, 3, 1, 2, steps=1, start_step=2)  # step 2 on four ranks
    assert sorted(seen) == list(range(2 * N))  # no position twice (consume checks), none skipped
    assert_same(seen, reference[kind])


def test_two_level_shuffle_reads_a_window_of_shards_and_reshuffles_each_epoch():
    sizes = [5, 1, 9, 4, 7, 3]
    starts = np.cumsum([0] + sizes)
    order = GlobalOrder(sum(sizes), seed=3, shard_sizes=sizes, window=2)
    epochs = [[order.index(g) for g in range(e * 29, (e + 1) * 29)] for e in range(3)]
    assert all(sorted(e) == list(range(29)) for e in epochs)  # a permutation per epoch
    assert len({tuple(e) for e in epochs}) == 3  # reshuffled every epoch
    again = GlobalOrder(sum(sizes), seed=3, shard_sizes=sizes, window=2)
    # pure function
    assert [again.index(g) for g in reversed(range(87))] == [i for e in epochs for i in e][::-1]
    for e in epochs:
        # Cut the epoch where the shards met so far are complete: every piece spans at most 2 whole shards.
        shards = [int(np.searchsorted(starts, i, side="right")) - 1 for i in e]
        pieces, begin = [], 0
        for end in range(1, 30):
            met = set(shards[begin:end])
            if end - begin == sum(sizes[s] for s in met):
                pieces.append(met)
                begin = end
        assert begin == 29 and all(len(p) <= 2 for p in pieces)
        # samples mix in a window
        assert set().union(*pieces) == set(range(6)) and any(len(p) == 2 for p in pieces)
    assert GlobalOrder(29, seed=3, shard_sizes=sizes, window=0).window == len(sizes)  # 0: one window of all


@pytest.mark.slow
def test_shards_and_sources_read_through_fsspec_urls(configs, reference):
    for kind in ("shards", "folder", "parquet", "webdataset"):
        cfg = configs[kind]
        url = DataConfig(**{**vars(cfg), "path": "file://" + cfg.path})
        seen = consume(url, 2, 3, 1, 2, steps=2)
        keys = lambda s: [s[p][1] for p in sorted(s)]  # noqa: E731
        assert keys(seen) == keys(reference[kind])[:12], kind
        assert all(torch.equal(seen[p][2], reference[kind][p][2]) for p in seen)


def test_shards_in_memory_filesystem(configs):
    """A non-local filesystem (fsspec memory://) holds the shard set: index, listing and byte ranges."""
    from fsspec.core import url_to_fs
    fs, _ = url_to_fs("memory://")
    local = configs["shards"].path
    for name in os.listdir(local):
        with open(os.path.join(local, name), "rb") as f:
            fs.pipe(f"/set/{name}", f.read())
    on_disk = build_source(configs["shards"])
    in_memory = build_source(DataConfig(source="shards", path="memory://set"))
    assert len(in_memory) == len(on_disk) and in_memory.fingerprint() == on_disk.fingerprint()
    assert ([in_memory[i]["caption"] for i in range(len(on_disk))]
            == [on_disk[i]["caption"] for i in range(len(on_disk))])


@pytest.mark.parametrize("kind", ["shards", "webdataset"])
def test_an_unreadable_shard_stops_with_its_name_or_is_skipped_alike(configs, tmp_path, kind):
    import shutil
    cfg = configs[kind]
    copy = tmp_path / kind
    src = cfg.path if kind == "shards" else os.path.dirname(cfg.path)
    shutil.copytree(src, copy)
    victim = copy / ("shard-000001.tar" if kind == "shards" else "shards-001.tar")
    victim.write_bytes(victim.read_bytes()[:700])  # truncated: the header scan or the size check fails
    path = str(copy) if kind == "shards" else str(copy / "shards-{000..002}.tar")
    with pytest.raises(ConfigError, match=victim.name) as err:
        build_source(DataConfig(**{**vars(cfg), "path": path}))
    assert "\n" not in str(err.value) and "data.bad_shard" in str(err.value)
    skipping = build_source(DataConfig(**{**vars(cfg), "path": path, "bad_shard": "skip"}))
    whole = build_source(cfg)
    assert len(skipping) < len(whole) and skipping.fingerprint() != whole.fingerprint()
    assert (skipping.fingerprint()
            == build_source(DataConfig(**{**vars(cfg), "path": path, "bad_shard": "skip"})).fingerprint())


# Image i is 10 + i px wide and 9 high: widths 10-12 go to the square bucket, 13-22 to 2:1, 23-27 to 3:1
# (3, 10 and 5 samples; with micro-batches of 3, an epoch leaves out 0 + 1 + 2 of them and holds 15).
BUCKETS = [(8, 8), (16, 8), (24, 8)]
BUCKETED = ["folder", "parquet", "webdataset", "hf", "shards"]
EPOCH = 15


@pytest.fixture(scope="module")
def bucketed_reference(configs) -> dict:
    return {kind: consume(configs[kind], 1, 3, 1, 0, steps=12, buckets=BUCKETS) for kind in BUCKETED}


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("kind", BUCKETED)
def test_bucketed_order_is_one_global_order_of_full_one_bucket_batches(configs, bucketed_reference, kind,
                                                                      world, num_workers):
    seen = consume(configs[kind], world, 3, 1, num_workers, steps=-(-2 * EPOCH // (3 * world)),
                   buckets=BUCKETS)
    assert_same(seen, bucketed_reference[kind])
    for epoch in range(2):  # each kept sample once per epoch; the left out ones are each bucket's remainder
        keys = [seen[p][0] for p in range(epoch * EPOCH, (epoch + 1) * EPOCH)]
        assert len(set(keys)) == EPOCH
        shapes = [tuple(seen[p][2].shape[1:]) for p in range(epoch * EPOCH, (epoch + 1) * EPOCH)]
        assert sorted(set(shapes)) == [(8, 8), (8, 16), (8, 24)]
        assert [shapes.count(s) for s in [(8, 8), (8, 16), (8, 24)]] == [3, 9, 3]
    for start in range(0, 2 * EPOCH, 3):  # every micro-batch is of one bucket
        assert len({tuple(seen[p][2].shape) for p in range(start, start + 3)}) == 1


@pytest.mark.parametrize("kind", BUCKETED)
def test_bucketed_resume_and_elastic_resume_continue_one_sequence(configs, bucketed_reference, kind):
    cfg = configs[kind]  # G = 6: two ranks, then one with grad accum 2, then two again (micro-batches of 3)
    seen = consume(cfg, 2, 3, 1, 2, steps=1, buckets=BUCKETS)
    seen |= consume(cfg, 1, 3, 2, 0, steps=2, start_step=1, buckets=BUCKETS)
    seen |= consume(cfg, 2, 3, 1, 2, steps=2, start_step=3, buckets=BUCKETS)
    assert sorted(seen) == list(range(30))
    assert_same(seen, bucketed_reference[kind])


def test_buckets_need_a_source_read_by_index(configs):
    with pytest.raises(ConfigError, match="data.buckets: a source read by index"):
        consume(configs["hf_stream"], 1, 3, 1, 0, steps=1, buckets=BUCKETS)
