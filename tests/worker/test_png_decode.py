"""The libspng fast path for init PNGs (worker.png_decode): Pillow's pixels and Pillow's errors.

Every case compares `decode_image` with the same call on the Pillow-only path (the fast path
switched off), and checks whether the fast path was taken, so that a case meant for it cannot
pass by quietly going to Pillow.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import pyspng  # type: ignore[import-untyped]  # no stubs; only its `load` is replaced here
import pytest
from PIL import Image, PngImagePlugin

from darkroom.limits import MAX_PIXELS, MAX_REQUEST_PIXELS
from darkroom.settings import Settings
from worker import images, png_decode
from worker.images import ImageInputError, decode_image, fetch_images

Pixels = np.ndarray  # height x width x 3, uint8
#: Adam7's passes: first column, first row, column step, row step.
ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def ihdr(width: int, height: int, *, depth: int = 8, colour: int = 2, interlace: int = 0) -> bytes:
    return chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace))


def filtered(pixels: Pixels, kind: int) -> bytes:
    """`pixels`' scanlines, each with PNG filter `kind` (0 None .. 4 Paeth) and its type byte."""
    x = pixels.reshape(pixels.shape[0], -1).astype(np.int16)
    up = np.vstack([np.zeros_like(x[:1]), x[:-1]])
    left = np.hstack([np.zeros_like(x[:, :3]), x[:, :-3]])
    upleft = np.hstack([np.zeros_like(up[:, :3]), up[:, :-3]])
    if kind == 0:
        predicted = np.zeros_like(x)
    elif kind == 1:
        predicted = left
    elif kind == 2:
        predicted = up
    elif kind == 3:
        predicted = (left + up) // 2
    else:
        p = left + up - upleft
        pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
        predicted = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
    rows = ((x - predicted) % 256).astype(np.uint8)
    return b"".join(bytes([kind]) + row.tobytes() for row in rows)


def rgb_png(pixels: Pixels, *, kind: int = 4, interlace: int = 0, before: bytes = b"") -> bytes:
    """An 8-bit RGB PNG written here, every row with filter `kind`, Adam7 when `interlace`."""
    height, width = pixels.shape[:2]
    if interlace:
        passes = [pixels[y0::dy, x0::dx] for x0, y0, dx, dy in ADAM7]
        raw = b"".join(filtered(p, kind) for p in passes if p.size)
    else:
        raw = filtered(pixels, kind)
    return (
        png_decode.SIGNATURE
        + ihdr(width, height, interlace=interlace)
        + before
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def pillow_png(image: Image.Image, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Pixels:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def smooth(width: int, height: int) -> Pixels:
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 255 // max(1, width - 1), ys * 255 // max(1, height - 1), xs ^ ys], -1)


@pytest.fixture
def pillow_only(monkeypatch: pytest.MonkeyPatch) -> Callable[[bytes], Image.Image]:
    """`decode_image` as it was before the fast path: Pillow alone."""

    def decode(data: bytes) -> Image.Image:
        with monkeypatch.context() as patch:
            patch.setattr(png_decode, "decode_rgb8", lambda _data, _image: None)
            return decode_image(data)

    return decode


def took_fast_path(data: bytes) -> bool:
    return png_decode.decode_rgb8(data, images._open(data)) is not None


def outcome(decode: Callable[[bytes], Image.Image], data: bytes) -> tuple[object, ...]:
    try:
        image = decode(data)
    except Exception as exc:  # any exception: the two paths must raise the same one
        return ("raised", type(exc), str(exc))
    return ("decoded", image.mode, image.size, image.tobytes())


@pytest.mark.parametrize("kind", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("interlace", [0, 1])
@pytest.mark.parametrize("size", [(1, 1), (3, 5), (17, 9), (64, 33)])
@pytest.mark.parametrize("content", [noise, smooth])
def test_each_filter_and_interlacing_decode_to_pillows_pixels(
    kind: int,
    interlace: int,
    size: tuple[int, int],
    content: Callable[[int, int], Pixels],
    pillow_only: Callable[[bytes], Image.Image],
) -> None:
    data = rgb_png(content(*size).astype(np.uint8), kind=kind, interlace=interlace)
    assert took_fast_path(data)
    assert outcome(decode_image, data) == outcome(pillow_only, data)


@pytest.mark.parametrize("level", [0, 1, 6, 9])
@pytest.mark.parametrize("size", [(1, 7), (31, 17), (512, 512)])
def test_pillow_written_rgb_pngs_decode_to_pillows_pixels(
    level: int, size: tuple[int, int], pillow_only: Callable[[bytes], Image.Image]
) -> None:
    """Pillow picks a filter per row (adaptive) and splits IDAT: the files most clients send."""
    image = Image.fromarray(noise(*size) // 2 + smooth(*size).astype(np.uint8) // 2)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a prompt")  # what Stable Diffusion front ends write
    data = pillow_png(image, compress_level=level, pnginfo=info, dpi=(72, 72))
    assert took_fast_path(data)
    decoded = decode_image(data)
    assert outcome(decode_image, data) == outcome(pillow_only, data)
    assert decoded.info == pillow_only(data).info  # text, dpi: as Pillow's image had them


def exif_oriented(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description tiff:Orientation="6"/>'
    b"</rdf:RDF></x:xmpmeta>"
)


def xmp_info() -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", XMP.decode())
    return info


def raw_exif_info() -> PngImagePlugin.PngInfo:
    data = exif_oriented(6)
    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", f"\nexif\n{len(data):8}\n{data.hex()}\n", zip=True)
    return info


def sixteen_bit_rgb() -> bytes:
    raw = b"".join(b"\0" + bytes(range(6 * 4)) for _ in range(3))
    idat = chunk(b"IDAT", zlib.compress(raw))
    return png_decode.SIGNATURE + ihdr(4, 3, depth=16) + idat + chunk(b"IEND", b"")


def chunk_after_image_data(kind: bytes, body: bytes) -> bytes:
    data = rgb_png(noise(9, 7))
    end = data.rindex(b"IEND") - 4
    return data[:end] + chunk(kind, body) + data[end:]


RGB = Image.fromarray(noise(13, 11))
OTHER_KINDS: dict[str, Callable[[], bytes]] = {
    "grayscale": lambda: pillow_png(RGB.convert("L")),
    "grayscale + alpha": lambda: pillow_png(RGB.convert("LA")),
    "palette": lambda: pillow_png(RGB.convert("P")),
    "palette + transparency": lambda: pillow_png(RGB.convert("P"), transparency=0),
    "RGBA": lambda: pillow_png(RGB.convert("RGBA")),
    "RGB 16-bit": sixteen_bit_rgb,
    "RGB + tRNS": lambda: pillow_png(RGB, transparency=(1, 2, 3)),
    "RGB + EXIF orientation": lambda: pillow_png(RGB, exif=exif_oriented(6)),
    "RGB + EXIF, no orientation": lambda: pillow_png(RGB, exif=exif_oriented(1)),
    "RGB + XMP orientation": lambda: pillow_png(RGB, pnginfo=xmp_info()),
    "RGB + raw-profile EXIF": lambda: pillow_png(RGB, pnginfo=raw_exif_info()),
    "RGB + eXIf after the pixels": lambda: chunk_after_image_data(b"eXIf", exif_oriented(6)),
    "RGB + text after the pixels": lambda: chunk_after_image_data(b"tEXt", b"k\0v"),
    "RGB + PLTE": lambda: rgb_png(noise(5, 4), before=chunk(b"PLTE", bytes(range(30)))),
    "RGB + unknown chunk": lambda: rgb_png(noise(5, 4), before=chunk(b"abCd", b"?")),
    "RGB + unknown critical chunk": lambda: rgb_png(noise(5, 4), before=chunk(b"ABCD", b"?")),
    "JPEG": lambda: encoded(RGB, "JPEG"),
    "WebP": lambda: encoded(RGB, "WEBP"),
}


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", OTHER_KINDS)
def test_other_kinds_keep_the_pillow_path(
    kind: str, pillow_only: Callable[[bytes], Image.Image]
) -> None:
    data = OTHER_KINDS[kind]()
    assert not took_fast_path(data)
    assert outcome(decode_image, data) == outcome(pillow_only, data)
    assert decode_image(data).mode == "RGB"


@pytest.mark.parametrize(
    "data",
    [
        pillow_png(RGB, exif=exif_oriented(6)),
        pillow_png(RGB, pnginfo=xmp_info()),
        pillow_png(RGB, pnginfo=raw_exif_info()),
        chunk_after_image_data(b"eXIf", exif_oriented(6)),
    ],
    ids=["eXIf", "XMP", "raw profile", "eXIf after IDAT"],
)
def test_rgb_pngs_with_an_orientation_are_turned_upright(data: bytes) -> None:
    width, height = Image.open(io.BytesIO(data)).size
    assert decode_image(data).size == (height, width)


def damaged_variants() -> Iterator[tuple[str, bytes]]:
    """A fast-path file and ways it can arrive broken."""
    good = pillow_png(Image.fromarray(noise(48, 40)), compress_level=6)
    idat = good.index(b"IDAT") - 4
    (length,) = struct.unpack_from(">I", good, idat)
    crc_at = idat + 8 + length
    yield "intact", good
    for cut in range(9, len(good), 97):
        yield f"truncated at {cut}", good[:cut]
    yield "without IEND", good[: good.rindex(b"IEND") - 4]
    for offset in (2, 20, length // 2, length - 6, length - 1):
        flipped = bytearray(good)
        flipped[idat + 8 + offset] ^= 0x5A
        yield f"IDAT byte {offset} flipped", bytes(flipped)
    bad_crc = bytearray(good)
    bad_crc[crc_at] ^= 0xFF
    yield "IDAT CRC wrong, data intact", bytes(bad_crc)
    bad_crc = bytearray(good)
    bad_crc[-1] ^= 0xFF
    yield "IEND CRC wrong", bytes(bad_crc)
    garbage = np.random.default_rng(7).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    yield "garbage after the header", good[:33] + garbage
    yield "garbage after IHDR and IDAT's head", good[: idat + 8] + garbage
    yield "garbage after the end", good + garbage
    inflated = zlib.decompress(good[idat + 8 : crc_at])
    for name, stream in {
        "image data one byte short": zlib.compress(inflated[:-1]),
        "image data too long": zlib.compress(inflated + bytes(100)),
        "unknown filter type": zlib.compress(b"\x07" + inflated[1:]),
        "not deflate": garbage[:200],
    }.items():
        yield name, good[:idat] + chunk(b"IDAT", stream) + good[crc_at + 4 :]
    split = good[:idat] + chunk(b"IDAT", good[idat + 8 : idat + 100]) + chunk(b"tEXt", b"k\0v")
    yield (
        "text between IDATs",
        split + chunk(b"IDAT", good[idat + 100 : crc_at]) + good[crc_at + 4 :],
    )


@pytest.mark.parametrize(("name", "data"), list(damaged_variants()), ids=lambda v: str(v)[:40])
def test_damaged_files_fare_as_with_pillow(
    name: str, data: bytes, pillow_only: Callable[[bytes], Image.Image]
) -> None:
    expected = outcome(pillow_only, data)
    assert outcome(decode_image, data) == expected, name
    assert expected[0] == "decoded" or expected[1] is ImageInputError


def test_damage_is_reported_as_before() -> None:
    good = pillow_png(Image.fromarray(noise(48, 40)))
    with pytest.raises(ImageInputError, match="the image data is damaged"):
        decode_image(good[: len(good) // 2])


@pytest.mark.xfail(strict=True, reason="pyspng has libspng skip the Adler-32: see png_decode")
def test_a_forged_adler32_with_recomputed_crcs_is_refused_as_by_pillow(
    pillow_only: Callable[[bytes], Image.Image],
) -> None:
    good = pillow_png(Image.fromarray(noise(48, 40)))
    idat = good.index(b"IDAT") - 4
    (length,) = struct.unpack_from(">I", good, idat)
    stream = bytearray(good[idat + 8 : idat + 8 + length])
    stream[-1] ^= 0xFF
    forged = good[:idat] + chunk(b"IDAT", bytes(stream)) + good[idat + 12 + length :]
    assert outcome(decode_image, forged) == outcome(pillow_only, forged)


def header_only(width: int, height: int) -> bytes:
    """A tiny file whose IHDR claims width x height: fine until its pixels are decoded."""
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return png_decode.SIGNATURE + ihdr(width, height) + idat + chunk(b"IEND", b"")


@pytest.fixture
def libspng_forbidden(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(_data: bytes, _format: str | None = None) -> object:
        raise AssertionError("libspng was handed a file over the pixel limits")

    monkeypatch.setattr(pyspng, "load", refuse)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.usefixtures("libspng_forbidden")
def test_the_pixel_limit_is_checked_before_libspng_sees_the_file() -> None:
    side = int(MAX_PIXELS**0.5) + 1  # over the limit, under twice it: Pillow only warns
    with pytest.raises(ImageInputError, match="too many pixels"):
        decode_image(header_only(side, side))


@pytest.mark.usefixtures("libspng_forbidden")
def test_libspng_decodes_only_the_size_that_pillow_read() -> None:
    small = header_only(8, 8)
    big = small[:8] + ihdr(8, 9000) + small[33:]  # another IHDR: another file
    assert png_decode.decode_rgb8(big, images._open(small)) is None


@pytest.mark.usefixtures("libspng_forbidden")
def test_a_request_over_its_pixel_budget_is_refused_before_any_decoding() -> None:
    side = int((MAX_REQUEST_PIXELS / 3) ** 0.5) + 1  # each image within MAX_PIXELS, 3 too many
    assert side * side <= MAX_PIXELS
    uri = "data:image/png;base64," + base64.b64encode(header_only(side, side)).decode()
    with pytest.raises(ImageInputError, match="too many pixels together"):
        fetch_images([uri] * 3, Settings())
