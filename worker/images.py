"""Init images: fetched through the SSRF guard with size and time limits, decoded defensively."""

from __future__ import annotations

import base64
import binascii
import io
import struct
import zlib
from collections.abc import Sequence
from urllib.parse import urljoin

import httpx
from PIL import ExifTags, Image, UnidentifiedImageError

from darkroom import outbound
from darkroom.limits import MAX_PIXELS, MAX_REQUEST_PIXELS, MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE
from darkroom.settings import Settings
from darkroom.urlguard import PinnedRequest, UnsafeURLError, check_url

UNREACHABLE = "Unable to fetch image from provided URL"
DAMAGED = f"{UNREACHABLE}: the image data is damaged"
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_REDIRECTS = 3
#: How a request on a kept connection fails when the server has just closed that connection.
CLOSED_UNDER_US = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)

#: What Pillow raises when the bytes it parses or decodes are wrong: its own OSError and
#: SyntaxError ("Truncated File Read", "could not create decoder object", "not a TIFF file"),
#: ValueError (also its limits on PNG text and ICC chunks), EOFError, and the errors of the
#: parsing under it: struct and zlib on short or corrupt data, index, key and type errors on
#: tables whose counts or types lie. Never MemoryError, nor anything else that is the worker's:
#: those stay internal errors. A decompression bomb is refused before, with its own message.
UNREADABLE = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    struct.error,
    zlib.error,
)
#: The transposition that turns an image upright, by EXIF orientation (as ImageOps.exif_transpose).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Pillow's own bomb guard, a backstop behind the check in `_open`: it only warns between this and
# twice this, and raises above, which is why the exact limit is checked here, from the header.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


class ImageInputError(ValueError):
    """An init image cannot be used; the message is safe to show the client."""


def fetch_images(urls: Sequence[str], settings: Settings) -> tuple[Image.Image, ...]:
    """A request's init images, decoded as RGB once every header has passed the pixel limits.

    Each image may have MAX_PIXELS, all of them together MAX_REQUEST_PIXELS; both are checked
    from the headers of all the images before any pixels are decoded.
    """
    opened = [_open(_fetch_bytes(url, settings)) for url in urls]
    if sum(image.width * image.height for image in opened) > MAX_REQUEST_PIXELS:
        raise ImageInputError(
            f"{UNREACHABLE}: the init images have too many pixels together "
            f"(at most {MAX_REQUEST_PIXELS} in one request)"
        )
    return tuple(_decode(image) for image in opened)


def fetch_image(url: str, settings: Settings) -> Image.Image:
    """Download (or, for a base64 `data:` URI, unpack) and decode one init image as RGB."""
    return fetch_images([url], settings)[0]


def _fetch_bytes(url: str, settings: Settings) -> bytes:
    if url.startswith("data:"):
        return _inline(url, settings.image_max_bytes)
    return _download(url, settings)


def _inline(uri: str, max_bytes: int) -> bytes:
    """The bytes of a base64 data: URI (the API already checked that it decodes)."""
    try:
        data = base64.b64decode(uri.partition(",")[2], validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("The base64 init_image is not valid base64") from None
    if len(data) > max_bytes:
        raise ImageInputError(f"The base64 init_image is larger than {max_bytes} bytes")
    return data


def _download(url: str, settings: Settings) -> bytes:
    """The body at `url`, following at most a few redirects, each one re-checked by the guard.

    DARKROOM_IMAGE_FETCH_TIMEOUT_S bounds the whole download, redirects included, and every
    part of each exchange (connect, TLS, the response head, the body) within it.
    """
    timeout_s = settings.image_fetch_timeout_s
    try:
        with outbound.deadline(timeout_s):
            return _follow(url, settings)
    except (httpx.TimeoutException, outbound.DeadlineExceededError):
        raise ImageInputError(f"{UNREACHABLE}: no complete answer within {timeout_s:g} s") from None


def _follow(url: str, settings: Settings) -> bytes:
    """Each hop through the thread's kept transport for its host (`outbound.thread_transport`,
    keep-alive: no TCP or TLS handshake per init image)."""
    for _ in range(MAX_REDIRECTS + 1):
        body, location = _get(_checked(url, settings), settings)
        if location is None:
            return body
        url = _redirect_target(url, location)
    raise ImageInputError(f"{UNREACHABLE}: too many redirects")


def _checked(url: str, settings: Settings) -> PinnedRequest:
    """The request to send for `url`, once the SSRF guard has passed it."""
    try:
        return check_url(url, settings.url_allowlist).pinned()
    except UnsafeURLError as exc:
        raise ImageInputError(f"{UNREACHABLE}: {exc}") from None
    except ValueError:  # urlsplit's own ("Invalid IPv6 URL"): not a message for the client
        raise ImageInputError(f"{UNREACHABLE}: the URL is malformed") from None


def _redirect_target(url: str, location: str) -> str:
    """The absolute URL a redirect's Location names (the server's word: it may not parse)."""
    try:
        return urljoin(url, location)
    except ValueError:  # an unclosed or invalid [IPv6] host
        raise ImageInputError(f"{UNREACHABLE}: the server redirected to a malformed URL") from None


def _get(target: PinnedRequest, settings: Settings) -> tuple[bytes, str | None]:
    """One GET at the checked address: the body (bounded), or the redirect target.

    A kept connection that the server closed just as the request went out fails with one of
    CLOSED_UNDER_US; the GET (safe to repeat) is then sent once more, on a new connection.
    """
    max_bytes = settings.image_max_bytes
    try:
        try:
            return _exchange(target, settings)
        except CLOSED_UNDER_US:
            return _exchange(target, settings)
    except outbound.TooLargeError:
        raise ImageInputError(
            f"{UNREACHABLE}: the image is larger than {max_bytes} bytes"
        ) from None
    except outbound.BadEncodingError as exc:
        raise ImageInputError(f"{UNREACHABLE}: {exc}") from None
    except httpx.TimeoutException:
        raise  # reported once, with the deadline, by _download
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise ImageInputError(f"{UNREACHABLE}: {type(exc).__name__}") from None


def _exchange(target: PinnedRequest, settings: Settings) -> tuple[bytes, str | None]:
    timeout_s = settings.image_fetch_timeout_s
    with outbound.send("GET", target, timeout=timeout_s, headers={}) as response:
        if response.is_redirect:
            return b"", response.headers.get("location")
        if response.status_code != 200:
            raise ImageInputError(f"{UNREACHABLE}: HTTP {response.status_code}")
        return outbound.read_body(response, settings.image_max_bytes), None


def decode_image(data: bytes) -> Image.Image:
    """PNG, JPEG or WebP only; at most MAX_PIXELS; EXIF orientation applied; alpha flattened."""
    return _decode(_open(data))


def _open(data: bytes) -> Image.Image:
    """The image's header only (Pillow decodes pixels lazily), its size checked. Parsing the
    header reads its metadata too (PNG text, ICC profiles, WebP's whole container): a file cut
    short or corrupt there fails here, before any pixel is decoded."""
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:  # an OSError: before UNREADABLE
        if _signed_as_accepted(data):  # Pillow calls a header it cannot parse unidentified
            raise ImageInputError(DAMAGED) from None
        raise ImageInputError(f"{UNREACHABLE}: not a PNG, JPEG or WebP image") from None
    except Image.DecompressionBombError:
        raise ImageInputError(f"{UNREACHABLE}: the image has too many pixels") from None
    except UNREADABLE:
        raise ImageInputError(DAMAGED) from None
    if image.width * image.height > MAX_PIXELS:
        raise ImageInputError(
            f"{UNREACHABLE}: the image has too many pixels "
            f"({image.width}x{image.height}; at most {MAX_PIXELS})"
        )
    return image


def _signed_as_accepted(data: bytes) -> bool:
    """Whether `data` starts as a PNG, JPEG or WebP file does."""
    webp = data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    return webp or data.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"))


def _decode(image: Image.Image) -> Image.Image:
    """The pixels, upright RGB; any failure of the image's own data is the client's input error."""
    try:
        image.load()
        return _normalise(image)
    except UNREADABLE:
        raise ImageInputError(DAMAGED) from None


def _normalise(image: Image.Image) -> Image.Image:
    """Upright RGB. An RGB image with no orientation to apply is returned as it is: the copies
    that `transpose` and `convert` would each make cost ~1 ms per 512x512 fetch."""
    image = _upright(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says.

    Only the orientation is read. ImageOps.exif_transpose also writes the EXIF back without it,
    and that fails (TypeError, struct.error) on tags that can be read but not written, after the
    pixels were turned: nothing here needs the EXIF afterwards. EXIF that cannot be parsed at
    all, or an orientation that is not one of 1..8, is ignored, and the pixels, which decoded
    fine, are used as they are stored, as a viewer that cannot read the EXIF shows them: refusing
    an image over metadata the generation never uses would help no client.
    """
    method = UPRIGHT.get(_orientation(image))
    return image if method is None else image.transpose(method)


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation 1..8 the image declares; 1 (as stored) when unreadable. (XMP
    orientation, which exif_transpose also read, is not: cameras and phones write EXIF.)"""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except UNREADABLE:
        return 1
    return value if isinstance(value, int) and value in UPRIGHT else 1


def output_size(width: int | None, height: int | None, first: Image.Image) -> tuple[int, int]:
    """The size to generate: as asked, else from the first image, within 1024, multiples of 8.

    With neither side given, the first image's size scaled down to fit 1024x1024. With one
    side given, the other follows the first image's aspect ratio. Sides then round down to a
    multiple of 8 (what the VAE needs), never below 64.
    """
    aspect = first.height / first.width
    if width is None and height is None:
        scale = min(1.0, MAX_SIDE / max(first.size))
        width, height = round(first.width * scale), round(first.height * scale)
    elif width is None:
        width = round(min(MAX_SIDE, (height or 0) / aspect))
    elif height is None:
        height = round(min(MAX_SIDE, width * aspect))
    return _snap(width or 0), _snap(height or 0)


def _snap(side: int) -> int:
    return max(MIN_SIDE, min(MAX_SIDE, side) // SIDE_MULTIPLE * SIDE_MULTIPLE)
