"""PNG encoding of output images: at the fast levels a numpy Sub filter and one deflate call.

Encoding was the worker's largest CPU cost per job (docs/PERFORMANCE.md, "Saturation"):
Pillow's default (level 6, a filter chosen per row) took ~90 ms for a 512x512 output. At
levels up to FAST_LEVEL this encoder writes the same kind of file, 8-bit RGB, RGBA or
grayscale, non-interlaced, every row with PNG's Sub filter (each byte minus the byte one pixel
to its left), which costs one numpy subtraction plus one deflate call:
- level 0 stores the filtered rows uncompressed (zlib level 0): the least CPU, the most bytes;
- level 1 (the default) deflates them with Intel's ISA-L (`isal`, its default level 2), which
  on 512x512 outputs takes 4.5x to 16x less CPU than zlib at level 1 and writes 0-11% fewer
  bytes (figures in docs/PERFORMANCE.md). Its stream is ordinary zlib format: any PNG reader
  decodes it.
Both calls release the GIL, so the worker's encoding threads run in parallel. Above FAST_LEVEL,
where the point is the smallest files, Pillow encodes (its per-row filter choice compresses
better): level 6 writes exactly what Darkroom wrote before. Lossless at every level: Pillow
decodes the bytes to the same pixels (tests/worker/test_png.py). Deterministic for identical
pixels.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from isal import isal_zlib
from PIL import Image

SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Pillow mode -> PNG colour type, for the 8-bit modes written here; others go to Pillow.
COLOUR_TYPES = {"L": 0, "RGB": 2, "RGBA": 6}
SUB_FILTER = 1
#: The highest level the fast encoder takes; above it Pillow's smaller files are worth its time.
FAST_LEVEL = 1
#: ISA-L's own level for DARKROOM_PNG_COMPRESS_LEVEL=1: its default, as fast as its level 0 and
#: smaller (on the benchmark's images, 2.5 ms and 261 KiB against 2.6 ms and 344 KiB).
ISAL_LEVEL = isal_zlib.ISAL_DEFAULT_COMPRESSION


def encode(image: Image.Image, compress_level: int) -> bytes:
    """The PNG encoding of `image` at zlib `compress_level` (0-9)."""
    colour_type = COLOUR_TYPES.get(image.mode)
    # Palette, 16-bit, 1-bit, ... images are rare outputs: Pillow does them at any level.
    if colour_type is None or compress_level > FAST_LEVEL:
        return _pillow(image, compress_level)
    header = struct.pack(">IIBBBBB", image.width, image.height, 8, colour_type, 0, 0, 0)
    pixels = _deflate(_sub_filtered(image), compress_level)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", pixels) + _chunk(b"IEND", b"")


def _sub_filtered(image: Image.Image) -> bytes:
    """The image's rows, each as the filter byte then its bytes with the Sub filter applied."""
    channels = len(image.getbands())
    rows = np.asarray(image, dtype=np.uint8).reshape(image.height, image.width * channels)
    out = np.empty((image.height, rows.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = SUB_FILTER
    out[:, 1 : 1 + channels] = rows[:, :channels]  # the first pixel has no left neighbour
    np.subtract(rows[:, channels:], rows[:, :-channels], out=out[:, 1 + channels :])
    return out.tobytes()


def _deflate(data: bytes, compress_level: int) -> bytes:
    """A zlib stream of `data`: stored at level 0, ISA-L's default deflate at level 1."""
    if compress_level == 0:
        return zlib.compress(data, 0)
    return isal_zlib.compress(data, ISAL_LEVEL)


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(kind))
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _pillow(image: Image.Image, compress_level: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()
