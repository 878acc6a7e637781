"""A faster decoder for the commonest init image, an 8-bit RGB PNG: libspng (`pyspng`).

Pillow's PNG decoding was almost all of the ~5 ms of worker CPU that fetching a 512x512 init
image costs (benchmarks/saturation.py); libspng decodes the same file in about two thirds of
the time (figures in the commit that added this module). It is used only where its result is
provably Pillow's, pixel for pixel, after `worker.images._normalise`; anything else, and any
file libspng refuses, returns None and goes to Pillow, which then decodes it or reports the
damage exactly as before:
- the file as a whole: 8-bit truecolor without alpha (colour type 2), interlaced or not, the
  IHDR's size the one Pillow read and checked against MAX_PIXELS in `worker.images._open`;
- its chunks: IHDR first, then only chunks that affect neither library's pixels (the
  SAFE_ANCILLARY list: colour-space and text metadata, which both ignore), one run of IDAT,
  then IEND. Not tRNS (Pillow keeps it in `info`, a later conversion might apply it), nor
  PLTE, APNG frames or unknown chunks; nothing but IEND after the image data, so that Pillow's
  `info` (what its EXIF orientation comes from) is complete before any pixel is decoded;
- no EXIF orientation: none of the `info` keys Pillow reads one from (ORIENTATION_SOURCES);
- every IDAT's CRC right. pyspng tells libspng to ignore CRCs and so also the zlib stream's
  Adler-32, which Pillow checks: without this, a damaged IDAT that still inflates would give
  garbled pixels where Pillow reports damage. With it, damage by accident (flipped or lost
  bytes) goes to Pillow. A file forged with a wrong Adler-32 but recomputed CRCs still decodes
  here, to the pixels its deflate stream holds, where Pillow refuses it.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pyspng  # type: ignore[import-untyped]  # no stubs: called only through `_spng_rgb8`
from isal import isal_zlib
from PIL import Image

from darkroom.limits import MAX_PIXELS

SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Length, type, width, height, bit depth, colour type, compression, filter, interlace.
IHDR = struct.Struct(">I4sIIBBBBB")
CHUNK_HEAD = struct.Struct(">I4s")
TRUECOLOR = 2
#: Chunks neither Pillow nor libspng (as pyspng calls it: no gamma, no tRNS) lets change the
#: decoded pixels of a colour type 2 image; Pillow has already parsed (and CRC-checked) them.
SAFE_ANCILLARY = frozenset(
    {b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"sBIT", b"pHYs", b"tIME", b"bKGD"}
    | {b"tEXt", b"zTXt", b"iTXt"}  # orientation in text is caught by ORIENTATION_SOURCES
)
#: Where `PIL.Image.Image.getexif` finds an EXIF orientation for `ImageOps.exif_transpose`.
ORIENTATION_SOURCES = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


def decode_rgb8(data: bytes, image: Image.Image) -> Image.Image | None:
    """`image` (Pillow's opened, not yet decoded `data`) decoded as upright RGB by libspng, or
    None where Pillow must decode it (see the module's docstring)."""
    if image.format != "PNG" or image.mode != "RGB" or not _plain_info(image):
        return None
    if not _plain_rgb8(data, image.size):
        return None
    pixels = _spng_rgb8(data)
    if pixels is None or pixels.shape != (image.height, image.width, 3):
        return None
    decoded = Image.frombuffer("RGB", image.size, pixels, "raw", "RGB", 0, 1)
    decoded.info = image.info  # what Pillow's image carries: dpi, icc_profile, text
    return decoded


def _plain_info(image: Image.Image) -> bool:
    info = image.info
    return "transparency" not in info and not any(key in info for key in ORIENTATION_SOURCES)


def _plain_rgb8(data: bytes, size: tuple[int, int]) -> bool:
    """Whether `data`'s chunks are those of the module's docstring, its IHDR of `size`."""
    if not data.startswith(SIGNATURE) or len(data) < len(SIGNATURE) + IHDR.size + 4:
        return False
    length, kind, width, height, depth, colour, compression, filtering, interlace = (
        IHDR.unpack_from(data, len(SIGNATURE))
    )
    if (length, kind, (width, height)) != (13, b"IHDR", size) or width * height > MAX_PIXELS:
        return False
    if (depth, colour, compression, filtering) != (8, TRUECOLOR, 0, 0) or interlace > 1:
        return False
    position = len(SIGNATURE) + 12 + length
    seen_idat = False
    while position + CHUNK_HEAD.size <= len(data):
        length, kind = CHUNK_HEAD.unpack_from(data, position)
        end = position + CHUNK_HEAD.size + length
        if end + 4 > len(data):
            return False  # truncated: Pillow tells how
        if kind == b"IDAT":  # a later run of IDAT fails below, at the chunk between them
            crc = int.from_bytes(data[end : end + 4], "big")
            if isal_zlib.crc32(memoryview(data)[position + 4 : end]) != crc:
                return False
            seen_idat = True
        elif kind == b"IEND":
            return seen_idat and length == 0
        elif seen_idat or kind not in SAFE_ANCILLARY:
            return False
        position = end + 4
    return False


def _spng_rgb8(data: bytes) -> np.ndarray[Any, np.dtype[np.uint8]] | None:
    """libspng's 8-bit RGB pixels of `data` (height x width x 3), or None where it refuses."""
    try:
        pixels = pyspng.load(data, "RGB")
    except RuntimeError:  # libspng's errors (pybind11 maps its std::runtime_error here)
        return None
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
        return None
    return pixels
