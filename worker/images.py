"""Init images: fetched through the SSRF guard with size and time limits, decoded defensively."""

from __future__ import annotations

import base64
import binascii
import io
from urllib.parse import urljoin

import httpx
from PIL import Image, ImageOps, UnidentifiedImageError

from darkroom.settings import Settings
from darkroom.urlguard import PinnedRequest, UnsafeURLError, check_url

UNREACHABLE = "Unable to fetch image from provided URL"
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_PIXELS = 40_000_000
MAX_REDIRECTS = 3
MAX_SIDE = 1024
SIDE_MULTIPLE = 8


class ImageInputError(ValueError):
    """An init image cannot be used; the message is safe to show the client."""


def fetch_image(url: str, settings: Settings) -> Image.Image:
    """Download (or, for a base64 `data:` URI, unpack) and decode one init image as RGB."""
    if url.startswith("data:"):
        return decode_image(_inline(url, settings.image_max_bytes))
    return decode_image(_download(url, settings))


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
    """The body at `url`, following at most a few redirects, each one re-checked by the guard."""
    timeout = httpx.Timeout(settings.image_fetch_timeout_s)
    with httpx.Client(timeout=timeout, follow_redirects=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            try:
                target = check_url(url, settings.url_allowlist).pinned()
            except UnsafeURLError as exc:
                raise ImageInputError(f"{UNREACHABLE}: {exc}") from None
            body, location = _get(client, target, settings.image_max_bytes)
            if location is None:
                return body
            url = urljoin(url, location)
    raise ImageInputError(f"{UNREACHABLE}: too many redirects")


def _get(client: httpx.Client, target: PinnedRequest, max_bytes: int) -> tuple[bytes, str | None]:
    """One GET at the checked address: the body (bounded), or the redirect target."""
    headers = {"host": target.host_header}
    try:
        with client.stream(
            "GET", target.url, headers=headers, extensions=target.extensions
        ) as response:
            if response.is_redirect:
                return b"", response.headers.get("location")
            if response.status_code != 200:
                raise ImageInputError(f"{UNREACHABLE}: HTTP {response.status_code}")
            return _read_bounded(response, max_bytes), None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise ImageInputError(f"{UNREACHABLE}: {type(exc).__name__}") from None


def _read_bounded(response: httpx.Response, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise ImageInputError(f"{UNREACHABLE}: the image is larger than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_image(data: bytes) -> Image.Image:
    """PNG, JPEG or WebP only; EXIF orientation applied; transparency flattened onto white."""
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS  # decompression bombs raise instead of eating memory
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise ImageInputError(f"{UNREACHABLE}: not a PNG, JPEG or WebP image") from None
    except Image.DecompressionBombError:
        raise ImageInputError(f"{UNREACHABLE}: the image has too many pixels") from None
    try:
        image.load()
    except (OSError, SyntaxError, ValueError):
        raise ImageInputError(f"{UNREACHABLE}: the image data is damaged") from None
    return _normalise(image)


def _normalise(image: Image.Image) -> Image.Image:
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


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


def png_bytes(image: Image.Image) -> bytes:
    """The PNG encoding of `image`; deterministic for identical pixels."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _snap(side: int) -> int:
    return max(64, min(MAX_SIDE, side) // SIDE_MULTIPLE * SIDE_MULTIPLE)
