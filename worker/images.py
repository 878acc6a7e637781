"""Init images: fetched through the SSRF guard with size and time limits, decoded defensively."""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from urllib.parse import urljoin

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from darkroom import outbound
from darkroom.limits import MAX_PIXELS, MAX_REQUEST_PIXELS, MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE
from darkroom.settings import Settings
from darkroom.urlguard import PinnedRequest, UnsafeURLError, check_url

UNREACHABLE = "Unable to fetch image from provided URL"
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_REDIRECTS = 3
#: How a request on a kept connection fails when the server has just closed that connection.
CLOSED_UNDER_US = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)

# Pillow's own bomb guard, a backstop behind `_check_pixels`: it only warns between this and
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
        try:
            target = check_url(url, settings.url_allowlist).pinned()
        except UnsafeURLError as exc:
            raise ImageInputError(f"{UNREACHABLE}: {exc}") from None
        body, location = _get(target, settings)
        if location is None:
            return body
        url = urljoin(url, location)
    raise ImageInputError(f"{UNREACHABLE}: too many redirects")


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
    """The image's header only (Pillow decodes pixels lazily), its size checked."""
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise ImageInputError(f"{UNREACHABLE}: not a PNG, JPEG or WebP image") from None
    except Image.DecompressionBombError:
        raise ImageInputError(f"{UNREACHABLE}: the image has too many pixels") from None
    if image.width * image.height > MAX_PIXELS:
        raise ImageInputError(
            f"{UNREACHABLE}: the image has too many pixels "
            f"({image.width}x{image.height}; at most {MAX_PIXELS})"
        )
    return image


def _decode(image: Image.Image) -> Image.Image:
    try:
        image.load()
    except (OSError, SyntaxError, ValueError):
        raise ImageInputError(f"{UNREACHABLE}: the image data is damaged") from None
    return _normalise(image)


def _normalise(image: Image.Image) -> Image.Image:
    """Upright RGB. An RGB image with no orientation to apply is returned as it is: the copies
    that `exif_transpose` and `convert` would each make cost ~1 ms per 512x512 fetch."""
    ImageOps.exif_transpose(image, in_place=True)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


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
