"""Mixing up to four images (and a prompt) into new images with Kandinsky 2.2.

Kandinsky 2.2 generates from a CLIP image embedding: its prior turns text into such an
embedding, its image encoder turns a picture into one, and its decoder turns one into pixels.
Mixing is therefore a weighted average of embeddings, as in `KandinskyV22PriorPipeline.interpolate`,
computed here so that the rules below hold exactly.

Weighting rule:
- Each image is one condition with its weight; the prompt, when non-empty, is one more condition
  with weight `PROMPT_WEIGHT` (1.0), so image weights read as relative to the prompt.
- Conditions of weight 0 are dropped before anything is computed, and the remaining weights are
  divided by their sum. An image of weight 0 therefore has no influence at all: the output is
  byte-identical to the same request without that image. At least one condition must remain.
- Each image is encoded on its own (never batched), so an embedding never depends on the others.
- Randomness: sample i's prior run and decoder run each get a generator seeded with seeds[i];
  neither depends on the number of images, since encoding an image draws no random numbers.

The negative prompt, when non-empty, is the prior's unconditional text and its embedding is the
decoder's negative condition; without one the decoder's negative condition is the embedding of
a black image, as in diffusers. The prior runs with its default guidance scale (4.0) and the
request's step count; the decoder with the request's guidance scale and steps.

Size rule: the decoder renders at width and height rounded up to multiples of 64 (its native
grid); the result is resized (Lanczos) to exactly width x height.

Batching: the mixer is never batched with other jobs (`darkroom.jobspec.batch_key` is None): its
prior runs once per seed and its image embeddings per job, so a batch would save little but
the decoder's calls. `run_batch` exists so that every operation has the same runner signature.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from worker.pipelines.batch import sample_generators, step_callback
from worker.pipelines.img2img import resize_exact
from worker.pipelines.options import RequestAssets
from worker.pipelines.request import GenerationRequest, StepHook

PROMPT_WEIGHT = 1.0
PRIOR_GUIDANCE_SCALE = 4.0
#: The prior's scheduler (UnCLIP) spaces its steps over (steps - 1) and divides by zero at one:
#: a request for one step runs two prior steps (and the one decoder step it asked for).
PRIOR_MIN_STEPS = 2


def run_batch(
    pipelines: tuple[Any, ...],
    requests: Sequence[GenerationRequest],
    assets: RequestAssets,
    on_step: StepHook | None = None,
) -> list[list[Image.Image]]:
    """Run each request on its own (the mixer does not batch), in order."""
    return [run(pipelines, request, assets, on_step) for request in requests]


@torch.no_grad()
def run(
    pipelines: tuple[Any, ...],
    request: GenerationRequest,
    _assets: RequestAssets,
    on_step: StepHook | None = None,
) -> list[Image.Image]:
    """Mix the request's images and prompt once per seed, then decode all samples together.

    Stable Diffusion's model options do not apply here; `generate` refuses them beforehand.
    """
    prior, decoder = pipelines
    image_embeds, weights = _image_conditions(prior, request)
    mixed, negatives = [], []
    for seed in request.seeds:
        prompt_embed, negative = _text_conditions(prior, request, seed)
        terms = image_embeds + ([prompt_embed] if prompt_embed is not None else [])
        mixed.append(_weighted_sum(terms, weights))
        negatives.append(negative)
    output = decoder(
        image_embeds=torch.cat(mixed),
        negative_image_embeds=torch.cat(negatives),
        width=request.width,
        height=request.height,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        generator=sample_generators(decoder.device, request.seeds),
        output_type="pil",
        callback_on_step_end=step_callback(on_step or request.on_step),
    )
    return [resize_exact(image, request.width, request.height) for image in output.images]


def mixing_weights(image_weights: tuple[float, ...], has_prompt: bool) -> list[float]:
    """The normalised weights of the conditions that count: positive image weights, then prompt.

    Each is divided by the largest first, so that the sum is at most five: the API accepts any
    finite weight, and the sum of two near 1.8e308 is inf, which made every weight 0 (a mix of
    nothing). A weight below 1e-308 of the largest becomes 0: it could not have counted.
    """
    raw = [weight for weight in image_weights if weight > 0]
    if has_prompt:
        raw.append(PROMPT_WEIGHT)
    largest = max(raw, default=1.0)
    scaled = [weight / largest for weight in raw]
    total = math.fsum(scaled)
    return [weight / total for weight in scaled]


def _image_conditions(
    prior: Any, request: GenerationRequest
) -> tuple[list[torch.Tensor], list[float]]:
    """The embeddings of the images that count, and the weights of all conditions that count."""
    kept = [img for img, w in zip(request.images, request.image_weights, strict=True) if w > 0]
    weights = mixing_weights(request.image_weights, has_prompt=bool(request.prompt))
    return [_image_embedding(prior, image) for image in kept], weights


def _image_embedding(prior: Any, image: Image.Image) -> torch.Tensor:
    """The CLIP image embedding of one image, shape (1, dim)."""
    pixels = prior.image_processor(image.convert("RGB"), return_tensors="pt").pixel_values
    pixels = pixels.to(device=prior.device, dtype=prior.image_encoder.dtype)
    embedding: torch.Tensor = prior.image_encoder(pixels).image_embeds
    return embedding


def _text_conditions(
    prior: Any, request: GenerationRequest, seed: int
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The prompt's embedding (None without a prompt) and the negative embedding, for one seed."""
    if not request.prompt and not request.negative_prompt:
        return None, prior.get_zero_embed()
    output = prior(
        prompt=request.prompt,
        # Without a negative prompt the prior itself falls back to the black-image embedding.
        negative_prompt=request.negative_prompt or None,
        num_inference_steps=max(request.steps, PRIOR_MIN_STEPS),
        guidance_scale=PRIOR_GUIDANCE_SCALE,
        generator=torch.Generator(prior.device).manual_seed(seed),
    )
    return (output.image_embeds if request.prompt else None), output.negative_image_embeds


def _weighted_sum(terms: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum(w * t) in a fixed order, so equal inputs always give equal floats."""
    total = weights[0] * terms[0]
    for weight, term in zip(weights[1:], terms[1:], strict=True):
        total = total + weight * term
    return total
