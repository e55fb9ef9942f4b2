"""The WebDataset source: brace expansion, tar header index, random access, bad samples and the rank x worker
split."""

import io
import json
import tarfile

import pytest
import torch
from source_helpers import R, png, run

from ldm_ddp.config import ConfigError, DataConfig, load_config
from ldm_ddp.data.sources import build_source
from ldm_ddp.data.webdataset import WebDatasetSource, expand_braces

SIZES = [5, 1, 9]  # uneven shards


def write_shard(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def shards(root, bad=False) -> list[str]:
    """shards-000..002 of 5, 1 and 9 samples; sample i is (10 + i) px wide. With `bad`, four bad ones;
    -> their keys."""
    n = 0
    for s, count in enumerate(SIZES):
        members = {}
        for r in range(count):
            key = f"dir/s{n + r:03d}"
            members[f"{key}.png"] = png(10 + n + r)
            if r % 2:  # captions alternate between .txt and .json
                members[f"{key}.txt"] = f"image {n + r}".encode()
            else:
                members[f"{key}.json"] = json.dumps({"text": f"image {n + r}", "width": 10 + n + r}).encode()
        members["dir/README.md"] = b"not a sample"
        if bad and s == 2:
            members["dir/s008.png"], members["dir/s010.png"] = b"junk", png(40)[:40]
            members["dir/s012.txt"] = b"   "
            del members["dir/s013.png"]
        write_shard(root / f"shards-{s:03d}.tar", members)
        n += count
    return ["shards-002/dir/s008", "shards-002/dir/s010", "shards-002/dir/s012",
            "shards-002/dir/s013"] if bad else []


def test_brace_expansion():
    assert expand_braces("/d/s-{000..003}.tar") == [f"/d/s-{i:03d}.tar" for i in range(4)]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("x{a,{b,c}}y") == ["xay", "xby", "xcy"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ConfigError, match="data.path: unbalanced"):
        expand_braces("s-{0..3.tar")


def test_index_keys_and_random_access(tmp_path):
    shards(tmp_path)
    source = WebDatasetSource(str(tmp_path / "shards-{000..002}.tar"))
    assert len(source) == 15 and source.member_counts == [11, 3, 19]  # README.md counted, not indexed
    keys = [source.key(i) for i in range(15)]
    assert keys[:6] == [f"shards-000/dir/s{i:03d}" for i in range(5)] + ["shards-001/dir/s005"]
    for i in [14, 0, 5, 6, 3, 4, 13]:
        sample = source[i]
        assert (sample["image"].size == (10 + i, 9) and sample["caption"] == f"image {i}"
                and sample["key"] == keys[i])
    folder = build_source(DataConfig(source="webdataset", path=str(tmp_path)))
    assert [folder.key(i) for i in range(15)] == keys and folder.fingerprint() == source.fingerprint()
    assert WebDatasetSource(str(tmp_path / "shards-{000..001}.tar")).fingerprint() != source.fingerprint()


def test_json_caption_field_and_lists(tmp_path):
    members = {}
    for i in range(30):
        members[f"k{i}.jpg"] = png(10)
        record = {"caption": ["one", "two", "three"]} if i % 2 else {"alt": f"alt {i}"}
        members[f"k{i}.json"] = json.dumps(record).encode()
    write_shard(tmp_path / "one.tar", members)
    source = WebDatasetSource(str(tmp_path / "one.tar"), caption_column="alt", seed=3)
    assert source[0]["caption"] == "alt 0"  # the configured field
    drawn = [source[i]["caption"] for i in range(1, 30, 2)]  # no "alt": falls back to "caption"
    assert set(drawn) == {"one", "two", "three"}
    assert drawn == [WebDatasetSource(str(tmp_path / "one.tar"), "alt", seed=3)[i]["caption"]
                     for i in range(1, 30, 2)]


def test_missing_and_unreadable_shards_fail_at_construction(tmp_path):
    shards(tmp_path)
    with pytest.raises(ConfigError, match=r"data.path: cannot read .*shards-003.tar .*no such file"):
        WebDatasetSource(str(tmp_path / "shards-{000..003}.tar"))
    (tmp_path / "gz.tar").write_bytes(b"\x1f\x8b compressed or junk" * 40)
    with pytest.raises(ConfigError, match=r"data.path: cannot read .*gz.tar"):
        WebDatasetSource(str(tmp_path / "gz.tar"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_replaced_and_named_through_the_stream(tmp_path, num_workers):
    bad = shards(tmp_path, bad=True)
    path = str(tmp_path / "shards-{000..002}.tar")
    batches = run(WebDatasetSource(path), num_workers, steps=10)  # 30 positions: two epochs
    assert all(b["images"].shape == (3, 3, R, R) and len(b["captions"]) == 3 for b in batches)
    assert {entry[0] for b in batches for entry in b["bad"]} == set(bad)
    assert not set(bad) & {key for b in batches for key in b["keys"]}
    again = run(WebDatasetSource(path), num_workers=2 - num_workers, steps=10)
    assert [b["keys"] for b in again] == [b["keys"] for b in batches]
    assert [b["bad"] for b in again] == [b["bad"] for b in batches]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(again, batches))


def test_two_ranks_two_workers_cover_each_epoch_once(tmp_path):
    shards(tmp_path)
    source = WebDatasetSource(str(tmp_path))
    batches = run(source, num_workers=2, world=2, batch=3, steps=5)
    assert [b["k"] for b in batches] == [0, 1, 2, 3, 4] * 2
    by_position = {p: key for b in batches for p, key in zip(b["positions"], b["keys"])}
    assert sorted(by_position) == list(range(30))
    for epoch in range(2):
        assert (sorted(by_position[p] for p in range(15 * epoch, 15 * epoch + 15))
                == sorted(map(source.key, range(15))))


def test_config_with_webdataset_and_a_missing_path(tmp_path):
    shards(tmp_path)
    pattern = str(tmp_path / "shards-{000..002}.tar")
    assert load_config(None, ["--data.source=webdataset", f"--data.path={pattern}"]).data.path == pattern
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["--data.source=webdataset", f"--data.path={missing}"])
    assert (len(str(err.value).splitlines()) == 1 and "data.path" in str(err.value)
            and str(missing) in str(err.value))

