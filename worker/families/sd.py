"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet, the page's 14 img2img schedulers.

Loaded as `StableDiffusionImg2ImgPipeline` from a diffusers folder or a single-file checkpoint;
2.x v-prediction models say so in their scheduler config (`prediction_type`), which every
scheduler a request names is built from (`worker.pipelines.schedulers`). Prompts are encoded
without the 77-token limit, with A1111's clip skip (`worker.pipelines.prompts`).
"""

from __future__ import annotations

from worker.pipelines import img2img
from worker.pipelines.prompts import sd_embeds

encode = sd_embeds
#: SD's img2img is the img2img operation itself, whose prompt encoding is SD's (`sd_embeds`).
run_batch = img2img.run_batch
