"""One generation, start to finish: check the request, get the models, run, check for NSFW.

`generate` is a plain function so that the Celery task stays a thin shell and tests can call it
directly. It refuses impossible input with a `ValueError` whose message can be shown to a client.
Its two halves, `load_for` and `run_loaded`, also run several compatible requests as one
pipeline call; `worker.batching` decides which requests go together.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from PIL import Image

from darkroom.families import AskedFields, refusals
from darkroom.identities import SAFETY_CHECKER_TYPES, Family, Operation
from darkroom.limits import (
    MAX_CLIP_SKIP,
    MAX_IMAGES,
    MAX_SAMPLES,
    SIDE_MULTIPLE,
    TOO_FEW_DENOISING_STEPS,
    denoises_nothing,
)
from darkroom.settings import Settings
from worker.families import img2img_runner
from worker.models.cache import SAFETY_CHECKER, VAE, ComponentSource, ModelCache
from worker.models.weights import (
    ModelSpec,
    resolve_embedding,
    resolve_lora,
    resolve_model,
    resolve_safety_checker,
    resolve_vae,
)
from worker.pipelines import img2img, mixer, pix2pix
from worker.pipelines.options import RequestAssets
from worker.pipelines.request import GenerationRequest, GenerationResult, StepHook
from worker.pipelines.safety import censor, flag_images
from worker.pipelines.schedulers import check_scheduler_name

#: Runs compatible requests on their pipelines; the images of each request, in order.
Runner = Callable[
    [tuple[Any, ...], Sequence[GenerationRequest], RequestAssets, StepHook | None],
    list[list[Image.Image]],
]

_RUNNERS: dict[str, Runner] = {
    Operation.IMG2IMG: img2img.run_batch,
    Operation.PIX2PIX: pix2pix.run_batch,
    Operation.IMG_MIXER: mixer.run_batch,
}
# The number of init images each operation accepts, inclusive.
_IMAGE_COUNTS = {
    Operation.IMG2IMG: (1, 1),
    Operation.PIX2PIX: (1, 1),
    Operation.IMG_MIXER: (1, MAX_IMAGES),
}
# Options of Stable Diffusion models, which the image mixer (Kandinsky) cannot apply.
_SD_OPTIONS = (
    "scheduler",
    "use_karras_sigmas",
    "algorithm_type",
    "loras",
    "vae",
    "embeddings",
    "clip_skip",
    "tomesd",
)
_SD_DEFAULTS = {f.name: f.default for f in fields(GenerationRequest) if f.name in _SD_OPTIONS}


def generate(request: GenerationRequest, cache: ModelCache, settings: Settings) -> GenerationResult:
    """Run `request` on its model (loading what it needs into `cache`) and time the parts.

    `pipeline_seconds` covers the diffusion calls and the safety check; `model_load_seconds`
    the loading of the model, its VAE and the safety checker (0.0 when all were resident).
    """
    check_request(request)
    loaded = load_for([request], cache, settings)
    [result] = run_loaded(loaded, [request], cache, settings, request.on_step)
    return result


@dataclass(frozen=True)
class Loaded:
    """The resident model and options that a group of compatible requests runs on."""

    spec: ModelSpec
    pipelines: tuple[Any, ...]
    assets: RequestAssets
    load_seconds: float  # spent loading the model and the VAE now (0.0 when resident)


def load_for(
    requests: Sequence[GenerationRequest], cache: ModelCache, settings: Settings
) -> Loaded:
    """Load the model and options of `requests`, which share them (the first one's are used)."""
    first = requests[0]
    spec = resolve_model(first.operation, first.model_id, settings)
    for request in requests:
        check_family(spec.family, request)
    model, model_seconds = cache.get(spec)
    assets, assets_seconds = load_assets(first, cache, settings, spec)
    return Loaded(spec, model.pipelines, assets, model_seconds + assets_seconds)


def run_loaded(
    loaded: Loaded,
    requests: Sequence[GenerationRequest],
    cache: ModelCache,
    settings: Settings,
    on_step: StepHook | None = None,
) -> list[GenerationResult]:
    """Run `requests` in one pipeline call (per prompt length), then each one's safety check.

    Every result carries the whole call's time: what each of its clients waited.
    """
    started = time.perf_counter()
    operation = requests[0].operation
    runner = (
        img2img_runner(loaded.spec.family)
        if operation == Operation.IMG2IMG
        else _RUNNERS[operation]
    )
    batches = runner(loaded.pipelines, requests, loaded.assets, on_step)
    checked, checker_seconds = [], 0.0
    for request, images in zip(requests, batches, strict=True):
        checker, seconds = _load_checker(request, cache, settings, loaded.spec)
        checker_seconds += seconds
        checked.append(_checked([image.convert("RGB") for image in images], checker, request))
    pipeline_seconds = time.perf_counter() - started - checker_seconds
    return [
        GenerationResult(
            images=images,
            pipeline_seconds=pipeline_seconds,
            model_load_seconds=loaded.load_seconds + checker_seconds,
            nsfw=nsfw,
        )
        for images, nsfw in checked
    ]


def _checked(
    images: list[Image.Image], checker: Any, request: GenerationRequest
) -> tuple[list[Image.Image], list[bool]]:
    """The images, each flagged one censored as the request says, and the flags."""
    nsfw = flag_images(checker, images) if checker is not None else [False] * len(images)
    return _censored(images, nsfw, request.safety_checker_type), nsfw


def load_assets(
    request: GenerationRequest, cache: ModelCache, settings: Settings, spec: ModelSpec
) -> tuple[RequestAssets, float]:
    """Locate the request's LoRAs and embeddings, load its VAE; the seconds spent loading."""
    vae, seconds = None, 0.0
    if request.vae is not None:
        source = ComponentSource(VAE, resolve_vae(request.vae, settings))
        vae, seconds = cache.component(source, pinned=[spec])
    family = spec.family
    loras = tuple(
        (resolve_lora(lora.name, settings, family), lora.strength) for lora in request.loras
    )
    embeddings = tuple(
        (name, resolve_embedding(name, settings, family)) for name in request.embeddings
    )
    return RequestAssets(vae=vae, loras=loras, embeddings=embeddings), seconds


def _load_checker(
    request: GenerationRequest, cache: ModelCache, settings: Settings, spec: ModelSpec
) -> tuple[Any, float]:
    """The safety checker when the request wants one (else None), and its loading time."""
    if not request.safety_checker:
        return None, 0.0
    location = resolve_safety_checker(settings, request.prompt)
    pinned: list[Any] = [spec]
    if request.vae is not None:
        pinned.append(ComponentSource(VAE, resolve_vae(request.vae, settings)))
    return cache.component(ComponentSource(SAFETY_CHECKER, location), pinned=pinned)


def _censored(images: list[Image.Image], nsfw: list[bool], how: str) -> list[Image.Image]:
    """The images with each flagged one replaced as `how` says."""
    return [
        censor(image, how) if flagged else image
        for image, flagged in zip(images, nsfw, strict=True)
    ]


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
    if (
        request.width % SIDE_MULTIPLE
        or request.height % SIDE_MULTIPLE
        or min(request.width, request.height) < SIDE_MULTIPLE
    ):
        raise ValueError(f"Width and height must be positive multiples of {SIDE_MULTIPLE}.")
    _check_options(request)
    if request.operation == Operation.IMG_MIXER:
        _check_mixer_weights(request)


def _check_options(request: GenerationRequest) -> None:
    """Refuse option values that no pipeline of this operation can apply."""
    if request.safety_checker_type not in SAFETY_CHECKER_TYPES:
        raise ValueError(f"safety_checker_type must be one of {', '.join(SAFETY_CHECKER_TYPES)}.")
    if request.clip_skip is not None and not 1 <= request.clip_skip <= MAX_CLIP_SKIP:
        raise ValueError(f"clip_skip must be between 1 and {MAX_CLIP_SKIP}.")
    if request.scheduler is not None:
        check_scheduler_name(request.scheduler)
    if request.operation == Operation.IMG2IMG and denoises_nothing(request.steps, request.strength):
        # The API refuses these; a job stored before it did still fails clearly.
        raise ValueError(TOO_FEW_DENOISING_STEPS)
    if request.operation == Operation.IMG_MIXER:
        changed = [name for name in _SD_OPTIONS if getattr(request, name) != _SD_DEFAULTS[name]]
        if changed:
            raise ValueError(f"img_mixer does not support {', '.join(changed)}.")


def check_family(family: Family, request: GenerationRequest) -> None:
    """Refuse what the model's family cannot apply (the API refuses it before queueing; this is
    the second line). Token merging and the negative prompt are ignored where the family has
    none, as the page's defaults ask for them (tomesd "yes", enhance_prompt's negative text)."""
    asked = AskedFields(
        scheduler=request.scheduler,
        algorithm_type=request.algorithm_type,
        clip_skip=request.clip_skip,
        embeddings=request.embeddings,
        width=request.width,
        height=request.height,
    )
    why = refusals(family, asked)
    if why:
        raise ValueError("; ".join(f"{field}: {reason}" for field, reason in why.items()) + ".")


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
