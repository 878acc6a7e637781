"""Image to image with Stable Diffusion, and the helpers every operation shares.

Resizing rule: the init image is resized (Lanczos) to exactly width x height before diffusion,
without cropping, so all of its content is kept; the API derives width and height from the image
when the client gives none, so the aspect ratio is normally preserved.

Seeds: one `torch.Generator` per sample, each seeded with that sample's seed, so that sample i
depends only on seeds[i] and the same request and seeds give the same bytes on the same machine.

Several compatible requests (same model, size, steps, strength, guidance, scheduler and adapters:
`darkroom.jobspec.batch_key`) run in one pipeline call, sample by sample in request order
(`worker.pipelines.batch`); a request alone is the batch of one, so both take the same path.

The request's model options (scheduler, VAE, LoRAs, embeddings, tomesd) are applied for the call
and undone afterwards (`worker.pipelines.options`); prompts are encoded by the worker, without the
77-token limit and with clip skip (`worker.pipelines.prompts`), each with its own clip skip.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from worker.pipelines.batch import (
    PromptEmbeds,
    batch_seeds,
    per_sample,
    run_by_prompt_length,
    sample_generators,
    stack_prompts,
    step_callback,
)
from worker.pipelines.options import RequestAssets, fresh_scheduler, request_options
from worker.pipelines.prompts import sd_embeds
from worker.pipelines.request import GenerationRequest, StepHook

#: A family's prompt encoding: the pipeline's embedding arguments for one request.
Encoder = Callable[[Any, GenerationRequest], PromptEmbeds]

__all__ = [
    "Encoder",
    "resize_exact",
    "run",
    "run_batch",
    "run_init_image_batch",
    "sample_generators",
    "step_callback",
]


def resize_exact(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` as RGB at exactly width x height (Lanczos), untouched when it already is."""
    image = image.convert("RGB")
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


def run(
    pipelines: tuple[Any, ...], request: GenerationRequest, assets: RequestAssets
) -> list[Image.Image]:
    """Run StableDiffusionImg2ImgPipeline once for all of the request's samples."""
    return run_batch(pipelines, [request], assets, request.on_step)[0]


def run_batch(
    pipelines: tuple[Any, ...],
    requests: Sequence[GenerationRequest],
    assets: RequestAssets,
    on_step: StepHook | None = None,
) -> list[list[Image.Image]]:
    """Run StableDiffusionImg2ImgPipeline for compatible requests; each request's images."""
    (pipe,) = pipelines
    return run_init_image_batch(pipe, requests, assets, on_step, strength=requests[0].strength)


def run_init_image_batch(
    pipe: Any,
    requests: Sequence[GenerationRequest],
    assets: RequestAssets,
    on_step: StepHook | None,
    encode: Encoder = sd_embeds,
    **call_options: Any,
) -> list[list[Image.Image]]:
    """One batched run of a diffusion pipeline that starts from an init image (img2img,
    pix2pix): the first request's model options applied, each request's prompts encoded on
    their own by the family's `encode`, one init image and one generator per sample;
    `call_options` are the operation's own pipeline arguments, shared by the batch."""
    first = requests[0]
    inits = [resize_exact(r.images[0], r.width, r.height) for r in requests]
    with request_options(pipe, first, assets):
        embeds = [encode(pipe, r) for r in requests]

        def call(indices: list[int], callback: Callable[..., Any] | None) -> list[Image.Image]:
            fresh_scheduler(pipe)
            output = pipe(
                **stack_prompts(embeds, requests, indices),
                # One image per sample: a single image for several samples is a deprecated
                # broadcast.
                image=per_sample(inits, requests, indices),
                num_inference_steps=first.steps,
                guidance_scale=first.guidance_scale,
                generator=sample_generators(pipe.device, batch_seeds(requests, indices)),
                output_type="pil",
                callback_on_step_end=callback,
                **call_options,
            )
            return list(output.images)

        return run_by_prompt_length(requests, embeds, on_step, call)
