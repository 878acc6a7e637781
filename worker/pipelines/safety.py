"""The NSFW check a request can ask for, and what a flagged image is replaced with.

Pipelines are loaded without their safety checker (diffusers' would black out flagged images
itself); when a request sets `safety_checker`, the worker runs Stable Diffusion's checker on the
finished images and replaces each flagged one according to `safety_checker_type`:

- blur: a Gaussian blur of radius 1/16 of the longer side (at least 4 px): shapes stay, no detail.
- pixelate: scaled down (nearest) until its longer side is 16 px, and back up (nearest).
- black: an all-black image.
- sensitive_content_text: a black image with "Sensitive content" in PIL's default font, centred.

All four keep the image's size and are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from worker.models.cache import SafetyChecker

NOTICE = "Sensitive content"
_PIXELATE_BLOCKS = 16


def flag_images(checker: SafetyChecker, images: list[Image.Image]) -> list[bool]:
    """One flag per image: True when the checker finds NSFW concepts in it."""
    model = checker.model
    inputs = checker.feature_extractor(images, return_tensors="pt").pixel_values
    pixels = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
    # The checker also blacks out its copy of flagged images; only its flags are used.
    _, flags = model(clip_input=inputs.to(device=model.device, dtype=model.dtype), images=pixels)
    return [bool(flag) for flag in flags]


def censor(image: Image.Image, how: str) -> Image.Image:
    """`image` made unrecognisable in the way `how` names (see the module docstring)."""
    replacements: dict[str, Callable[[Image.Image], Image.Image]] = {
        "blur": _blur,
        "pixelate": _pixelate,
        "black": _black,
        "sensitive_content_text": _notice,
    }
    if how not in replacements:
        raise ValueError(f"Unknown safety_checker_type {how!r}; use one of {sorted(replacements)}.")
    return replacements[how](image.convert("RGB"))


def _blur(image: Image.Image) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius=max(4.0, max(image.size) / 16)))


def _pixelate(image: Image.Image) -> Image.Image:
    longest = max(image.size)
    small = (
        max(1, image.width * _PIXELATE_BLOCKS // longest),
        max(1, image.height * _PIXELATE_BLOCKS // longest),
    )
    return image.resize(small, Image.Resampling.NEAREST).resize(
        image.size, Image.Resampling.NEAREST
    )


def _black(image: Image.Image) -> Image.Image:
    return Image.new("RGB", image.size, "black")


def _notice(image: Image.Image) -> Image.Image:
    notice = _black(image)
    draw = ImageDraw.Draw(notice)
    size = max(4, image.width // 10)
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = draw.textbbox((0, 0), NOTICE, font=font)
    while right - left > 0.9 * image.width and size > 4:  # shrink until it fits the width
        size -= 1
        font = ImageFont.load_default(size=size)
        left, top, right, bottom = draw.textbbox((0, 0), NOTICE, font=font)
    origin = ((image.width - (right - left)) / 2 - left, (image.height - (bottom - top)) / 2 - top)
    draw.text(origin, NOTICE, fill="white", font=font)
    return notice
