"""Image to image with Stable Diffusion, and the helpers every operation shares.

Resizing rule: the init image is resized (Lanczos) to exactly width x height before diffusion,
without cropping, so all of its content is kept; the API derives width and height from the image
when the client gives none, so the aspect ratio is normally preserved.

Seeds: one `torch.Generator` per sample, each seeded with that sample's seed, so that sample i
depends only on seeds[i] and the same request and seeds give the same bytes on the same machine.

The request's model options (scheduler, VAE, LoRAs, embeddings, tomesd) are applied for the call
and undone afterwards (`worker.pipelines.options`); prompts are encoded by the worker, without the
77-token limit and with clip skip (`worker.pipelines.prompts`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from worker.pipelines.options import RequestAssets, request_options
from worker.pipelines.prompts import encode_prompts
from worker.pipelines.request import GenerationRequest


def sample_generators(device: Any, seeds: tuple[int, ...]) -> list[torch.Generator]:
    """One freshly seeded generator per sample: a shared one would couple the samples."""
    return [torch.Generator(device).manual_seed(seed) for seed in seeds]


def step_callback(request: GenerationRequest) -> Callable[..., dict[str, Any]] | None:
    """A diffusers `callback_on_step_end` that calls the request's `on_step` hook, if any."""
    on_step = request.on_step
    if on_step is None:
        return None

    def callback(pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        on_step(step + 1, int(getattr(pipe, "num_timesteps", 0) or request.steps))
        return tensors

    return callback


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
    (pipe,) = pipelines
    with request_options(pipe, request, assets):
        prompt_embeds, negative_embeds = encode_prompts(
            pipe, request.prompt, request.negative_prompt, request.clip_skip
        )
        output = pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            image=resize_exact(request.images[0], request.width, request.height),
            strength=request.strength,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            num_images_per_prompt=len(request.seeds),
            generator=sample_generators(pipe.device, request.seeds),
            output_type="pil",
            callback_on_step_end=step_callback(request),
        )
    return list(output.images)
