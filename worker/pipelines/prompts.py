"""Prompt embeddings for Stable Diffusion without the 77-token limit, with clip skip.

The pipelines' own `encode_prompt` truncates at the text encoder's 77 positions, and its
`clip_skip` path reads `text_encoder.text_model.final_layer_norm`, an attribute that transformers
5.6 removed (`CLIPTextModel` now holds its layers directly): with transformers 5.23 any clip_skip
raises AttributeError. So the worker encodes prompts itself and passes `prompt_embeds` and
`negative_prompt_embeds`:

- Long prompts: the token ids (without BOS/EOS) are cut into windows of `CHUNK_TOKENS` (75); each
  window is framed as BOS + window + EOS + padding to 77 and encoded on its own, and the results
  are concatenated along the sequence axis. The shorter of prompt and negative prompt is padded
  with encodings of the empty window, so both have the same length, as classifier-free guidance
  needs. A prompt of at most 75 tokens gives exactly the ids, and so the embedding, of diffusers'.
- Clip skip follows the convention of the page's range (1..8, as in A1111's "CLIP skip"): N uses
  the output of the N-th layer from the end, through the final layer norm, so 1 (like None) is
  the normal embedding and 2 the penultimate layer; diffusers' own `clip_skip=N-1` is the same.
- Textual-inversion tokens with several vectors are expanded first (`maybe_convert_prompt`).
- A prompt (or negative prompt) of more than `MAX_PROMPT_WINDOWS` windows fails its job with a
  ValueError that says so: each window costs a text-encoder pass and longer embeddings cost
  every denoising step, and no real prompt needs more (the API caps characters, this tokens).
"""

from __future__ import annotations

from typing import Any

import torch

from darkroom.limits import CHUNK_TOKENS, MAX_PROMPT_WINDOWS
from worker.pipelines.request import GenerationRequest


def sd_embeds(pipe: Any, request: GenerationRequest) -> dict[str, torch.Tensor]:
    """A Stable Diffusion 1.x/2.x pipeline's embedding arguments for `request`."""
    positive, negative = encode_prompts(
        pipe, request.prompt, request.negative_prompt, request.clip_skip
    )
    return {"prompt_embeds": positive, "negative_prompt_embeds": negative}


@torch.no_grad()
def encode_prompts(
    pipe: Any, prompt: str, negative_prompt: str, clip_skip: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of shape (1, 77 * chunks, dim) for the prompt and the negative prompt."""
    positive, negative = same_length(
        windows(pipe, pipe.tokenizer, prompt, "prompt"),
        windows(pipe, pipe.tokenizer, negative_prompt, "negative prompt"),
    )
    return _encode(pipe, positive, clip_skip), _encode(pipe, negative, clip_skip)


def same_length(*window_lists: list[list[int]]) -> list[list[list[int]]]:
    """The window lists padded with empty windows to the longest one's count, as classifier-free
    guidance (and SDXL's two encoders, whose outputs are joined) need."""
    chunks = max(len(items) for items in window_lists)
    return [items + [[]] * (chunks - len(items)) for items in window_lists]


def check_clip_skip(text_encoder: Any, clip_skip: int | None) -> None:
    """Refuse a clip skip that names no layer of this text encoder."""
    layers = int(text_encoder.config.num_hidden_layers)
    if clip_skip is not None and not 1 <= clip_skip <= layers:
        raise ValueError(f"clip_skip must be between 1 and {layers} for this model.")


def windows(pipe: Any, tokenizer: Any, text: str, name: str) -> list[list[int]]:
    """The token ids of `text`, without BOS/EOS, in windows of CHUNK_TOKENS (at least one);
    a ValueError naming the `name` field when there would be more than MAX_PROMPT_WINDOWS."""
    text = pipe.maybe_convert_prompt(text, tokenizer)
    ids: list[int] = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    if len(ids) > MAX_PROMPT_WINDOWS * CHUNK_TOKENS:
        raise ValueError(
            f"The {name} is too long: {len(ids)} tokens, at most"
            f" {MAX_PROMPT_WINDOWS * CHUNK_TOKENS} ({MAX_PROMPT_WINDOWS} windows of 77 tokens,"
            f" {CHUNK_TOKENS} of them text) are accepted."
        )
    return [ids[start : start + CHUNK_TOKENS] for start in range(0, len(ids), CHUNK_TOKENS)] or [[]]


def _encode(pipe: Any, token_windows: list[list[int]], clip_skip: int | None) -> torch.Tensor:
    """Encode each framed window and join them along the sequence axis."""
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    check_clip_skip(text_encoder, clip_skip)
    rows = [framed(window, tokenizer) for window in token_windows]
    input_ids = torch.tensor(rows, device=text_encoder.device)
    if clip_skip is None or clip_skip == 1:
        hidden: torch.Tensor = text_encoder(input_ids)[0]
    else:
        states = text_encoder(input_ids, output_hidden_states=True).hidden_states
        hidden = _final_layer_norm(text_encoder)(states[-clip_skip])
    return hidden.reshape(1, -1, hidden.shape[-1])


def framed(window: list[int], tokenizer: Any) -> list[int]:
    """BOS + window + EOS, padded to the encoder's 77 positions as diffusers pads."""
    padding = [tokenizer.pad_token_id] * (CHUNK_TOKENS - len(window))
    return [tokenizer.bos_token_id, *window, tokenizer.eos_token_id, *padding]


def _final_layer_norm(text_encoder: Any) -> Any:
    """The encoder's final layer norm, where transformers < 5.6 and >= 5.6 keep it."""
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm
