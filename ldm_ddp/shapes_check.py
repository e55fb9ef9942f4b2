"""Rule-based prompt-adherence checker for "shapes" images.

Reads colour, shape, size and position of the main shape in an image, so
samples from a model trained on `ldm_ddp.data.shapes` can be scored against
their prompts without a learned classifier. The rules lean on how the dataset
draws (plain light background, one convex shape, triangles apex up) and are
built to survive what a small diffusion model adds: blur, noise, colour drift.
"""

from collections import deque

import numpy as np
from PIL import Image

from ldm_ddp.data.shapes import ANCHORS, COLOURS, EXTENTS

ATTRIBUTES = ("colour", "shape", "size", "position")
NONE = "none"

# RGB distance (0..255 scale) from the background above which a pixel counts as
# shape. Every palette colour is > 150 away from any dataset background, while
# mild noise (sigma 8 per channel) rarely exceeds 40.
FOREGROUND_DISTANCE = 70.0
# A "shape" smaller than this (fraction of the image) is a speck of noise; one
# larger than this is not a shape on a background (e.g. an all-noise image).
MIN_AREA = 0.004
MAX_AREA = 0.5
# Fill of the bounding box: square 1.0, circle pi/4 ~ 0.785, triangle 0.5.
# Blur rounds a small square down and a small circle up (~0.95 and ~0.9 at
# 7 px), so the cut sits above the clean midpoint.
SQUARE_FILL = 0.92
# An apex-up triangle has its mass low: vertical skewness -0.57 (square and
# circle: 0). Either cue alone separates it; both are checked so one spoiled
# cue (a blurred corner, a clipped apex) does not flip the answer.
TRIANGLE_SKEW = -0.3
TRIANGLE_FILL = 0.64
# Geometric mean of the two nominal extents.
LARGE_EXTENT = float(np.sqrt(EXTENTS["small"] * EXTENTS["large"]))


def check_image(image) -> dict:
    """PIL image or uint8 array [H, W, 3] -> predicted {colour, shape, size, position}.

    Attributes it cannot find (no shape, or no single shape) are "none".
    """
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, np.float32)
    rgb = rgb[..., :3]
    h, w = rgb.shape[:2]
    # Shapes never touch the border, so its median is the background even with
    # a few noisy or clipped pixels.
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    distance = np.linalg.norm(rgb - np.median(border, axis=0), axis=-1)

    shape_mask = _largest_component(distance > FOREGROUND_DISTANCE)
    if not MIN_AREA * h * w <= shape_mask.sum() <= MAX_AREA * h * w:
        return dict.fromkeys(ATTRIBUTES, NONE)

    # Coverage per pixel: antialiasing and blur mix shape and background
    # linearly, so distance / full-shape distance is the covered fraction.
    # The 90th percentile ignores rim pixels yet is stable under noise.
    full = np.percentile(distance[shape_mask], 90)
    alpha = np.where(_dilate(shape_mask), np.clip(distance / full, 0.0, 1.0), 0.0)

    inner = shape_mask & (distance >= 0.8 * full)
    colour = np.median(rgb[inner], axis=0)
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], np.float32)
    colour_name = names[int(np.argmin(np.linalg.norm(palette - colour, axis=1)))]

    # Widest row and tallest column, measured as coverage sums: sub-pixel
    # accurate, and blur moves mass within a row without changing its sum.
    rows, cols = alpha.sum(axis=1), alpha.sum(axis=0)
    area = alpha.sum()
    fill = area / (rows.max() * cols.max())
    ys = np.arange(h) + 0.5
    xs = np.arange(w) + 0.5
    cy, cx = (rows @ ys) / area, (cols @ xs) / area
    var_y = rows @ (ys - cy) ** 2 / area
    skew_y = rows @ (ys - cy) ** 3 / area / max(var_y, 1e-6) ** 1.5
    if skew_y < TRIANGLE_SKEW or fill < TRIANGLE_FILL:
        shape = "triangle"
    elif fill >= SQUARE_FILL:
        shape = "square"
    else:
        shape = "circle"

    extent = max(rows.max(), cols.max()) / w
    size = "large" if extent > LARGE_EXTENT else "small"
    # Nearest anchor to the centroid. A triangle's centroid sits h/6 below its
    # box centre (0.07 of the side at most), well inside the 0.22 spacing.
    position = min(ANCHORS, key=lambda p: (ANCHORS[p][0] - cx / w) ** 2 + (ANCHORS[p][1] - cy / h) ** 2)
    return {"colour": colour_name, "shape": shape, "size": size, "position": position}


def score(images, targets: list[dict]) -> dict:
    """Per-attribute accuracy of `images` against `targets`, plus "all" (all four right) and "n"."""
    predictions = [check_image(image) for image in images]
    if len(predictions) != len(targets):
        raise ValueError(f"score: {len(predictions)} images but {len(targets)} targets")
    n = len(targets)
    hits = {a: [p[a] == t[a] for p, t in zip(predictions, targets)] for a in ATTRIBUTES}
    result = {a: sum(hits[a]) / max(n, 1) for a in ATTRIBUTES}
    result["all"] = sum(all(h) for h in zip(*hits.values())) / max(n, 1)
    result["n"] = n
    return result


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Bool [H, W] -> bool [H, W] with only the largest 4-connected component of `mask`."""
    h, w = mask.shape
    labels = np.zeros((h, w), np.int32)
    best_label, best_size, label = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0] = label
        queue, size = deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    queue.append((ny, nx))
        if size > best_size:
            best_label, best_size = label, size
    return labels == best_label if best_size else np.zeros((h, w), bool)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Grow a bool [H, W] mask by one pixel (8-neighbourhood) to take in the antialiased rim."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    grown = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            grown |= padded[dy : dy + h, dx : dx + w]
    return grown
