"""worker.png: the output encoder is lossless (Pillow reads back the same pixels) at every level,
deterministic, and DARKROOM_PNG_COMPRESS_LEVEL is validated and honoured."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from darkroom.settings import Settings
from worker import png


def noisy(mode: str, size: tuple[int, int] = (67, 41)) -> Image.Image:
    """Random pixels in `mode` (odd sizes: rows that are not a multiple of anything)."""
    rng = np.random.default_rng(7)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def read_back(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data), formats=["PNG"])
    image.load()
    return image


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_pillow_reads_back_the_same_pixels(mode: str, level: int) -> None:
    image = noisy(mode)
    decoded = read_back(png.encode(image, level))
    assert decoded.mode == mode
    assert decoded.size == image.size
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


@pytest.mark.parametrize("mode", ["P", "I;16", "1", "LA"])
def test_other_modes_go_through_pillow_losslessly(mode: str) -> None:
    image = noisy("L").convert(mode)
    decoded = read_back(png.encode(image, 1))
    assert decoded.mode == image.mode
    assert np.array_equal(np.asarray(decoded), np.asarray(image))


def test_the_encoding_is_deterministic_and_the_level_is_used() -> None:
    gradient = Image.linear_gradient("L").convert("RGB")
    assert png.encode(gradient, 1) == png.encode(gradient.copy(), 1)
    stored, fast = png.encode(gradient, 0), png.encode(gradient, 1)
    assert len(fast) < len(stored) / 4
    assert np.array_equal(np.asarray(read_back(stored)), np.asarray(read_back(fast)))


def test_above_the_fast_level_pillow_encodes_as_before() -> None:
    image = noisy("RGB")
    before = io.BytesIO()
    image.save(before, format="PNG")  # what Darkroom wrote before the level setting
    assert png.encode(image, 6) == before.getvalue()
    assert png.encode(image, 1) != before.getvalue()


def test_the_level_changes_the_encoding() -> None:
    gradient = Image.linear_gradient("L").convert("RGB")
    assert png.encode(gradient, 0) != png.encode(gradient, 6)


@pytest.mark.parametrize("level", [-1, 10])
def test_the_level_setting_is_validated(level: int) -> None:
    with pytest.raises(ValidationError):
        Settings(png_compress_level=level)
