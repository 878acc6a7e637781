"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet, the page's 14 img2img schedulers.

Loaded as `StableDiffusionImg2ImgPipeline` from a diffusers folder or a single-file checkpoint;
2.x v-prediction models say so in their scheduler config (`prediction_type`), which every
scheduler a request names is built from (`worker.pipelines.schedulers`). Prompts are encoded
without the 77-token limit, with A1111's clip skip (`worker.pipelines.prompts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from worker.pipelines.img2img import run_init_image_batch
from worker.pipelines.options import RequestAssets
from worker.pipelines.prompts import sd_embeds
from worker.pipelines.request import GenerationRequest, StepHook

encode = sd_embeds


def run_batch(
    pipelines: tuple[Any, ...],
    requests: Sequence[GenerationRequest],
    assets: RequestAssets,
    on_step: StepHook | None = None,
) -> list[list[Image.Image]]:
    """Run StableDiffusionImg2ImgPipeline for compatible requests; each request's images."""
    (pipe,) = pipelines
    return run_init_image_batch(
        pipe, requests, assets, on_step, encode=encode, strength=requests[0].strength
    )
