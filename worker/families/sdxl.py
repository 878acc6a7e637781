"""Stable Diffusion XL: two CLIP text encoders (CLIP-L and OpenCLIP bigG), a UNet conditioned on
the pooled text embedding and the image size ("text_time"), the page's img2img schedulers.

Prompt encoding, as diffusers' `StableDiffusionXLPipeline.encode_prompt` does for one window and
A1111 for many: the prompt is cut into the same 75-token windows as SD 1.x
(`worker.pipelines.prompts`), each window framed and encoded by both encoders, whose hidden
states (the penultimate layer by default; clip skip N takes the (N+1)-th from the end, so that
1 is SDXL's normal embedding) are joined along the feature axis. The pooled embedding is
`text_encoder_2`'s projected output for the first window. An empty negative prompt is all zeros
when the model's config asks for it (`force_zeros_for_empty_prompt`, true for SDXL base).
Embeddings files hold one vector set per encoder (`clip_l`, `clip_g`: `worker.pipelines.options`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from worker.pipelines.img2img import run_init_image_batch
from worker.pipelines.options import RequestAssets
from worker.pipelines.prompts import check_clip_skip, framed, same_length, windows
from worker.pipelines.request import GenerationRequest, StepHook


def run_batch(
    pipelines: tuple[Any, ...],
    requests: Sequence[GenerationRequest],
    assets: RequestAssets,
    on_step: StepHook | None = None,
) -> list[list[Image.Image]]:
    """Run StableDiffusionXLImg2ImgPipeline for compatible requests; each request's images."""
    (pipe,) = pipelines
    return run_init_image_batch(
        pipe, requests, assets, on_step, encode=encode, strength=requests[0].strength
    )


@torch.no_grad()
def encode(pipe: Any, request: GenerationRequest) -> dict[str, torch.Tensor]:
    """SDXL's four embedding arguments for `request`'s prompt and negative prompt."""
    positive, pooled = _encode_text(pipe, request.prompt, "prompt", request.clip_skip)
    negative, negative_pooled = _encode_text(
        pipe, request.negative_prompt, "negative prompt", request.clip_skip
    )
    if not request.negative_prompt and pipe.config.get("force_zeros_for_empty_prompt", False):
        negative, negative_pooled = torch.zeros_like(negative), torch.zeros_like(negative_pooled)
    # Classifier-free guidance needs both at the same length: pad the shorter with empty windows.
    positive, negative = _padded(pipe, positive, negative, request.clip_skip)
    return {
        "prompt_embeds": positive,
        "negative_prompt_embeds": negative,
        "pooled_prompt_embeds": pooled,
        "negative_pooled_prompt_embeds": negative_pooled,
    }


def _encode_text(
    pipe: Any, text: str, name: str, clip_skip: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 77 * windows, dim_l + dim_g) hidden states and the (1, dim_g) pooled embedding."""
    encoders = _encoders(pipe)
    token_windows = same_length(*(windows(pipe, tok, text, name) for tok, _enc in encoders))
    hidden, pooled = [], None
    for (tokenizer, encoder), items in zip(encoders, token_windows, strict=True):
        check_clip_skip(encoder, clip_skip)
        rows = torch.tensor([framed(w, tokenizer) for w in items], device=encoder.device)
        output = encoder(rows, output_hidden_states=True)
        states = output.hidden_states[-((clip_skip or 1) + 1)]
        hidden.append(states.reshape(1, -1, states.shape[-1]))
        pooled = output[0][:1]  # the last encoder's (text_encoder_2) projection, first window
    assert pooled is not None
    return torch.cat(hidden, dim=-1), pooled


def _encoders(pipe: Any) -> list[tuple[Any, Any]]:
    """(tokenizer, text encoder) pairs, `text_encoder_2` last (the refiner has only that one)."""
    pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
    return [(tok, enc) for tok, enc in pairs if tok is not None and enc is not None]


def _padded(
    pipe: Any, positive: torch.Tensor, negative: torch.Tensor, clip_skip: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both embeddings at the same sequence length: the shorter gains encoded empty windows
    (zeros where the negative was zeroed)."""
    missing = positive.shape[1] - negative.shape[1]
    if missing == 0:
        return positive, negative
    shorter = negative if missing > 0 else positive
    empty, _pooled = _encode_text(pipe, "", "prompt", clip_skip)
    if not shorter.any():
        empty = torch.zeros_like(empty)
    filler = empty.repeat(1, abs(missing) // empty.shape[1], 1)
    if missing > 0:
        return positive, torch.cat([negative, filler], dim=1)
    return torch.cat([positive, filler], dim=1), negative
