"""Decoding untrusted init images: formats, bombs, orientation, transparency, sizes."""

from __future__ import annotations

import contextlib
import io
import random
import struct
from collections.abc import Callable

import pytest
from PIL import Image, PngImagePlugin

from darkroom.limits import MAX_PIXELS
from darkroom.settings import Settings
from tests.support.servers import ScriptedServer, response_head
from worker.images import UNREACHABLE, ImageInputError, decode_image, fetch_image, output_size


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


def two_colour(size: tuple[int, int] = (40, 20)) -> Image.Image:
    """Red on the left half, blue on the right: shows which way an image was turned."""
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    return image


def tiff_exif(entries: list[tuple[int, int, int, bytes]], header: bytes = b"MM\x00*") -> bytes:
    """An EXIF block (big-endian TIFF, one IFD) of raw (tag, type, count, 4-byte value) entries,
    so that it can say what Pillow's own writer refuses to."""
    ifd = struct.pack(">H", len(entries))
    for tag, kind, count, value in entries:
        ifd += struct.pack(">HHI", tag, kind, count) + value.ljust(4, b"\x00")
    return b"Exif\x00\x00" + header + struct.pack(">I", 8) + ifd + struct.pack(">I", 0)


ORIENTATION_6 = (0x0112, 3, 1, struct.pack(">H", 6))  # SHORT 6: turn 90 degrees clockwise


@pytest.mark.parametrize(
    ("fmt", "keep"),
    [
        ("PNG", lambda data: data[:20]),  # cut inside IHDR: Pillow's "Truncated File Read"
        ("PNG", lambda data: data[:40]),
        ("JPEG", lambda data: data[:200]),  # cut inside the quantisation tables
        ("WEBP", lambda data: data[: len(data) // 2]),  # "could not create decoder object"
    ],
)
def test_images_cut_short_in_their_headers_are_refused_as_damaged(
    fmt: str, keep: Callable[[bytes], bytes]
) -> None:
    data = encoded(Image.effect_noise((64, 64), 40).convert("RGB"), fmt)
    with pytest.raises(ImageInputError) as caught:
        decode_image(keep(data))
    assert str(caught.value) == f"{UNREACHABLE}: the image data is damaged"


@pytest.mark.parametrize("chunk", ["zTXt", "iCCP"])
def test_png_metadata_that_inflates_past_pillows_limits_is_refused_in_the_module_s_words(
    chunk: str,
) -> None:
    """Pillow refuses to inflate a text or ICC chunk over MAX_TEXT_CHUNK with a bare ValueError
    ("Decompressed data too large for PngImagePlugin.MAX_TEXT_CHUNK"), not a client message."""
    huge = b"\x00" * (2 * PngImagePlugin.MAX_TEXT_CHUNK)
    params: dict[str, object] = {"icc_profile": huge}
    if chunk == "zTXt":
        info = PngImagePlugin.PngInfo()
        info.add_text("comment", huge.decode(), zip=True)
        params = {"pnginfo": info}
    with pytest.raises(ImageInputError) as caught:
        decode_image(encoded(Image.new("RGB", (8, 8)), "PNG", **params))
    assert str(caught.value) == f"{UNREACHABLE}: the image data is damaged"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_unreadable_exif_is_ignored_and_the_pixels_used_as_they_are(fmt: str) -> None:
    """A TIFF header Pillow refuses ("not a TIFF file"): no orientation can be read."""
    exif = tiff_exif([ORIENTATION_6], header=b"MM\xff*")
    image = decode_image(encoded(two_colour(), fmt, exif=exif, quality=95))
    assert image.size == (40, 20)
    assert_near(image.getpixel((0, 0)), (255, 0, 0))


@pytest.mark.parametrize(
    "odd_tag",
    [
        (0x011E, 2, 4, b"cam\x00"),  # XPosition, a RATIONAL, holding text: TypeError on write
        (0x0100, 2, 4, b"cam\x00"),  # ImageWidth, a LONG, holding text: struct.error on write
    ],
)
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_an_orientation_beside_malformed_tags_is_still_applied(
    fmt: str, odd_tag: tuple[int, int, int, bytes]
) -> None:
    """Pillow's exif_transpose rewrites the EXIF after turning the image, and fails on tags it
    cannot write back; the orientation itself is readable, so it is applied."""
    exif = tiff_exif([odd_tag, ORIENTATION_6])
    image = decode_image(encoded(two_colour(), fmt, exif=exif, quality=95))
    assert image.size == (20, 40)
    assert_near(image.getpixel((0, 0)), (255, 0, 0))  # red, once on the left, now on top
    assert_near(image.getpixel((0, 39)), (0, 0, 255))


def assert_near(pixel: object, expected: tuple[int, int, int]) -> None:
    """Within what lossy JPEG and WebP change in a flat colour."""
    assert isinstance(pixel, tuple)
    assert all(abs(got - want) <= 24 for got, want in zip(pixel, expected, strict=True)), pixel


def test_random_damage_to_valid_images_is_an_input_error_or_an_image() -> None:
    """Bytes changed, cut or inserted anywhere in PNG, JPEG and WebP files (with EXIF, alpha,
    a palette): each either decodes to RGB or is refused as an input error, never escapes."""
    exif = tiff_exif([ORIENTATION_6])
    seeds = [
        encoded(two_colour(), "PNG", exif=exif),
        encoded(two_colour(), "JPEG", exif=exif),
        encoded(two_colour(), "WEBP", exif=exif),
        encoded(Image.new("RGBA", (24, 24), (9, 9, 9, 90)), "PNG"),
        encoded(Image.new("RGBA", (24, 24), (9, 9, 9, 90)), "WEBP", lossless=True),
        encoded(two_colour().convert("P"), "PNG", transparency=0),
    ]
    chance = random.Random(7)
    for _ in range(1500):
        data = damaged(bytearray(chance.choice(seeds)), chance)
        with contextlib.suppress(ImageInputError):
            assert decode_image(data).mode == "RGB"


def damaged(data: bytearray, chance: random.Random) -> bytes:
    """`data` with a few bytes changed, its tail cut off, or a few random bytes inserted."""
    roll = chance.random()
    if roll < 0.4:
        for _ in range(chance.randint(1, 8)):
            data[chance.randrange(len(data))] = chance.randrange(256)
    elif roll < 0.7:
        del data[chance.randrange(1, len(data)) :]
    else:
        at = chance.randrange(len(data))
        data[at:at] = chance.randbytes(chance.randint(1, 16))
    return bytes(data)


def test_running_out_of_memory_while_decoding_is_not_called_damage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only the image's faults become input errors: the worker's own stay what they are."""

    def exhausted(_self: Image.Image) -> None:
        raise MemoryError

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", exhausted)
    with pytest.raises(MemoryError):
        decode_image(encoded(Image.new("RGB", (8, 8)), "PNG"))


@pytest.mark.parametrize("location", ["http://[::1", "http://[not-an-address]/x.png"])
def test_a_redirect_to_a_malformed_url_is_refused_in_the_module_s_words(location: str) -> None:
    """urljoin and urlsplit raise a bare ValueError ("Invalid IPv6 URL") on such a Location."""
    server = ScriptedServer(response_head(302, {"location": location, "content-length": "0"}))
    server.start()
    try:
        with pytest.raises(ImageInputError) as caught:
            fetch_image(server.url("/start.png"), Settings(url_allowlist=["127.0.0.1/32"]))
    finally:
        server.stop()
    assert str(caught.value) == f"{UNREACHABLE}: the server redirected to a malformed URL"
