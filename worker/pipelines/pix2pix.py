"""Instruction-driven editing with InstructPix2Pix ("make it snow").

The init image is resized to exactly width x height first, the same rule as img2img
(see `worker.pipelines.img2img`); the output has the size of the resized init image.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from worker.pipelines.img2img import resize_exact, sample_generators
from worker.pipelines.request import GenerationRequest


def run(pipelines: tuple[Any, ...], request: GenerationRequest) -> list[Image.Image]:
    """Run StableDiffusionInstructPix2PixPipeline once for all of the request's samples."""
    (pipe,) = pipelines
    output = pipe(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt or None,
        # One copy per sample: a single image for several samples is a deprecated broadcast.
        image=[resize_exact(request.images[0], request.width, request.height)] * len(request.seeds),
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        image_guidance_scale=request.image_guidance_scale,
        num_images_per_prompt=len(request.seeds),
        generator=sample_generators(pipe.device, request.seeds),
        output_type="pil",
    )
    return list(output.images)
