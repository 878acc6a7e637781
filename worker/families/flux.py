"""Flux.1 (dev and schnell shapes): CLIP-L for the pooled embedding, T5 for the sequence, a
`FluxTransformer2DModel` on packed 2x2 latent patches, a flow-matching schedule.

- Prompts go through the pipeline's own `encode_prompt`: T5 reads at most `T5_TOKENS` (512, the
  dev models' limit; longer prompts are cut there, as in every Flux tool) and CLIP-L its 77.
  Flux has no negative prompt and no classifier-free guidance: the API refuses a negative prompt
  the client wrote, and the worker ignores the one `enhance_prompt` adds.
- `guidance_scale` is a model input (embedded guidance) on dev-shaped models, whose transformer
  has `guidance_embeds`; schnell-shaped models ignore it.
- The scheduler is always the model's own (`FlowMatchEulerDiscreteScheduler`); the API refuses
  the page's other names, CLIP skip, token merging and embeddings for Flux.
- Width and height must be multiples of 16 (8x VAE, then 2x2 patches).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from darkroom import families
from darkroom.identities import Family
from darkroom.limits import T5_TOKENS
from worker.pipelines.img2img import run_init_image_batch
from worker.pipelines.options import RequestAssets
from worker.pipelines.request import GenerationRequest, StepHook

SIZE_MULTIPLE = families.family(Family.FLUX).size_multiple


def run_batch(
    pipelines: tuple[Any, ...],
    requests: Sequence[GenerationRequest],
    assets: RequestAssets,
    on_step: StepHook | None = None,
) -> list[list[Image.Image]]:
    """Run FluxImg2ImgPipeline for compatible requests; each request's images."""
    (pipe,) = pipelines
    first = requests[0]
    if first.width % SIZE_MULTIPLE or first.height % SIZE_MULTIPLE:
        raise ValueError(f"Width and height must be multiples of {SIZE_MULTIPLE} for Flux models.")
    return run_init_image_batch(
        pipe,
        requests,
        assets,
        on_step,
        encode=encode,
        strength=first.strength,
        # Unlike SD's, Flux's pipeline does not take its size from the init image.
        width=first.width,
        height=first.height,
        max_sequence_length=T5_TOKENS,
    )


@torch.no_grad()
def encode(pipe: Any, request: GenerationRequest) -> dict[str, torch.Tensor]:
    """The T5 sequence and the pooled CLIP embedding of `request`'s prompt."""
    prompt_embeds, pooled, _text_ids = pipe.encode_prompt(
        request.prompt, prompt_2=None, device=pipe.device, max_sequence_length=T5_TOKENS
    )
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
