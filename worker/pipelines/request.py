"""The typed input and output of one generation, free of torch and diffusers imports.

The worker decodes a job row into a `GenerationRequest`, hands it to `generate`, and stores the
images of the `GenerationResult`. The API tier has already validated ranges; `generate` still
refuses combinations that no pipeline can run.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

IMG2IMG = "img2img"
PIX2PIX = "pix2pix"
IMG_MIXER = "img_mixer"
OPERATIONS = (IMG2IMG, PIX2PIX, IMG_MIXER)


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: what to run, on which images, with which settings and seeds."""

    operation: str  # one of OPERATIONS
    model_id: str | None  # None: the operation's default model
    prompt: str
    negative_prompt: str  # "" when none
    images: tuple[Image.Image, ...]  # decoded RGB init images
    image_weights: tuple[float, ...]  # img_mixer only: one per image, each >= 0
    width: int  # output size, a multiple of 8, at most 1024
    height: int
    steps: int  # denoising steps, 1..50
    guidance_scale: float  # 1..20
    strength: float = 0.7  # img2img: how far from the init image to go
    image_guidance_scale: float = 1.5  # pix2pix: how closely to follow the init image
    seeds: tuple[int, ...] = (0,)  # one per sample


@dataclass(frozen=True)
class GenerationResult:
    """The images of one generation and where its time went."""

    images: list[Image.Image]  # one per seed, each exactly width x height, RGB
    pipeline_seconds: float  # the diffusion calls only
    model_load_seconds: float  # 0.0 when the model was already resident
