"""The built-in synthetic text-to-image dataset "shapes".

One coloured shape on a plain light background, with a templated caption that
names its colour, shape, size and position. Every sample is a pure function of
(seed, index): no files, identical on every rank and every run, so the trainer
and its tests need no downloads and a checker (`ldm_ddp.shapes_check`) can
score how well generated images follow their prompts.
"""

import io
import random
import re

import numpy as np
from PIL import Image, ImageDraw

from .sources import DataSource

# Bump when rendering or captions change: cached latents keyed by the
# fingerprint must not be reused across generator versions.
GENERATOR_VERSION = 2

# Far apart in RGB and from the light background, so the nearest-palette rule
# in the checker survives the colour drift of a small diffusion model. (Version 1
# had orange: a small model drew red, orange and yellow as one continuum.)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 20),
    "purple": (140, 50, 180),
    "black": (30, 30, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")

# Shape centre as a fraction of the image side (x, y). Corners sit far enough
# in that a large shape plus the worst jitter stays inside the image.
ANCHORS: dict[str, tuple[float, float]] = {
    "top left": (0.28, 0.28),
    "top right": (0.72, 0.28),
    "bottom left": (0.28, 0.72),
    "bottom right": (0.72, 0.72),
    "center": (0.5, 0.5),
}
# Width (= height) of the shape's bounding box as a fraction of the image side.
# A factor of ~1.8 apart, so "large" is clearly larger at any resolution.
EXTENTS: dict[str, float] = {"small": 0.22, "large": 0.40}
JITTER = 1 / 32  # max centre offset, fraction of the side: 2 px at 64 px
SCALE_JITTER = 0.05  # max relative change of the extent

_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
# Each phrasing names all four attributes; `syn` picks the size synonym.
_PHRASINGS = (
    ("a {size} {colour} {shape} in the {position}", 0),
    ("{position}: a {size} {colour} {shape}", 1),
    ("a {colour} {shape}, {size}, at the {position}", 0),
    ("a {size} {shape} in {colour} at the {position}", 1),
    ("there is a {size} {colour} {shape} in the {position} of the image", 0),
)
_SUPERSAMPLE = 4
_COMBOS = [(c, s, z, p) for c in COLOURS for s in SHAPES for z in SIZES for p in POSITIONS]


def sample_attributes(seed: int, index: int) -> dict:
    """Attributes of sample `index`: the four named ones, the phrasing and the jitter.

    Indices are dealt in blocks of all 180 combinations, each block in its own
    shuffled order, so any window of a few hundred samples is balanced.
    """
    block, offset = divmod(index, len(_COMBOS))
    order = list(range(len(_COMBOS)))
    random.Random(f"shapes:{seed}:block:{block}").shuffle(order)
    colour, shape, size, position = _COMBOS[order[offset]]
    # A string seed is hashed with SHA-512 by `random`, so it is stable across
    # processes, unlike hash() of a tuple under PYTHONHASHSEED.
    rng = random.Random(f"shapes:{seed}:{index}")
    grey = rng.randint(228, 246)
    return {
        "colour": colour,
        "shape": shape,
        "size": size,
        "position": position,
        "phrasing": rng.randrange(len(_PHRASINGS)),
        "dx": rng.uniform(-JITTER, JITTER),
        "dy": rng.uniform(-JITTER, JITTER),
        "scale": rng.uniform(1 - SCALE_JITTER, 1 + SCALE_JITTER),
        "background": tuple(min(255, grey + rng.randint(-6, 6)) for _ in range(3)),
    }


def render(attrs: dict, resolution: int) -> Image.Image:
    """Draw `attrs` as an RGB uint8 image of resolution x resolution.

    Jitter keys are optional (defaults: none, grey 240 background), so the
    combinations from `all_prompts()` render as clean references.
    """
    side = resolution * _SUPERSAMPLE
    image = Image.new("RGB", (side, side), tuple(attrs.get("background", (240, 240, 240))))
    ax, ay = ANCHORS[attrs["position"]]
    cx = (ax + attrs.get("dx", 0.0)) * side
    cy = (ay + attrs.get("dy", 0.0)) * side
    half = EXTENTS[attrs["size"]] * attrs.get("scale", 1.0) * side / 2
    box = (cx - half, cy - half, cx + half, cy + half)
    fill = COLOURS[attrs["colour"]]
    draw = ImageDraw.Draw(image)
    if attrs["shape"] == "circle":
        draw.ellipse(box, fill=fill)
    elif attrs["shape"] == "square":
        draw.rectangle(box, fill=fill)
    else:  # apex up, base at the bottom: the checker relies on this orientation
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    # BOX averages each 4x4 block exactly: edge pixels get their true coverage.
    return image.resize((resolution, resolution), Image.Resampling.BOX)


def caption(attrs: dict) -> str:
    """The caption of `attrs` in its phrasing (0, the canonical one, if absent)."""
    template, syn = _PHRASINGS[attrs.get("phrasing", 0)]
    return template.format(
        size=_SIZE_WORDS[attrs["size"]][syn],
        colour=attrs["colour"],
        shape=attrs["shape"],
        position=attrs["position"],
    )


def tokens(text: str) -> list[str]:
    """Split a caption into words and the punctuation tokens "," and ":"."""
    return re.findall(r"[a-z]+|[,:]", text)


def vocabulary() -> list[str]:
    """Every token (see `tokens`) any caption can contain, sorted."""
    words = set()
    for template, _ in _PHRASINGS:
        words.update(tokens(re.sub(r"\{\w+\}", " ", template)))
    words.update(COLOURS, SHAPES)
    for position in POSITIONS:
        words.update(position.split())
    for synonyms in _SIZE_WORDS.values():
        words.update(synonyms)
    return sorted(words)


def all_prompts() -> list[dict]:
    """All 180 (colour, shape, size, position) combinations with their canonical caption."""
    prompts = []
    for colour, shape, size, position in _COMBOS:
        attrs = {"colour": colour, "shape": shape, "size": size, "position": position}
        prompts.append({**attrs, "caption": caption(attrs)})
    return prompts


class ShapesSource(DataSource):
    """Random-access source of `num_samples` shapes samples; index i is always the same sample."""

    random_access = True
    latent = False
    has_raw = True
    pairs = False

    def __init__(self, seed: int = 0, num_samples: int = 100_000, resolution: int = 64):
        if num_samples <= 0:
            raise ValueError(f"shapes: num_samples must be positive, got {num_samples}")
        if not 32 <= resolution <= 1024:
            raise ValueError(f"shapes: resolution must be in 32..1024 px, got {resolution}")
        self.seed = seed
        self.num_samples = num_samples
        self.resolution = resolution

    def __len__(self) -> int:
        return self.num_samples

    def where(self) -> str:
        return "shapes (synthetic)"

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"shapes index {index} outside [0, {self.num_samples})")
        attrs = sample_attributes(self.seed, index)
        return {
            "image": render(attrs, self.resolution),
            "caption": caption(attrs),
            "key": self.key(index),
            "attrs": attrs,
        }

    def key(self, index: int) -> str:
        return f"shapes/{index:08d}"

    def shard_sizes(self) -> None:
        return None  # rendered on demand: any order reads as fast as any other

    def image_sizes(self) -> np.ndarray:
        return np.full((self.num_samples, 2), self.resolution, np.int64)  # every render is square

    def raw(self, index: int) -> dict:
        """The sample as a source's raw record (lossless PNG bytes), for scripts/precompute_latents.py."""
        sample = self[index]
        buf = io.BytesIO()
        sample["image"].save(buf, format="PNG")
        return {"key": sample["key"], "image": buf.getvalue(), "captions": sample["caption"]}

    def fingerprint(self) -> str:
        return f"shapes-v{GENERATOR_VERSION}:seed={self.seed}:n={self.num_samples}:res={self.resolution}"
