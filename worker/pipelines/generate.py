"""One generation, start to finish: check the request, get the model, run its pipeline.

`generate` is a plain function so that the Celery task stays a thin shell and tests can call it
directly. It refuses impossible input with a `ValueError` whose message can be shown to a client.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from PIL import Image

from darkroom.settings import Settings
from worker.models.cache import ModelCache
from worker.models.registry import resolve_model
from worker.pipelines import img2img, mixer, pix2pix
from worker.pipelines.request import (
    IMG2IMG,
    IMG_MIXER,
    PIX2PIX,
    GenerationRequest,
    GenerationResult,
)

Runner = Callable[[tuple[Any, ...], GenerationRequest], list[Image.Image]]

_RUNNERS: dict[str, Runner] = {IMG2IMG: img2img.run, PIX2PIX: pix2pix.run, IMG_MIXER: mixer.run}
# The number of init images each operation accepts, inclusive.
_IMAGE_COUNTS = {IMG2IMG: (1, 1), PIX2PIX: (1, 1), IMG_MIXER: (1, 4)}
MAX_SAMPLES = 4


def generate(request: GenerationRequest, cache: ModelCache, settings: Settings) -> GenerationResult:
    """Run `request` on its model (loading it into `cache` if needed) and time the parts."""
    check_request(request)
    model, load_seconds = cache.get(resolve_model(request.operation, request.model_id, settings))
    started = time.perf_counter()
    images = _RUNNERS[request.operation](model.pipelines, request)
    pipeline_seconds = time.perf_counter() - started
    return GenerationResult(
        images=[image.convert("RGB") for image in images],
        pipeline_seconds=pipeline_seconds,
        model_load_seconds=load_seconds,
    )


def check_request(request: GenerationRequest) -> None:
    """Raise ValueError when no pipeline could run `request`."""
    if request.operation not in _RUNNERS:
        raise ValueError(f"Unknown operation {request.operation!r}.")
    low, high = _IMAGE_COUNTS[request.operation]
    if not low <= len(request.images) <= high:
        expected = str(low) if low == high else f"{low} to {high}"
        count = len(request.images)
        raise ValueError(f"{request.operation} takes {expected} init images, not {count}.")
    if not 1 <= len(request.seeds) <= MAX_SAMPLES:
        raise ValueError(f"1 to {MAX_SAMPLES} samples can be made, not {len(request.seeds)}.")
    if request.width % 8 or request.height % 8 or min(request.width, request.height) < 8:
        raise ValueError("Width and height must be positive multiples of 8.")
    if request.operation == IMG_MIXER:
        _check_mixer_weights(request)


def _check_mixer_weights(request: GenerationRequest) -> None:
    if len(request.image_weights) != len(request.images):
        raise ValueError(
            f"Got {len(request.image_weights)} image weights for {len(request.images)} images; "
            "give one weight per image."
        )
    if any(weight < 0 for weight in request.image_weights):
        raise ValueError("Image weights must not be negative.")
    if not request.prompt and not any(weight > 0 for weight in request.image_weights):
        raise ValueError("Give a prompt or at least one image with a positive weight.")
