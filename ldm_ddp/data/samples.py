"""What every source shares: a raw record (key, encoded image bytes, captions) turned into a sample.

A source implements `raw(i) -> {"key", "image": encoded bytes, "captions": str | list[str]}`, which
`scripts/make_shards.py` copies as it is, and inherits `source[i]` from `RawSource`: the image opened
lazily (decoded later by the transform, so JPEG draft mode stays possible) and one caption chosen.
The rest of what a source offers is `sources.DataSource`.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from .sources import DataSource
from .transforms import EXIF_ORIENTATION

CAPTION_STREAM = 2  # seeds the caption choice apart from the order (stream 0) and augmentations (stream 1)


def caption_list(value) -> list[str]:
    """A caption cell (one string or a list of strings) -> its non-empty captions; raises if none."""
    if isinstance(value, (list, tuple)):
        captions = [c.strip() for c in value if isinstance(c, str) and c.strip()]
        if not captions:
            raise ValueError("empty caption list")
        return captions
    if not isinstance(value, str) or not value.strip():
        raise ValueError("empty caption" if isinstance(value, str) else "no caption")
    return [value.strip()]


def pick_caption(value, seed: int, index: int) -> str:
    """One caption from a string or a list of strings; raises if none is usable.

    From a list, one non-empty caption is drawn with PCG64([seed, 2, index]): deterministic in
    (data.seed, dataset index), so a resumed or re-sharded run sees the same caption for the same
    sample, and different samples draw independently.
    """
    captions = caption_list(value)
    if len(captions) == 1:
        return captions[0]
    rng = np.random.Generator(np.random.PCG64([seed, CAPTION_STREAM, index]))
    return captions[int(rng.integers(len(captions)))]


def open_image(data) -> Image.Image:
    """Encoded bytes (or a {"bytes": ...} struct) -> lazily decoded PIL image; raises if unreadable."""
    if isinstance(data, dict):
        data = data.get("bytes")
    if not data:
        raise ValueError("zero-byte image" if data == b"" else "no image bytes")
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # PIL's message names the BytesIO object's address: say what failed
        raise UnidentifiedImageError("not an image PIL can read") from None


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of a lazily opened image as the transform will see it, turned by its EXIF
    orientation, from the header alone (EXIF that a PNG stores after its pixels is not looked for: reading
    it would decode the image)."""
    width, height = image.size
    turned = "exif" in image.info and image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    return (height, width) if turned else (width, height)


def header_size(data) -> tuple[int, int]:
    """Encoded image bytes -> upright (width, height); (0, 0) if the header does not read (the sample then
    fails, named, when it is loaded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a bomb's size still reads; the transform refuses it later
            with open_image(data) as image:
                return upright_size(image)
    except Exception:
        return (0, 0)


def locate(starts, index: int) -> tuple[int, int]:
    """Dataset index -> (shard, row within it), given each shard's first index `starts`
    (and the total last)."""
    if not 0 <= index < starts[-1]:
        raise IndexError(f"sample {index} out of range ({int(starts[-1])} samples)")
    shard = int(np.searchsorted(starts, index, side="right")) - 1
    return shard, index - int(starts[shard])


def sample_from_raw(record: dict, seed: int, index: int) -> dict:
    """A raw record -> {"image": lazily opened PIL image, "caption": one chosen by (seed, index), "key"}, and
    "rejected" (opened too) for a preference pair's record (pairs.py)."""
    caption = pick_caption(record["captions"], seed, index)  # a missing caption fails before decoding
    sample = {"image": open_image(record["image"]), "caption": caption, "key": record["key"]}
    if "rejected" in record:
        sample["rejected"] = open_image(record["rejected"])
    return sample


class RawSource(DataSource):
    """`source[i]` from `self.raw(i)` and `self.seed` (the caption choice)."""

    seed = 0

    def __getitem__(self, index: int) -> dict:
        return sample_from_raw(self.raw(index), self.seed, index)
