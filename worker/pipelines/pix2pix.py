"""Instruction-driven editing with InstructPix2Pix ("make it snow").

The init image is resized to exactly width x height first, the same rule as img2img
(see `worker.pipelines.img2img`); the output has the size of the resized init image.
Model options, prompt encoding and batching are those of img2img (`worker.pipelines.options`,
`worker.pipelines.prompts`, `worker.pipelines.batch`). One difference: InstructPix2Pix encodes
all init images of a call in one VAE pass (the mode of the latent distribution, no randomness),
so there a batch mate changes a sample only through summation order too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from worker.pipelines.img2img import run_init_image_batch
from worker.pipelines.options import RequestAssets
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
    guidance = requests[0].image_guidance_scale
    return run_init_image_batch(pipe, requests, assets, on_step, image_guidance_scale=guidance)
