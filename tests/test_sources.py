"""The data-source contract (sources.DataSource): every source build_source makes declares random_access,
latent and has_raw itself and answers len, key, shard_sizes and fingerprint consistently; data code prints
by the is_main it is given, never by asking ldm_ddp.dist."""

import ast
import io
import json
import os
import tarfile
from pathlib import Path

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before `datasets` is imported: no hub, ever

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file
from source_helpers import png

import ldm_ddp.data
from ldm_ddp.config import DataConfig
from ldm_ddp.data.convert import make_shards
from ldm_ddp.data.folder import ImageFolderSource
from ldm_ddp.data.latents import FORMAT, MANIFEST, shard_file
from ldm_ddp.data.sources import DataSource, build_source

N = 6
FLAGS = ("random_access", "latent", "has_raw")


def folder(root: Path, widths=None) -> str:
    root.mkdir(parents=True, exist_ok=True)
    widths = widths or [10 + i for i in range(N)]
    for i, width in enumerate(widths):
        (root / f"img_{i}.png").write_bytes(png(width))
        (root / f"img_{i}.txt").write_text(f"image {i}")
    return str(root)


def tar(path: Path, n: int) -> None:
    with tarfile.open(path, "w") as out:
        for i in range(n):
            for name, data in ((f"s{i}.png", png(10 + i)), (f"s{i}.txt", f"image {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))


def latent_cache(root: Path) -> str:
    """A one-shard cache written by hand (precompute_latents needs a VAE): N samples of zero moments."""
    root.mkdir(parents=True)
    save_file({"moments": torch.zeros(N, 8, 2, 2, dtype=torch.float16),
               "input_ids": torch.zeros(N, 1, 4, dtype=torch.int32),
               "num_captions": torch.ones(N, dtype=torch.int32)},
              str(root / shard_file(0)), metadata={"keys": json.dumps([f"k{i}" for i in range(N)])})
    manifest = {"format": FORMAT, "fingerprint": {}, "num_samples": N, "id": "0123456789abcdef",
                "shards": [{"file": shard_file(0), "count": N}], "made_with": {}}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return str(root)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, DataSource]:
    """One source of each kind over N samples, as build_source makes it."""
    root = tmp_path_factory.mktemp("sources")
    (root / "wds").mkdir()
    tar(root / "wds" / "a.tar", 2)
    tar(root / "wds" / "b.tar", N - 2)
    images, captions = [png(10 + i) for i in range(N)], [f"image {i}" for i in range(N)]
    pq.write_table(pa.table({"image": images, "text": captions}), root / "rows.parquet", row_group_size=4)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    rows = {"image": [{"bytes": b, "path": None} for b in images], "text": captions}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(root / "hf"))
    make_shards(build_source(DataConfig(source="folder", path=folder(root / "folder"))), str(root / "shards"),
                shard_size=4, log=lambda _: None)
    configs = {"shapes": DataConfig(source="shapes", shapes_num_samples=N, resolution=32),
               "folder": DataConfig(source="folder", path=str(root / "folder")),
               "parquet": DataConfig(source="parquet", path=str(root / "rows.parquet")),
               "webdataset": DataConfig(source="webdataset", path=str(root / "wds")),
               "hf": DataConfig(source="hf", path=str(root / "hf")),
               "hf_stream": DataConfig(source="hf", path=str(root / "hf"), hf_streaming=True),
               "shards": DataConfig(source="shards", path=str(root / "shards")),
               "latents": DataConfig(source="latents", path=latent_cache(root / "latents"))}
    return {kind: build_source(cfg) for kind, cfg in configs.items()}


def test_every_source_declares_the_contract_itself(sources):
    for kind, source in sources.items():
        assert isinstance(source, DataSource), kind
        own = vars(type(source))  # declared by the source's class, not inherited from a helper base
        assert all(isinstance(own.get(flag), bool) for flag in FLAGS), kind
        assert {"__len__", "key", "shard_sizes", "fingerprint"} <= own.keys(), kind
    declared = {kind: tuple(getattr(s, flag) for flag in FLAGS) for kind, s in sources.items()}
    image = (True, False, True)  # random access, not latent, raw records
    assert declared == {"shapes": image, "folder": image, "parquet": image, "webdataset": image, "hf": image,
                        "shards": image, "hf_stream": (False, False, False), "latents": (True, True, False)}


def test_what_a_source_declares_it_answers_consistently(sources):
    for kind, source in sources.items():
        assert len(source) == N, kind
        sizes = source.shard_sizes()
        assert sizes is None or (sum(sizes) == N and all(s > 0 for s in sizes)), kind
        assert isinstance(source.fingerprint(), str) and source.fingerprint(), kind
        keys = [source.key(i) for i in range(N)]
        assert len(set(keys)) == N and all(isinstance(k, str) and k for k in keys), kind
        if source.has_raw:
            assert source.raw(1)["key"] == keys[1] and source.raw(1)["image"], kind
        else:
            with pytest.raises(NotImplementedError):
                source.raw(1)
        if source.latent:
            assert source.latent_item(1, False)["key"] == keys[1]
        elif source.random_access:
            assert source[1]["key"] == keys[1], kind
    assert [sources[kind].shard_sizes() for kind in ("webdataset", "parquet", "shards", "latents")] == [
        [2, N - 2], [4, N - 4], [4, N - 4], [N]]
    assert all(sources[kind].shard_sizes() is None for kind in ("shapes", "folder", "hf", "hf_stream"))


def test_a_stream_names_its_records_by_global_position(sources):
    """Without random access, key(i) takes a global position: the name records(epoch) gives that record."""
    stream = sources["hf_stream"]
    assert [r["key"] for r in stream.records(1)] == [stream.key(N + n) for n in range(N)]
    with pytest.raises(NotImplementedError):
        stream[0]


def test_sources_print_by_the_is_main_they_are_given(tmp_path, capsys):
    """A skipped shard and left-out images are reported once per run, by the process told it is main."""
    tar(tmp_path / "wds-0.tar", 2)
    (tmp_path / "wds-1.tar").write_bytes(b"not a tar")
    broken = DataConfig(source="webdataset", path=str(tmp_path / "wds-{0..1}.tar"), bad_shard="skip")
    small = folder(tmp_path / "small", widths=[4, 20, 20])  # 4 x 9 px is under min_size=8
    for build, line in ((lambda is_main: build_source(broken, is_main=is_main), "skipping shard wds-1.tar"),
                        (lambda is_main: ImageFolderSource(small, min_size=8, is_main=is_main),
                         "img_0.png (image smaller than min_size=8)")):
        assert build(False).fingerprint() == build(True).fingerprint()
        printed = capsys.readouterr().out
        assert printed.count(line) == 1, printed


def test_every_source_says_its_size_and_what_it_left_out_at_start(sources, tmp_path, capsys):
    for kind, source in sources.items():
        assert "where" in vars(type(source)), kind
        assert source.start_line() == f"data: {source.where()}: {N} samples", kind
    links = Path(folder(tmp_path / "links"))
    (links / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (links / "moved.jpg").symlink_to(tmp_path / "moved" / "x.jpg")
    (links / "loop.png").symlink_to(links / "loop.png")
    cfg = DataConfig(source="folder", path=str(links))
    build_source(cfg, is_main=False)
    assert capsys.readouterr().out == ""
    build_source(cfg)
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == f"data: folder {links}: {N} samples (left out: 2 dangling symlinks, 1 symlink loop)"
    assert len(printed) == 2 and "moved.jpg (dangling symlink)" in printed[0]  # the names, one line
    (links / "loop.png").unlink()
    (links / "notes.png").write_text("not an image")
    (links / "notes.txt").write_text("a caption")
    make_shards(build_source(cfg), str(tmp_path / "shards"), shard_size=4, log=lambda _: None)
    tar(tmp_path / "wds-0.tar", 2)
    (tmp_path / "wds-1.tar").write_bytes(b"not a tar")
    wds = DataConfig(source="webdataset", path=str(tmp_path / "wds-{0..1}.tar"), bad_shard="skip")
    shards = DataConfig(source="shards", path=str(tmp_path / "shards"))
    assert [build_source(c).start_line() for c in (shards, wds)] == [
        f"data: shards {shards.path}: {N} samples (left out: 1 sample skipped when the set was made "
        "(skipped.jsonl))",
        f"data: webdataset {wds.path}: 2 samples (left out: 1 shard skipped (data.bad_shard=skip))"]


def test_data_code_never_imports_dist():
    """The trainer passes is_main down (build_source(cfg, is_main=dist.is_main())): ldm_ddp.data stays usable
    by tools and tests with no process group, and one module owns torch.distributed (dist.py)."""
    for module in Path(ldm_ddp.data.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ImportFrom):  # from .. import dist, from ..dist import x
                assert "dist" not in [node.module] + [alias.name for alias in node.names], module.name
            elif isinstance(node, ast.Import):
                assert not any(alias.name.endswith(".dist") for alias in node.names), module.name
