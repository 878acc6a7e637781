"""Instruction-driven editing with InstructPix2Pix ("make it snow").

The init image is resized to exactly width x height first, the same rule as img2img
(see `worker.pipelines.img2img`); the output has the size of the resized init image.
Model options, prompt encoding and batching are those of img2img (`worker.pipelines.options`,
`worker.pipelines.prompts`, `worker.pipelines.batch`). One difference: InstructPix2Pix encodes
all init images of a call in one VAE pass (the mode of the latent distribution, no randomness),
so there a batch mate changes a sample only through summation order too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from worker.pipelines.batch import (
    batch_seeds,
    per_sample,
    run_by_prompt_length,
    sample_generators,
    stack_prompts,
)
from worker.pipelines.img2img import resize_exact
from worker.pipelines.options import RequestAssets, fresh_scheduler, request_options
from worker.pipelines.prompts import encode_prompts
from worker.pipelines.request import GenerationRequest, StepHook


def run(
    pipelines: tuple[Any, ...], request: GenerationRequest, assets: RequestAssets
) -> list[Image.Image]:
    """Run StableDiffusionInstructPix2PixPipeline once for all of the request's samples."""
    return run_batch(pipelines, [request], assets, request.on_step)[0]


def run_batch(
    pipelines: tuple[Any, ...],
    requests: Sequence[GenerationRequest],
    assets: RequestAssets,
    on_step: StepHook | None = None,
) -> list[list[Image.Image]]:
    """Run StableDiffusionInstructPix2PixPipeline for compatible requests; each one's images."""
    (pipe,) = pipelines
    first = requests[0]
    inits = [resize_exact(r.images[0], r.width, r.height) for r in requests]
    with request_options(pipe, first, assets):
        embeds = [encode_prompts(pipe, r.prompt, r.negative_prompt, r.clip_skip) for r in requests]

        def call(indices: list[int], callback: Callable[..., Any] | None) -> list[Image.Image]:
            prompt_embeds, negative_embeds = stack_prompts(embeds, requests, indices)
            fresh_scheduler(pipe)
            output = pipe(
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_embeds,
                # One image per sample: a single image for several samples is a deprecated
                # broadcast.
                image=per_sample(inits, requests, indices),
                num_inference_steps=first.steps,
                guidance_scale=first.guidance_scale,
                image_guidance_scale=first.image_guidance_scale,
                generator=sample_generators(pipe.device, batch_seeds(requests, indices)),
                output_type="pil",
                callback_on_step_end=callback,
            )
            return list(output.images)

        return run_by_prompt_length(requests, embeds, on_step, call)
