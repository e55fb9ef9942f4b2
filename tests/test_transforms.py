"""Image transforms: mode conversion, EXIF orientation, JPEG draft, bomb refusal, the decode budget, seeded
crop/flip, uint8 out."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_ddp.data import transforms
from ldm_ddp.data.transforms import ImageTransform, pixel_limit, to_unit_range

R = 8


def pixel(tensor: torch.Tensor, y: int = 0, x: int = 0) -> list[int]:
    """[3, R, R] uint8 -> the RGB values 0..255 at (y, x)."""
    return tensor[:, y, x].tolist()


def palette_image(transparent: bool) -> Image.Image:
    image = Image.new("P", (R, R), 1)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.putpixel((0, 0), 0)
    if transparent:
        image.info["transparency"] = 0  # palette entry 0 is transparent
    return image


@pytest.mark.parametrize("image, corner, centre", [
    (Image.new("L", (R, R), 100), [100] * 3, [100] * 3),
    (Image.new("LA", (R, R), (100, 0)), [255] * 3, [255] * 3),  # fully transparent -> white
    (palette_image(transparent=False), [10, 20, 30], [200, 100, 50]),
    (palette_image(transparent=True), [255] * 3, [200, 100, 50]),
    (Image.new("CMYK", (R, R), (0, 0, 0, 0)), [255] * 3, [255] * 3),
    (Image.new("CMYK", (R, R), (0, 255, 255, 0)), [255, 0, 0], [255, 0, 0]),
    (Image.fromarray(np.full((R, R), 257 * 100, dtype=np.uint16)), [100] * 3, [100] * 3),  # 16-bit grey
])
def test_modes_convert_to_rgb(image, corner, centre):
    out = ImageTransform(R)(image)
    assert out.shape == (3, R, R) and out.dtype == torch.uint8 and out.is_contiguous()
    assert pixel(out) == corner and pixel(out, 4, 4) == centre


def test_rgba_is_composited_on_white():
    array = np.zeros((R, R, 4), dtype=np.uint8)
    array[..., 0] = 255  # red everywhere; alpha 0 (fully transparent) except:
    array[4:, :, 3] = 255  # bottom half opaque
    array[2, 2, 3] = 128  # one half-transparent pixel
    out = ImageTransform(R)(Image.fromarray(array, "RGBA"))
    assert pixel(out) == [255, 255, 255]
    assert pixel(out, 6, 6) == [255, 0, 0]
    assert pixel(out, 2, 2)[0] == 255 and abs(pixel(out, 2, 2)[1] - 127) <= 1


def test_sixteen_bit_range_is_scaled_not_clipped():
    ramp = np.array([[0, 65535] * (R // 2)] * R, dtype=np.uint16)
    image = Image.fromarray(ramp)
    assert image.mode.startswith("I")
    out = ImageTransform(R)(image)
    assert out.min() == 0 and out.max() == 255


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((8, 16, 3), dtype=np.uint8)  # stored 16 wide x 8 high: left red, right blue
    array[:, :8, 0] = array[:, 8:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the left half ends up on top
    Image.fromarray(array).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    transform = ImageTransform(R)
    assert transform.decode(Image.open(tmp_path / "rotated.jpg")).size == (8, 16)
    out = transform(Image.open(tmp_path / "rotated.jpg"))  # centre crop: rows 4..11 of the upright image
    assert pixel(out, 0, 4)[0] > 200 and pixel(out, 0, 4)[2] < 60  # red above
    assert pixel(out, 7, 4)[2] > 200 and pixel(out, 7, 4)[0] < 60  # blue below


def test_large_jpegs_decode_in_draft_mode(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (768, 1024, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "big.jpg")
    # 768 // 64 = 12: the decoder reduces by 8 (the largest of 8, 4, 2 that keeps the short side >= 64).
    assert ImageTransform(64).decode(Image.open(tmp_path / "big.jpg")).size == (128, 96)
    assert ImageTransform(400).decode(Image.open(tmp_path / "big.jpg")).size == (1024, 768)  # no reduction
    assert ImageTransform(64)(Image.open(tmp_path / "big.jpg")).shape == (3, 64, 64)


def test_decompression_bombs_are_refused(tmp_path):
    Image.new("RGB", (40, 40)).save(tmp_path / "bomb.png")
    with pytest.raises(Image.DecompressionBombError):
        ImageTransform(R, max_image_pixels=1000)(Image.new("RGB", (40, 40)))
    default = Image.MAX_IMAGE_PIXELS
    with pixel_limit(1000), pytest.raises(Image.DecompressionBombWarning):  # 1x-2x: PIL only warns
        Image.open(tmp_path / "bomb.png")
    assert Image.MAX_IMAGE_PIXELS == default  # restored
    assert ImageTransform(R, max_image_pixels=1600)(Image.open(tmp_path / "bomb.png")).shape == (3, R, R)


def png(width: int, height: int, colour_type: int = 0, bit_depth: int = 1, pixels: bool = True) -> bytes:
    """A black PNG written chunk by chunk (grey 1-bit by default; colour_type 2 = RGB). Without `pixels`
    only the header is real (an empty IDAT): enough for what is read before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    channels = {0: 1, 2: 3}[colour_type]
    rows = (b"\0" * (1 + (width * channels * bit_depth + 7) // 8)) * height if pixels else b""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def test_an_image_over_the_decode_budget_is_refused_before_decoding():
    """A 20 KB 1-bit PNG of 13000 x 13000 px is under the pixel limit (179 MP) but would take 2 GB and
    seconds to decode and convert: refused from its header alone, as a bad sample is."""
    data = png(13000, 13000)
    assert len(data) < 30_000
    with pixel_limit(transforms.MAX_IMAGE_PIXELS):
        image = Image.open(io.BytesIO(data))
        loads = []
        image.load = lambda: loads.append(1)  # decoding starts here: it must not be reached
        with pytest.raises(Image.DecompressionBombError, match="13000x13000 px .*decode budget"):
            ImageTransform(R)(image)
        assert loads == []
        # The default admits any camera photo, 24 to 50 MP and a 102 MP medium-format one, RGB or 16-bit grey.
        for width, height, colour_type, bits in ((6000, 4000, 2, 8), (8688, 5792, 2, 8), (11648, 8736, 2, 8),
                                                 (11648, 8736, 0, 16)):
            header_only = Image.open(io.BytesIO(png(width, height, colour_type, bits, pixels=False)))
            assert transforms.decode_bytes(header_only) <= transforms.DECODE_BUDGET_BYTES, (width, height)
    small = png(40, 30)  # 3600 bytes as RGB
    assert ImageTransform(R, max_decode_bytes=3600)(Image.open(io.BytesIO(small))).shape == (3, R, R)
    with pytest.raises(Image.DecompressionBombError, match="decode budget"):
        ImageTransform(R, max_decode_bytes=3599)(Image.open(io.BytesIO(small)))


def test_a_large_jpeg_is_held_to_the_budget_at_its_draft_size(tmp_path):
    Image.new("RGB", (640, 480), (10, 20, 30)).save(tmp_path / "photo.jpg")
    budget = 640 * 480 * 3 - 1  # the full size is over; the 1/8 draft for R = 8 (80 x 60) is far under
    assert ImageTransform(R, max_decode_bytes=budget)(Image.open(tmp_path / "photo.jpg")).shape == (3, R, R)
    with pytest.raises(Image.DecompressionBombError, match="decode budget"):
        ImageTransform(480, max_decode_bytes=budget)(Image.open(tmp_path / "photo.jpg"))


def test_random_crop_and_flip_are_a_function_of_the_generator_seed():
    noise = np.random.default_rng(1).integers(0, 256, (13, 21, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    transform = ImageTransform(R, crop="random", random_flip=True)

    def at(position):
        return transform(image, np.random.Generator(np.random.PCG64([0, 1, position])))

    outs = [at(p) for p in range(16)]
    assert all(torch.equal(a, at(p)) for p, a in enumerate(outs))  # same (seed, position), same pixels
    assert len({o.numpy().tobytes() for o in outs}) > 8  # positions differ
    centre = ImageTransform(R)(image)
    assert not all(torch.equal(o, centre) for o in outs)
    square = Image.fromarray(noise[:R, :R])  # no crop freedom: each output is the image or its mirror
    flips = [ImageTransform(R, random_flip=True)(square, np.random.default_rng(p)) for p in range(16)]
    plain = ImageTransform(R)(square)
    assert {torch.equal(f, plain) for f in flips} == {True, False}
    assert all(torch.equal(f, plain) or torch.equal(f, plain.flip(2)) for f in flips)


def test_resize_is_pillows_bicubic_on_the_centre_square():
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))
    for res in (48, 64, 200):  # down by 2.5 and 1.9, and up
        out = ImageTransform(res)(image).permute(1, 2, 0).numpy().astype(int)
        pillow = np.asarray(image.crop((20, 0, 140, 120)).resize((res, res), Image.BICUBIC)).astype(int)
        assert np.abs(out - pillow).max() <= 1  # torch's uint8 antialiased kernel is a port of Pillow's


def test_images_already_at_resolution_are_cropped_not_resampled():
    array = np.random.default_rng(3).integers(0, 256, (R, 13, 3), dtype=np.uint8)  # shorter side already R
    image = Image.fromarray(array)
    assert torch.equal(ImageTransform(R)(image), torch.from_numpy(array[:, 2:10]).permute(2, 0, 1))
    windows = {torch.from_numpy(array[:, x:x + R]).permute(2, 0, 1).numpy().tobytes()
               for x in range(13 - R + 1)}
    for p in range(8):
        out = ImageTransform(R, crop="random", random_flip=True)(image, np.random.default_rng(p))
        assert out.numpy().tobytes() in windows or out.flip(2).numpy().tobytes() in windows


def test_unit_range_on_the_device_side():
    pixels = torch.tensor([0, 1, 127, 128, 255], dtype=torch.uint8)
    reference = pixels.float().div_(127.5).sub_(1.0)  # x / 127.5 - 1 in float32 on the host
    assert to_unit_range(pixels).dtype == torch.float32 and torch.equal(to_unit_range(pixels), reference)
    assert to_unit_range(pixels)[[0, -1]].tolist() == [-1.0, 1.0]
    floats = torch.rand(2, 3, 4, 4) * 2 - 1
    assert to_unit_range(floats) is floats
