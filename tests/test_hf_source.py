"""The Hugging Face `datasets` source: save_to_disk and local-file datasets, Image feature and raw bytes,
caption lists, bad rows through the stream, splits, streaming refused, one-line config errors. Never the
hub."""

import os

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before `datasets` is imported: no hub, ever
os.environ["HF_HUB_OFFLINE"] = "1"

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from source_helpers import png, run

from ldm_ddp.config import ConfigError, DataConfig, load_config
from ldm_ddp.data.hf import HFDatasetSource, HFStreamSource
from ldm_ddp.data.sources import build_source

N = 12


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """Offline and a private cache for `load_dataset` (never the user's ~/.cache, never the network)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache", raising=False)


def saved(root, images=None, captions=None, image_feature=True, splits=None, **extra):
    """A save_to_disk folder of N rows (image i is 10 + i px wide); `splits` names -> a DatasetDict."""
    images = images if images is not None else [png(10 + i) for i in range(N)]
    captions = captions if captions is not None else [f"image {i}" for i in range(N)]
    if image_feature:
        features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                      **{k: datasets.Value("string") for k in extra}})
        data = {"image": [{"bytes": b, "path": None} for b in images], "text": captions, **extra}
    else:
        features = None
        data = {"image": images, "text": captions, **extra}
    if isinstance(captions[0], list):
        features = features and datasets.Features({**features,
                                                   "text": datasets.Sequence(datasets.Value("string"))})
    ds = datasets.Dataset.from_dict(data, features=features)
    if splits:
        ds = datasets.DatasetDict({name: ds for name in splits})
    ds.save_to_disk(str(root))
    return str(root)


def test_save_to_disk_random_access_keys_and_fingerprint(tmp_path):
    path = saved(tmp_path / "ds", other=[f"x{i}" for i in range(N)])
    source = HFDatasetSource(path)
    assert len(source) == N and [source.key(i) for i in range(N)] == [f"train/{i}" for i in range(N)]
    for i in [11, 0, 5, 3, 10]:
        sample = source[i]
        assert sample["image"].size == (10 + i, 9) and sample["caption"] == f"image {i}"
        assert sample["key"] == f"train/{i}"
    with pytest.raises(IndexError):
        source[N]
    assert (source.fingerprint() == HFDatasetSource(path).fingerprint()
            and source.fingerprint().startswith("hf:n=12:"))
    assert (HFDatasetSource(saved(tmp_path / "other", captions=["y"] * N)).fingerprint()
            != source.fingerprint())


def test_raw_bytes_column_and_configured_names(tmp_path):
    path = saved(tmp_path / "ds", image_feature=False)
    assert datasets.load_from_disk(path).features["image"] == datasets.Value("binary")
    source = build_source(DataConfig(source="hf", path=path))
    assert isinstance(source, HFDatasetSource) and source[4]["image"].size == (14, 9)
    ds = datasets.Dataset.from_dict({"jpg": [png(12), png(13)], "caption": ["one", "two"]})
    ds.save_to_disk(str(tmp_path / "named"))
    cfg = DataConfig(source="hf", path=str(tmp_path / "named"), image_column="jpg", caption_column="caption")
    source = build_source(cfg)
    assert [source[i]["image"].size[0] for i in range(2)] == [12, 13] and source[1]["caption"] == "two"


def test_image_feature_is_not_decoded_by_datasets(tmp_path):
    source = HFDatasetSource(saved(tmp_path / "ds"))
    assert source.dataset.features["image"] == datasets.Image(decode=False)
    assert isinstance(source.dataset[0]["image"], dict)  # bytes reach the source; it decodes them itself


def test_dataset_dict_splits_and_split_errors(tmp_path):
    path = saved(tmp_path / "dd", splits=["train", "validation"])
    source = HFDatasetSource(path, split="validation")
    assert source.key(3) == "validation/3" and source[3]["caption"] == "image 3"
    assert source.fingerprint() != HFDatasetSource(path).fingerprint()
    with pytest.raises(ConfigError,
                       match=r"data.hf_split: no split 'test' .*\['train', 'validation'\]") as err:
        HFDatasetSource(path, split="test")
    assert "\n" not in str(err.value)


def test_local_parquet_files_through_load_dataset(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    for part, rows in (("a", range(0, 5)), ("b", range(5, 9))):
        pq.write_table(pa.table({"image": [png(10 + i) for i in rows], "text": [f"image {i}" for i in rows]}),
                       folder / f"{part}.parquet")
    source = HFDatasetSource(str(folder))  # a data folder: load_dataset infers the parquet builder
    assert len(source) == 9 and sorted(source[i]["image"].size[0] for i in range(9)) == list(range(10, 19))
    single = HFDatasetSource(str(folder / "b.parquet"))  # one file: the builder from its extension
    assert len(single) == 4 and single[0]["caption"] == "image 5"
    # A copy elsewhere, made later (a node-local copy): the same data, the same fingerprint on every rank.
    import shutil
    copy = tmp_path / "elsewhere" / "pq"
    shutil.copytree(folder, copy)
    os.utime(copy / "a.parquet", (1e9, 1e9))
    assert HFDatasetSource(str(copy)).fingerprint() == source.fingerprint()
    assert (HFDatasetSource(str(copy / "b.parquet")).fingerprint() == single.fingerprint()
            != source.fingerprint())
    with pytest.raises(ConfigError, match=r"data.hf_split: 'test'") as err:
        HFDatasetSource(str(folder), split="test")
    assert "\n" not in str(err.value)


def test_caption_lists_are_drawn_by_seed_and_index(tmp_path):
    choices = ["first", "second", "third", "fourth"]
    path = saved(tmp_path / "ds", images=[png(10)] * 40, captions=[choices + [""]] * 40)
    drawn = [HFDatasetSource(path, seed=0)[i]["caption"] for i in range(40)]
    assert drawn == [HFDatasetSource(path, seed=0)[i]["caption"] for i in range(40)]
    assert set(drawn) == set(choices)  # differs across indices; the empty entry is never drawn
    assert drawn != [HFDatasetSource(path, seed=1)[i]["caption"] for i in range(40)]


def test_config_errors_are_one_line_and_name_the_key(tmp_path):
    path = saved(tmp_path / "ds")
    cases = [
        (dict(path=path, caption_column="caption"), "data.caption_column: no column 'caption'"),
        (dict(path=path, image_column="jpg"), "data.image_column: no column 'jpg'"),
        (dict(path=str(tmp_path / "nowhere")), "data.path: cannot load"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            HFDatasetSource(**kwargs)
        assert "\n" not in str(err.value)
    for streaming in (False, True):  # a hub name, offline: one line, never a hang or a traceback
        with pytest.raises(ConfigError, match="data.path: cannot load some/hub-name") as err:
            build_source(DataConfig(source="hf", path="some/hub-name", hf_streaming=streaming))
        assert "\n" not in str(err.value)


def test_streaming_reads_every_epoch_once_in_a_seeded_shuffle_and_substitutes_bad_rows(tmp_path):
    images = [png(10 + i) for i in range(N)]
    captions = [f"image {i}" for i in range(N)]
    images[4], captions[6] = b"not a png", ""
    path = saved(tmp_path / "ds", images=images, captions=captions)
    source = build_source(DataConfig(source="hf", path=path, hf_streaming=True))
    assert isinstance(source, HFStreamSource) and len(source) == N
    epochs = [[r["captions"] for r in source.records(e)] for e in range(2)]
    assert all(sorted(e) == sorted(captions) for e in epochs) and epochs[0] != epochs[1]  # reshuffled
    assert epochs == [[r["captions"] for r in source.records(e)] for e in range(2)]  # deterministic
    batches = run(source, num_workers=2, world=2, batch=3, steps=4)  # 24 positions: two epochs
    by_position = {p: c for b in batches for p, c in zip(b["positions"], b["captions"])}
    assert sorted(by_position) == list(range(2 * N))
    bad = {b[0] for batch in batches for b in batch["bad"]}
    assert len(bad) == 4  # the unreadable image and the empty caption, once in each epoch
    stream = [c for e in epochs for c in e] + [r["captions"] for r in source.records(2)]
    # row 4's image is unreadable, row 6 has no caption
    good = [c for c in stream if c not in ("", "image 4")]
    for p, caption in by_position.items():  # a bad record is replaced by the next good record of the stream
        assert caption == next(c for c in stream[p:] if c in good)


def test_config_with_hf_and_an_empty_path(tmp_path):
    path = saved(tmp_path / "ds")
    toml = load_config(None, ["--data.source=hf", f"--data.path={path}"]).to_toml()
    assert 'source = "hf"' in toml and 'hf_split = "train"' in toml and "hf_streaming = false" in toml
    with pytest.raises(ConfigError) as err:
        load_config(None, ["--data.source=hf"])
    assert len(str(err.value).splitlines()) == 1 and "data.path" in str(err.value)

