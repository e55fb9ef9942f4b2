"""Image transforms: a decoded or lazily opened PIL image -> [3, R, R] float32 in [-1, 1].

Decode (JPEG draft mode when downscaling), EXIF orientation, any mode to RGB (alpha on white),
shorter side resized to R, centre or random crop, optional horizontal flip. Random draws come
from a generator the stream seeds with (data seed, global position), so resume and any world
size reproduce them.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image, ImageOps

from ..config import DataConfig

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


class ImageTransform:
    """PIL image (+ numpy Generator for random crop/flip) -> [3, R, R] float32 in [-1, 1]."""

    def __init__(self, resolution: int, crop: str = "center", random_flip: bool = False,
                 max_image_pixels: int = DataConfig.max_image_pixels):
        self.resolution, self.crop, self.random_flip = resolution, crop, random_flip
        self.max_image_pixels = max_image_pixels

    @classmethod
    def from_config(cls, cfg: DataConfig) -> "ImageTransform":
        return cls(cfg.resolution, cfg.crop, cfg.random_flip, cfg.max_image_pixels)

    def decode(self, image: Image.Image) -> Image.Image:
        """Lazily opened or decoded image -> decoded RGB image, upright per its EXIF orientation."""
        if image.width * image.height > self.max_image_pixels:  # also catches images built in memory
            raise Image.DecompressionBombError(f"{image.width}x{image.height} px is over data.max_image_pixels")
        # JPEG only (a no-op elsewhere and once loaded): decode at 1/2, 1/4 or 1/8 scale while the
        # shorter side stays >= R, so a large photo never decodes at full size.
        image.draft("RGB", (self.resolution, self.resolution))
        if image.getexif().get(EXIF_ORIENTATION, 1) != 1:  # exif_transpose copies even when upright
            image = ImageOps.exif_transpose(image)
        return image if image.mode == "RGB" else to_rgb(image)

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        image, res = self.decode(image), self.resolution
        if image.size != (res, res):
            scale = res / min(image.size)
            w, h = max(res, round(image.width * scale)), max(res, round(image.height * scale))
            if self.crop == "random":
                left, top = int(rng.integers(w - res + 1)), int(rng.integers(h - res + 1))
            else:
                left, top = (w - res) // 2, (h - res) // 2
            # Resample only the crop window, straight to R x R (the crop chosen on the resized grid, mapped
            # back to source pixels): no full-size intermediate. Pillow widens the bicubic kernel by the
            # downscale factor (antialiased); reducing_gap first box-reduces by whole factors when the
            # downscale is large, at no visible cost.
            box = (left / scale, top / scale, min(image.width, (left + res) / scale),
                   min(image.height, (top + res) / scale))  # min: w, h were rounded
            image = image.resize((res, res), Image.BICUBIC, box=box, reducing_gap=3.0)
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
        return array.permute(2, 0, 1).float().div_(127.5).sub_(1.0)
