"""Instruction-driven editing with InstructPix2Pix ("make it snow").

The init image is resized to exactly width x height first, the same rule as img2img
(see `worker.pipelines.img2img`); the output has the size of the resized init image.
Model options and prompt encoding are those of img2img (`worker.pipelines.options`,
`worker.pipelines.prompts`).
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from worker.pipelines.img2img import resize_exact, sample_generators, step_callback
from worker.pipelines.options import RequestAssets, request_options
from worker.pipelines.prompts import encode_prompts
from worker.pipelines.request import GenerationRequest


def run(
    pipelines: tuple[Any, ...], request: GenerationRequest, assets: RequestAssets
) -> list[Image.Image]:
    """Run StableDiffusionInstructPix2PixPipeline once for all of the request's samples."""
    (pipe,) = pipelines
    image = resize_exact(request.images[0], request.width, request.height)
    with request_options(pipe, request, assets):
        prompt_embeds, negative_embeds = encode_prompts(
            pipe, request.prompt, request.negative_prompt, request.clip_skip
        )
        output = pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            # One copy per sample: a single image for several samples is a deprecated broadcast.
            image=[image] * len(request.seeds),
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            image_guidance_scale=request.image_guidance_scale,
            num_images_per_prompt=len(request.seeds),
            generator=sample_generators(pipe.device, request.seeds),
            output_type="pil",
            callback_on_step_end=step_callback(request),
        )
    return list(output.images)
