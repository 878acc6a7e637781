"""Decoding untrusted init images: formats, bombs, orientation, transparency, sizes."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from darkroom.limits import MAX_PIXELS
from worker.images import ImageInputError, decode_image, output_size


def encoded(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats_decode_to_rgb(fmt: str) -> None:
    image = decode_image(encoded(Image.new("RGB", (40, 30), (10, 20, 30)), fmt))
    assert (image.mode, image.size) == ("RGB", (40, 30))


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_refused(fmt: str) -> None:
    with pytest.raises(ImageInputError, match="not a PNG, JPEG or WebP image"):
        decode_image(encoded(Image.new("RGB", (8, 8)), fmt))


def test_damaged_data_is_refused() -> None:
    data = encoded(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    with pytest.raises(ImageInputError, match="damaged"):
        decode_image(data[: len(data) // 2])


def test_decompression_bombs_are_refused() -> None:
    side = int((2 * MAX_PIXELS) ** 0.5) + 1  # over twice the limit: Pillow raises, not warns
    bomb = encoded(Image.new("1", (side, side)), "PNG")  # tiny file, huge canvas
    with pytest.raises(ImageInputError, match="too many pixels"):
        decode_image(bomb)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encoded(Image.new("RGB", (40, 20)), "JPEG", exif=exif.tobytes())
    assert decode_image(data).size == (20, 40)


def test_transparency_is_flattened_onto_white() -> None:
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert decode_image(encoded(clear, "PNG")).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    ("width", "height", "image_size", "expected"),
    [
        (None, None, (800, 600), (800, 600)),
        (None, None, (2000, 1000), (1024, 512)),
        (513, 300, (10, 10), (512, 296)),
        (512, None, (200, 100), (512, 256)),
        (None, 100, (100, 50), (200, 96)),
        (None, None, (20, 20), (64, 64)),
    ],
)
def test_output_size_rule(
    width: int | None,
    height: int | None,
    image_size: tuple[int, int],
    expected: tuple[int, int],
) -> None:
    assert output_size(width, height, Image.new("RGB", image_size)) == expected
