"""Image transforms: a decoded or lazily opened PIL image -> [3, R, R] uint8 pixels.

Decode (JPEG draft mode when downscaling; refused from the header alone when over the decode budget or
the pixel limit), EXIF orientation, any mode to RGB (alpha on white),
centre or random square crop, resized to R x R, optional horizontal flip. Random draws come
from a generator the stream seeds with (data seed, global position), so resume and any world
size reproduce them. Pixels stay uint8 through the DataLoader (a quarter of float32's bytes in
its shared-memory queues, no float math in workers); the consumer maps them to [-1, 1] on its
device with `to_unit_range`.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageMode, ImageOps

from ..config import DataConfig
from .buckets import cover_crop

MAX_IMAGE_PIXELS = 178_956_970  # larger images are refused as decompression bombs (PIL's own default)

# The most one image may cost to decode, in bytes of the image as 8-bit RGB (w x h x 3; more when its own
# mode is wider, e.g. float), at the size it decodes to (a JPEG: after draft reduction). Checked from the
# header, before decoding: the pixel limit alone lets a 20 KB 1-bit PNG of 13000 x 13000 px (169 MP, 507 MB
# as RGB) through, and decoding, converting and cropping it takes about 2 GB and seconds of a core. The
# peak is about 4x this figure (PIL holds RGB in 4 bytes a pixel; the crop and the tensor are copies).
# 384 MiB is 134 MP as RGB: every camera photo (24-50 MP, 72-150 MB) and a 102 MP medium-format one (306 MB)
# fits, and a JPEG over it at full size still loads when the training resolution is at most half its
# shorter side (draft at 1/2). A budget in multiples of the training resolution would refuse ordinary
# photos in low-resolution runs, so it is fixed.
DECODE_BUDGET_BYTES = 384 * 2**20

ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


@contextmanager
def pixel_limit(max_pixels: int):
    """Within: PIL refuses to open images over `max_pixels` (its bomb warning raised as an error)."""
    # PIL checks Image.MAX_IMAGE_PIXELS at Image.open, which a source calls before the transform
    # runs; it only warns between 1x and 2x the limit, so the warning is made an error.
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white, 16-bit data scaled to 8 bits."""
    if image.mode.startswith("I") or image.mode == "F":
        # convert("RGB") clips 16-bit values at 255 (near-white images); scale 0..65535 instead.
        array = np.asarray(image, dtype=np.float32) / 257.0
        image = Image.fromarray(np.clip(array.round(), 0, 255).astype(np.uint8), "L")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


EXIF_ORIENTATION = 0x0112


def decode_bytes(image: Image.Image) -> int:
    """Bytes of `image` decoded at its current size, counted as 8-bit RGB or its own mode, the wider."""
    mode = ImageMode.getmode(image.mode)
    return image.width * image.height * max(3, len(mode.bands) * np.dtype(mode.typestr).itemsize)


def check_decode_budget(image: Image.Image, max_bytes: int) -> None:
    """Raise (as for a decompression bomb) if decoding `image` would cost more than `max_bytes`."""
    cost = decode_bytes(image)
    if cost > max_bytes:
        raise Image.DecompressionBombError(
            f"{image.width}x{image.height} px ({image.mode}) would take {cost / 2**20:.0f} MiB to decode, "
            f"over the decode budget of {max_bytes / 2**20:.0f} MiB (transforms.DECODE_BUDGET_BYTES)")


class ImageTransform:
    """PIL image (+ numpy Generator for random crop/flip) -> [3, R, R] uint8."""

    def __init__(self, resolution: int, crop: str = "center", random_flip: bool = False,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, max_decode_bytes: int = DECODE_BUDGET_BYTES):
        self.resolution, self.crop, self.random_flip = resolution, crop, random_flip
        self.max_image_pixels, self.max_decode_bytes = max_image_pixels, max_decode_bytes

    @classmethod
    def from_config(cls, cfg: DataConfig) -> ImageTransform:
        return cls(cfg.resolution, cfg.crop, cfg.random_flip)

    def decode(self, image: Image.Image, size: tuple[int, int] | None = None) -> Image.Image:
        """Lazily opened or decoded image -> decoded RGB image, upright per its EXIF orientation. `size`
        (width, height; default R x R): what it will cover, the floor of JPEG's reduced decoding."""
        if image.width * image.height > self.max_image_pixels:  # also catches images built in memory
            raise Image.DecompressionBombError(f"{image.width}x{image.height} px is over the "
                                               "decompression-bomb limit")
        # JPEG only (a no-op elsewhere and once loaded): decode at 1/2, 1/4 or 1/8 scale while both sides
        # stay >= `size`, so a large photo never decodes at full size.
        image.draft("RGB", size or (self.resolution, self.resolution))
        check_decode_budget(image, self.max_decode_bytes)  # at the draft size, before anything is decoded
        if image.getexif().get(EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies even when upright
            image = ImageOps.exif_transpose(image)
        return image if image.mode == "RGB" else to_rgb(image)

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        """-> [3, R, R] uint8: the largest centred (or random) square, resized to R, maybe mirrored."""
        return self.to_bucket(image, (self.resolution, self.resolution), rng)[0]

    def to_bucket(self, image: Image.Image, bucket: tuple[int, int], rng: np.random.Generator | None = None
                  ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """-> ([3, bh, bw] uint8, the image's upright (height, width) in px, the crop's (top, left) in bucket
        px): resized to cover the bucket (width bw, height bh), centre or random crop, maybe mirrored. The
        two pairs are SDXL's size and crop conditioning (Podell et al. 2023, section 2.2)."""
        stored = image.size  # before JPEG's reduced decoding
        decoded = self.decode(image, bucket)
        # EXIF orientations 5-8 store the picture turned by 90 degrees (read in decode, after the budget)
        turned = image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
        original, image = (stored if turned else stored[::-1]), decoded
        covered_width = round(image.width * max(bucket[0] / image.width, bucket[1] / image.height))
        box, top_left = cover_crop(image.width, image.height, bucket, rng if self.crop == "random" else None)
        if box != (0, 0, image.width, image.height):
            image = image.crop(box)
        pixels = pixel_tensor(image)
        if image.size != bucket:
            # torch's uint8 antialiased bicubic is Pillow's filter (widened by the downscale factor, within
            # one level of Pillow's output) in a SIMD kernel: 1 MP -> 512 px in ~2 ms on one core, Pillow ~10.
            pixels = F.interpolate(pixels[None], (bucket[1], bucket[0]), mode="bicubic", antialias=True)[0]
        if self.random_flip and rng.random() < 0.5:
            pixels = pixels.flip(2)  # the crop, seen in the mirrored image: its left edge moves
            top_left = (top_left[0], max(0, covered_width - top_left[1] - bucket[0]))
        return pixels.contiguous(), original, top_left  # plain CHW: the view and the resize are channels-last


def pixel_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] uint8, a channels-last view of one copy of its pixels."""
    with warnings.catch_warnings():
        # tobytes() is immutable and torch warns that a tensor over it could write to it. None does: __call__
        # returns a new tensor (resized, flipped or made contiguous).
        # A writable copy would cost one more pass.
        warnings.simplefilter("ignore", UserWarning)
        hwc = torch.frombuffer(image.tobytes(), dtype=torch.uint8)
    return hwc.view(image.height, image.width, 3).permute(2, 0, 1)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels [..., 3, H, W] (0..255) -> float32 in [-1, 1], on their device;
    float input passes as is."""
    return images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images
