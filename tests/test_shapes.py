"""The synthetic "shapes" dataset and its rule-based prompt-adherence checker."""

import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ldm_ddp.data import shapes
from ldm_ddp.data.shapes import ShapesSource
from ldm_ddp.shapes_check import ATTRIBUTES, check_image, score

N_CHECK = 600


def _pixels(image):
    return np.asarray(image).tobytes()


def test_same_seed_and_index_give_identical_samples():
    a, b = ShapesSource(seed=3), ShapesSource(seed=3)
    for i in (0, 7, 999):
        assert _pixels(a[i]["image"]) == _pixels(b[i]["image"])
        assert a[i]["caption"] == b[i]["caption"]
        assert a[i]["key"] == f"shapes/{i:08d}"
    other = ShapesSource(seed=4)
    assert any(_pixels(a[i]["image"]) != _pixels(other[i]["image"]) for i in range(10))
    assert [a[i]["caption"] for i in range(20)] != [other[i]["caption"] for i in range(20)]


@pytest.mark.slow
def test_samples_do_not_depend_on_the_process_hash_seed():
    code = (
        "import hashlib, numpy as np; from ldm_ddp.data.shapes import ShapesSource; "
        "s = ShapesSource(seed=5)[123];"
        "print(hashlib.sha256(np.asarray(s['image']).tobytes()).hexdigest(), s['caption'])"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
            env={"PYTHONHASHSEED": hash_seed, "PYTHONPATH": ":".join(sys.path)},
        ).stdout
        for hash_seed in ("1", "2")
    }
    assert len(outputs) == 1


def test_every_caption_names_its_four_attributes_in_plain_words():
    source = ShapesSource(seed=0)
    for i in range(1000):
        item = source[i]
        text, attrs = item["caption"], item["attrs"]
        assert re.fullmatch(r"[a-z ,:]+", text), text
        words = shapes.tokens(text)
        assert attrs["colour"] in words and attrs["shape"] in words, text
        assert {"small": {"small", "little"}, "large": {"large", "big"}}[attrs["size"]] & set(words), text
        assert re.search(rf"\b{attrs['position']}\b", text), text


def test_all_combinations_and_phrasings_reachable_in_a_few_thousand_indices():
    seen, phrasings = set(), set()
    for i in range(3000):
        attrs = shapes.sample_attributes(11, i)
        seen.add(tuple(attrs[a] for a in ATTRIBUTES))
        phrasings.add(attrs["phrasing"])
    prompts = shapes.all_prompts()
    assert (len(prompts)
            == len(shapes.COLOURS) * len(shapes.SHAPES) * len(shapes.SIZES) * len(shapes.POSITIONS))
    assert seen == {tuple(p[a] for a in ATTRIBUTES) for p in prompts}
    assert phrasings == set(range(5))


def test_vocabulary_covers_every_caption():
    vocab = shapes.vocabulary()
    assert vocab == sorted(set(vocab))
    captions = [p["caption"] for p in shapes.all_prompts()]
    captions += [shapes.caption(shapes.sample_attributes(0, i)) for i in range(3000)]
    used = {word for text in captions for word in shapes.tokens(text)}
    assert used <= set(vocab)
    assert used == set(vocab), "vocabulary lists words no caption uses"


@pytest.mark.parametrize("resolution", [32, 64, 256])
def test_large_shapes_in_corners_stay_inside_and_dwarf_small_ones(resolution):
    background = (240, 240, 240)
    j = shapes.JITTER
    for position, (sx, sy) in {"top left": (-1, -1), "top right": (1, -1), "bottom left": (-1, 1),
                               "bottom right": (1, 1)}.items():
        areas = {}
        for size in shapes.SIZES:
            attrs = {"colour": "yellow", "shape": "square", "size": size, "position": position,
                     "dx": sx * j, "dy": sy * j, "scale": 1 + shapes.SCALE_JITTER, "background": background}
            image = shapes.render(attrs, resolution)
            assert image.mode == "RGB" and image.size == (resolution, resolution)
            pixels = np.asarray(image).astype(int)
            border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
            assert (border == background).all(), f"{size} square touches the border at {position}"
            areas[size] = (np.abs(pixels - background).sum(-1) > 0).sum()
        assert areas["large"] > 3 * areas["small"]


def test_source_bounds_and_fingerprint():
    source = ShapesSource(seed=2, num_samples=10, resolution=32)
    assert len(source) == 10
    assert source[9]["image"].size == (32, 32)
    for bad in (-1, 10):
        with pytest.raises(IndexError):
            source[bad]
    fingerprints = {
        ShapesSource(seed=2, num_samples=10, resolution=32).fingerprint(),
        ShapesSource(seed=3, num_samples=10, resolution=32).fingerprint(),
        ShapesSource(seed=2, num_samples=11, resolution=32).fingerprint(),
        ShapesSource(seed=2, num_samples=10, resolution=64).fingerprint(),
    }
    assert len(fingerprints) == 4 and source.fingerprint() in fingerprints


def _dataset(resolution, seed=7):
    source = ShapesSource(seed=seed, resolution=resolution)
    items = [source[i] for i in range(N_CHECK)]
    return [item["image"] for item in items], [item["attrs"] for item in items]


@pytest.mark.parametrize("resolution", [32, pytest.param(64, marks=pytest.mark.slow)])
def test_checker_reads_dataset_images(resolution):
    images, targets = _dataset(resolution)
    result = score(images, targets)
    assert result["n"] == N_CHECK
    for attribute in ATTRIBUTES:
        assert result[attribute] >= 0.99, result


@pytest.mark.parametrize("resolution", [32, pytest.param(64, marks=pytest.mark.slow)])
def test_checker_tolerates_mild_noise_and_blur(resolution):
    images, targets = _dataset(resolution, seed=8)
    rng = np.random.default_rng(0)
    degraded = []
    for image in images:
        blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(0.6)), np.float32)
        noisy = blurred + rng.normal(0.0, 8.0, blurred.shape)
        degraded.append(np.clip(noisy.round(), 0, 255).astype(np.uint8))
    result = score(degraded, targets)
    for attribute in ATTRIBUTES:
        assert result[attribute] >= 0.95, result


@pytest.mark.parametrize("resolution", [32, 64])
def test_checker_survives_blank_and_noise_images(resolution):
    blank = Image.new("RGB", (resolution, resolution), (235, 235, 235))
    assert check_image(blank) == dict.fromkeys(ATTRIBUTES, "none")
    allowed = {
        "colour": set(shapes.COLOURS), "shape": set(shapes.SHAPES),
        "size": set(shapes.SIZES), "position": set(shapes.POSITIONS),
    }
    rng = np.random.default_rng(1)
    for noise in (
        rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8),
        np.clip(rng.normal(235, 40, (resolution, resolution, 3)), 0, 255).astype(np.uint8),
        np.zeros((resolution, resolution, 3), np.uint8),
    ):
        prediction = check_image(noise)
        assert set(prediction) == set(ATTRIBUTES)
        assert all(prediction[a] in allowed[a] | {"none"} for a in ATTRIBUTES)


def test_score_counts_all_four_right():
    image = shapes.render({"colour": "red", "shape": "circle", "size": "large", "position": "center"}, 64)
    right = {"colour": "red", "shape": "circle", "size": "large", "position": "center"}
    wrong = {**right, "shape": "square"}
    result = score([image, image], [right, wrong])
    assert result == {"colour": 1.0, "shape": 0.5, "size": 1.0, "position": 1.0, "all": 0.5, "n": 2}
    with pytest.raises(ValueError):
        score([image], [right, wrong])
