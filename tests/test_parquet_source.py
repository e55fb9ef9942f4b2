"""The Parquet source: footer index, random access, caption lists, bad rows through the stream, rank x worker
split."""


import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from source_helpers import R, png, run

from ldm_ddp.config import ConfigError, DataConfig, load_config
from ldm_ddp.data.parquet import ParquetSource
from ldm_ddp.data.sources import build_source

SIZES = {"a": 5, "b": 1, "c": 9}  # uneven files: row groups and files cross micro-batch boundaries


def write(path, images: list, captions: list, image_column="image", caption_column="text", row_group_size=2):
    pq.write_table(pa.table({image_column: images, caption_column: captions}), path,
                   row_group_size=row_group_size)


def uneven(root, bad=False) -> list[str]:
    """Files a, b, c of 5, 1 and 9 rows; image i is (10 + i) px wide. With `bad`, three bad rows;
    -> their keys."""
    n = 0
    for stem, rows in SIZES.items():
        images = [png(10 + n + r) for r in range(rows)]
        captions = [f"image {n + r}" for r in range(rows)]
        if bad and stem == "c":
            images[2], images[4], captions[6] = b"not a png", png(30)[:40], "  "
        write(root / f"{stem}.parquet", images, captions)
        n += rows
    return ["c/2", "c/4", "c/6"] if bad else []


def test_index_keys_and_random_access(tmp_path):
    uneven(tmp_path)
    source = ParquetSource(str(tmp_path))
    assert len(source) == 15 and source.row_counts == [5, 1, 9]
    keys = [source.key(i) for i in range(15)]
    assert keys == [f"a/{r}" for r in range(5)] + ["b/0"] + [f"c/{r}" for r in range(9)]
    for i in [14, 0, 5, 6, 3, 4, 13]:  # random access across files and row groups
        sample = source[i]
        assert (sample["image"].size == (10 + i, 9) and sample["caption"] == f"image {i}"
                and sample["key"] == keys[i])
    files = [str(tmp_path / f"{s}.parquet") for s in "cab"]
    for path in [str(tmp_path / "*.parquet"), ",".join(files)]:  # glob and list: same sorted index
        other = ParquetSource(path)
        assert [other.key(i) for i in range(15)] == keys and other.fingerprint() == source.fingerprint()
    write(tmp_path / "b.parquet", [png(3)] * 2, ["x", "y"])  # one more row: a new fingerprint
    assert ParquetSource(str(tmp_path)).fingerprint() != source.fingerprint()


def test_struct_column_and_configured_names(tmp_path):
    images = [{"bytes": png(12), "path": None}, {"bytes": png(13), "path": "x.png"}]
    write(tmp_path / "hf.parquet", images, ["one", "two"], image_column="jpg", caption_column="caption")
    cfg = DataConfig(source="parquet", path=str(tmp_path), image_column="jpg", caption_column="caption")
    source = build_source(cfg)
    assert [source[i]["image"].size[0] for i in range(2)] == [12, 13] and source[1]["caption"] == "two"
    with pytest.raises(ConfigError, match="data.image_column: no column 'image'"):
        ParquetSource(str(tmp_path), caption_column="caption")


def test_caption_lists_are_drawn_by_seed_and_index(tmp_path):
    choices = ["first", "second", "third", "fourth"]
    write(tmp_path / "m.parquet", [png(10)] * 40, [choices + [""]] * 40, row_group_size=16)
    drawn = [ParquetSource(str(tmp_path), seed=0)[i]["caption"] for i in range(40)]
    assert drawn == [ParquetSource(str(tmp_path), seed=0)[i]["caption"] for i in range(40)]
    assert set(drawn) == set(choices)  # differs across indices; the empty entry is never drawn
    assert drawn != [ParquetSource(str(tmp_path), seed=1)[i]["caption"] for i in range(40)]


def test_unreadable_file_and_missing_path_fail_at_construction(tmp_path):
    uneven(tmp_path)
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ConfigError, match=r"data.path: cannot read .*broken.parquet") as err:
        ParquetSource(str(tmp_path))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"data.path: cannot read .*zz.parquet as Parquet \(no such file\)"):
        ParquetSource(str(tmp_path / "a.parquet") + "," + str(tmp_path / "zz.parquet"))
    with pytest.raises(ConfigError, match="data.path: no .parquet files"):
        ParquetSource(str(tmp_path / "none-*.parquet"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_rows_are_replaced_and_named_through_the_stream(tmp_path, num_workers):
    bad = uneven(tmp_path, bad=True)
    batches = run(ParquetSource(str(tmp_path)), num_workers, steps=10)  # 30 positions: two epochs
    assert all(b["images"].shape == (3, 3, R, R) and len(b["captions"]) == 3 for b in batches)
    assert {entry[0] for b in batches for entry in b["bad"]} == set(bad)
    assert not set(bad) & {key for b in batches for key in b["keys"]}
    again = run(ParquetSource(str(tmp_path)), num_workers=2 - num_workers, steps=10)
    assert [b["keys"] for b in again] == [b["keys"] for b in batches]
    assert [b["bad"] for b in again] == [b["bad"] for b in batches]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(again, batches))


def test_two_ranks_two_workers_cover_each_epoch_once(tmp_path):
    uneven(tmp_path)
    source = ParquetSource(str(tmp_path))
    batches = run(source, num_workers=2, world=2, batch=3, steps=5)  # G = 6: 60 positions, 4 epochs
    assert [b["k"] for b in batches] == [0, 1, 2, 3, 4] * 2  # in order from both workers
    by_position = {p: key for b in batches for p, key in zip(b["positions"], b["keys"])}
    assert sorted(by_position) == list(range(30))
    all_keys = sorted(source.key(i) for i in range(15))
    for epoch in range(2):
        assert sorted(by_position[p] for p in range(15 * epoch, 15 * epoch + 15)) == all_keys


def test_config_with_parquet_and_a_missing_path(tmp_path):
    # In-process (the CLI's exit-2 path is covered once in test_config.py / test_folder_source.py).
    uneven(tmp_path)
    cfg = load_config(None, ["--data.source=parquet", f"--data.path={tmp_path}"])
    assert 'source = "parquet"' in cfg.to_toml() and 'image_column = "image"' in cfg.to_toml()
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["--data.source=parquet", f"--data.path={missing}"])
    assert (len(str(err.value).splitlines()) == 1 and "data.path" in str(err.value)
            and str(missing) in str(err.value))

