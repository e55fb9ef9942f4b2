"""The image-folder source: caption layouts, index order, fingerprint, min_size, bad files through the
stream."""

import csv
import json
import unicodedata

import numpy as np
import pytest
import torch
from PIL import Image
from source_helpers import R, run

from ldm_ddp.config import ConfigError, DataConfig
from ldm_ddp.data.folder import ImageFolderSource
from ldm_ddp.data.sources import build_source


def save(path, size=(12, 10), colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.mark.parametrize("layout", ["jsonl", "csv", "txt"])
# -sig: with a byte-order mark, as Excel writes CSV
@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig"])
def test_caption_layouts_and_keys(tmp_path, layout, encoding):
    names = {"b.png": "a red thing", "a.jpg": "another", "sub/c.png": "in a subfolder"}
    for name in names:
        save(tmp_path / name)
    save(tmp_path / ".hidden" / "x.png")  # hidden folders are not indexed
    column = "caption" if layout == "csv" else "text"
    if layout == "jsonl":
        (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": c}) + "\n"
                                                         for n, c in names.items()), encoding=encoding)
    elif layout == "csv":
        with open(tmp_path / "metadata.csv", "w", newline="", encoding=encoding) as f:
            writer = csv.writer(f)
            writer.writerow(["file_name", "caption"])
            writer.writerows(names.items())
    else:
        for name, caption in names.items():
            (tmp_path / name).with_suffix(".txt").write_text(caption + "\n", encoding=encoding)
    source = build_source(DataConfig(source="folder", path=str(tmp_path), caption_column=column))
    assert [source.key(i) for i in range(len(source))] == ["a.jpg", "b.png", "sub/c.png"]
    for i in range(len(source)):
        sample = source[i]
        assert sample["key"] == source.key(i) and sample["caption"] == names[sample["key"]]
        assert sample["image"].size == (12, 10)


def test_metadata_problems_fail_at_construction(tmp_path):
    save(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,hi\n")
    with pytest.raises(ConfigError, match="data.caption_column"):
        ImageFolderSource(str(tmp_path), caption_column="caption")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "hi"}\n')
    with pytest.raises(ConfigError, match="both metadata.jsonl and metadata.csv"):
        ImageFolderSource(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="data.path: no images"):
        ImageFolderSource(str(tmp_path / "empty"))


@pytest.mark.parametrize("layout", ["jsonl", "csv"])
def test_a_metadata_row_that_is_not_utf8_is_left_out_alone(tmp_path, layout, capsys):
    rows = [(b"a.png", b"fine"), (b"b.png", "caf\xe9".encode("latin-1")), (b"c.png", b"also fine")]
    for name, _ in rows:
        save(tmp_path / name.decode())
    if layout == "jsonl":
        lines = [b'{"file_name": "%s", "text": "%s"}' % row for row in rows]
    else:
        lines = [b"file_name,text"] + [b"%s,%s" % row for row in rows]
    (tmp_path / f"metadata.{layout}").write_bytes(b"\n".join(lines) + b"\n")
    source = build_source(DataConfig(source="folder", path=str(tmp_path)))
    bad_row = f"metadata.{layout} line {2 if layout == 'jsonl' else 3}"  # the csv header is line 1
    assert source.left_out_files == {bad_row: "metadata row{s} not valid UTF-8"}
    printed = capsys.readouterr().out
    assert f"{bad_row} (metadata row not valid UTF-8)" in printed
    assert "3 samples (left out: 1 metadata row not valid UTF-8)" in printed
    assert [source[0]["caption"], source[2]["caption"]] == ["fine", "also fine"]
    with pytest.raises(ValueError, match="no row in metadata"):
        source[1]


@pytest.mark.parametrize("on_disk, in_metadata", [("NFD", "NFC"), ("NFC", "NFD")])
def test_file_names_match_the_metadata_under_unicode_normalization(tmp_path, on_disk, in_metadata):
    """macOS writes names decomposed (NFD), most tools compose them (NFC): the same name either way."""
    name = "café/crème brûlée.png"
    save(tmp_path / unicodedata.normalize(on_disk, name))
    row = {"file_name": unicodedata.normalize(in_metadata, name), "text": "dessert"}
    (tmp_path / "metadata.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    source = ImageFolderSource(str(tmp_path))
    assert source.key(0) == unicodedata.normalize(on_disk, name)  # the name on disk, which opens the file
    assert source[0]["caption"] == "dessert" and source[0]["image"].size == (12, 10)


def test_order_is_sorted_and_the_fingerprint_tracks_files(tmp_path):
    for name in ["z.png", "m.png", "a.png", "k/b.png"]:
        save(tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text("caption")
    first, second = ImageFolderSource(str(tmp_path)), ImageFolderSource(str(tmp_path))
    assert first.files == second.files == ["a.png", "k/b.png", "m.png", "z.png"]
    assert first.fingerprint() == second.fingerprint()
    save(tmp_path / "m.png", size=(30, 30), colour=(1, 2, 3))  # same name, new content
    changed = ImageFolderSource(str(tmp_path))
    (tmp_path / "m.txt").write_text("a longer caption")
    recaptioned = ImageFolderSource(str(tmp_path))
    assert len({first.fingerprint(), changed.fingerprint(), recaptioned.fingerprint()}) == 3


def test_min_size_filters_by_the_shorter_side(tmp_path):
    save(tmp_path / "small.png", size=(40, 10))
    save(tmp_path / "big.png", size=(20, 32))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert ImageFolderSource(str(tmp_path)).files == ["big.png", "broken.png", "small.png"]
    # Unreadable headers stay indexed: they fail (named) when loaded, not silently at index time.
    assert ImageFolderSource(str(tmp_path), min_size=16).files == ["big.png", "broken.png"]
    assert (ImageFolderSource(str(tmp_path), min_size=16).fingerprint()
            != ImageFolderSource(str(tmp_path)).fingerprint())


def test_symlinked_folders_are_followed_once_and_broken_links_left_out(tmp_path):
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    for folder, name in ((root, "a.png"), (root, "sub/b.png"), (elsewhere, "c.png")):
        save(folder / name)
        (folder / name).with_suffix(".txt").write_text(f"caption of {name}")
    (root / "linked").symlink_to(elsewhere)  # a folder outside the root: indexed through the link
    (root / "sub" / "up").symlink_to(root)  # a loop back to the root: the root is listed once
    (elsewhere / "back").symlink_to(root)  # the same loop through the linked folder
    (root / "alias.png").symlink_to(root / "a.png")  # a link to a file: indexed like the file
    (root / "alias.txt").symlink_to(root / "a.txt")
    (root / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (root / "loop.png").symlink_to(root / "loop.png")
    source = ImageFolderSource(str(root))
    assert source.files == ["a.png", "alias.png", "linked/c.png", "sub/b.png"]
    assert source.left_out_files == {"dangling.png": "dangling symlink{s}", "loop.png": "symlink loop{s}",
                                     "linked/back": "symlinked folder{s} indexed already",
                                     "sub/up": "symlinked folder{s} indexed already"}
    assert [source[i]["caption"] for i in range(len(source))] == [
        "caption of a.png", "caption of a.png", "caption of c.png", "caption of sub/b.png"]
    assert source.fingerprint() == ImageFolderSource(str(root)).fingerprint()
    (root / "metadata.jsonl").symlink_to(tmp_path / "moved.jsonl")  # not a silent fall-back to .txt files
    with pytest.raises(ConfigError, match="metadata.jsonl .dangling symlink"):
        ImageFolderSource(str(root))


def bad_folder(root) -> set[str]:
    """10 good images with captions and four bad files; -> the bad keys."""
    rows = []
    for i in range(10):
        save(root / f"good_{i:02d}.png", size=(12 + i, 9), colour=(20 * i, 100, 7))
        rows.append({"file_name": f"good_{i:02d}.png", "text": f"image {i}"})
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "truncated.jpg")
    (root / "truncated.jpg").write_bytes((root / "truncated.jpg").read_bytes()[:800])
    (root / "zero.png").write_bytes(b"")
    (root / "notes.jpg").write_text("this is not a JPEG")
    save(root / "uncaptioned.png")
    rows += [{"file_name": n, "text": "bad"} for n in ("truncated.jpg", "zero.png", "notes.jpg")]
    rows.append({"file_name": "uncaptioned.png", "text": ""})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"truncated.jpg", "zero.png", "notes.jpg", "uncaptioned.png"}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_files_are_replaced_and_named_through_the_stream(tmp_path, num_workers):
    bad = bad_folder(tmp_path)
    source = ImageFolderSource(str(tmp_path))
    assert len(source) == 14  # bad files are indexed, not filtered
    batches = run(source, num_workers, steps=6)  # 18 positions: every index is met at least once
    assert all(b["images"].shape == (3, 3, R, R) and len(b["captions"]) == 3 for b in batches)
    named = {entry[0] for b in batches for entry in b["bad"]}
    assert named == bad
    assert all(key.startswith("good_") for b in batches for key in b["keys"])
    again = run(ImageFolderSource(str(tmp_path)), num_workers=2 - num_workers, steps=6)
    assert [b["keys"] for b in again] == [b["keys"] for b in batches]
    assert [b["bad"] for b in again] == [b["bad"] for b in batches]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(again, batches))


def test_random_crops_follow_the_position_across_world_sizes(tmp_path):
    bad_folder(tmp_path)
    source = ImageFolderSource(str(tmp_path))
    one = run(source, 0, world=1, batch=4, steps=2)  # positions 0..7
    two = run(source, 0, world=2, batch=2, steps=2)  # rank 0: 0,1 and 4,5; rank 1: 2,3 and 6,7
    by_position = torch.cat([b["images"] for b in one])
    rank0, rank1 = two[:2], two[2:]
    spread = torch.cat([rank0[0]["images"], rank1[0]["images"], rank0[1]["images"], rank1[1]["images"]])
    assert torch.equal(by_position, spread)


@pytest.mark.slow
def test_train_dry_run_with_a_folder_and_a_missing_path(tmp_path, run_script):
    save(tmp_path / "a.png")
    done = run_script("scripts/train.py", "--data.source=folder", f"--data.path={tmp_path}", "--dry-run",
                      timeout=60)
    assert done.returncode == 0, done.stderr
    assert 'source = "folder"' in done.stdout and f'path = "{tmp_path}"' in done.stdout
    missing = tmp_path / "nowhere"
    done = run_script("scripts/train.py", "--data.source=folder", f"--data.path={missing}", "--dry-run",
                      timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.path" in lines[0] and str(missing) in lines[0]
