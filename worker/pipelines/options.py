"""A request's model options, applied to a resident Stable Diffusion pipeline and then undone.

The cache keeps one pipeline per model, shared by every request, so whatever a request changes
is restored before the next one runs, also when the request fails (each change is its own
context manager on an `ExitStack`, undone in reverse order):

- scheduler: a new object built from the model's config; the original is put back. A batch that
  makes several pipeline calls starts each on a fresh copy (`fresh_scheduler`), so no step state
  crosses calls.
- VAE: the request's AutoencoderKL (a cache entry of its own) replaces the model's; put back.
- LoRAs: loaded through diffusers' PEFT integration as adapters `request-0`, `request-1`, ...
  with `set_adapters(names, strengths)`, never fused; `unload_lora_weights` removes the adapter
  layers again, leaving the original modules and their untouched weights. A UNet on the fast
  path's fused QKV projections goes back to its separate ones while LoRAs are loaded (the
  adapters attach there) and is fused again afterwards (`worker.fastpath.unfused_qkv`).
- embeddings: `load_textual_inversion(weights, token=id)`; every token that the loading added
  (several for a multi-vector embedding) is unloaded again, which restores tokenizer and
  embedding matrix.
- tomesd: `tomesd.apply_patch` / `remove_patch`, merging half of the tokens (`TOME_RATIO`) in the
  highest-resolution attention layers (ToMe's `max_downsample=1` on SD 1.5, computed from the
  UNet so that models whose first attention is lower down are merged too), without ToMe's random
  destination choice, which forks the global RNG and would make outputs irreproducible.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomesd  # type: ignore[import-untyped]
import torch
from safetensors.torch import load_file

from worker.fastpath import unfused_qkv
from worker.models.checkpoints import lora_in_convertible_layout
from worker.models.lora_cache import shared_cache
from worker.pipelines.request import GenerationRequest
from worker.pipelines.schedulers import build_scheduler

TOME_RATIO = 0.5


@dataclass(frozen=True)
class RequestAssets:
    """What the worker located or loaded for one request's options."""

    vae: Any | None = None  # a loaded AutoencoderKL
    loras: tuple[tuple[str, float], ...] = ()  # (file or repo id, strength)
    embeddings: tuple[tuple[str, str], ...] = ()  # (token, file or repo id)


@contextmanager
def request_options(pipe: Any, request: GenerationRequest, assets: RequestAssets) -> Iterator[None]:
    """Apply the request's options to `pipe` for the duration of the block."""
    scheduler = build_scheduler(
        request.scheduler, pipe.scheduler.config, request.use_karras_sigmas, request.algorithm_type
    )
    with ExitStack() as stack:
        stack.enter_context(_swapped(pipe, "scheduler", scheduler))
        if assets.vae is not None:
            stack.enter_context(_swapped(pipe, "vae", assets.vae))
        if assets.loras:
            stack.enter_context(_loras(pipe, assets.loras))
        if assets.embeddings:
            stack.enter_context(_embeddings(pipe, assets.embeddings))
        if request.tomesd and getattr(pipe, "unet", None) is not None:
            # A transformer backbone (Flux) has nothing to merge; the API refuses an explicit
            # "tomesd": "yes" for it, and the page's default "yes" is ignored.
            stack.enter_context(_token_merging(pipe))
        yield


def fresh_scheduler(pipe: Any) -> None:
    """Give `pipe` a new scheduler of the same class and config, free of any step state.

    Inside `request_options`, whose swap puts the model's own scheduler back at the end.
    """
    scheduler = pipe.scheduler
    pipe.scheduler = type(scheduler).from_config(scheduler.config)


@contextmanager
def _swapped(pipe: Any, name: str, value: Any) -> Iterator[None]:
    """Replace the pipeline component `name` by `value`, then put the original back."""
    original = getattr(pipe, name)
    setattr(pipe, name, value)
    try:
        yield
    finally:
        setattr(pipe, name, original)


@contextmanager
def _loras(pipe: Any, loras: tuple[tuple[str, float], ...]) -> Iterator[None]:
    """Load each LoRA as its own adapter at its strength; unload them all afterwards."""
    with unfused_qkv(pipe):
        try:
            names = []
            for index, (location, _strength) in enumerate(loras):
                names.append(f"request-{index}")
                pipe.load_lora_weights(_lora_weights(location), adapter_name=names[-1])
                _check_loaded(pipe, names[-1], location)
            pipe.set_adapters(names, adapter_weights=[strength for _location, strength in loras])
            yield
        finally:
            pipe.unload_lora_weights()


def _lora_weights(location: str) -> dict[str, torch.Tensor] | str:
    """A local LoRA file's state dict (in a layout diffusers converts), or the Hub repo id for
    diffusers to fetch."""
    if not Path(location).is_file():
        return location
    # A warm LoRA is not read again: the converted state dict is kept (worker.models.lora_cache).
    return shared_cache().get(location, lambda path: lora_in_convertible_layout(load_file(path)))


def _check_loaded(pipe: Any, adapter: str, location: str) -> None:
    """Refuse a LoRA that adapted no layer of `pipe` (diffusers only warns): a LoRA of another
    family, or of a layout it does not convert, would otherwise change nothing, silently."""
    if not any(adapter in names for names in pipe.get_list_adapters().values()):
        raise ValueError(
            f"The LoRA {Path(location).stem!r} has no layers of this model: is it a LoRA of "
            "another model family, or in a layout other than diffusers/PEFT, kohya, ComfyUI "
            "or Black Forest Labs'?"
        )


@contextmanager
def _embeddings(pipe: Any, embeddings: tuple[tuple[str, str], ...]) -> Iterator[None]:
    """Add each embedding's token(s) to the tokenizers and text encoders; remove them afterwards.

    SDXL files hold one vector set per encoder (`clip_l` for `text_encoder`, `clip_g` for
    `text_encoder_2`), each loaded into its own tokenizer and encoder under the same token."""
    pairs = _embedding_targets(pipe)
    before = [set(tokenizer.get_added_vocab()) for tokenizer, _encoder, _key in pairs]
    try:
        for token, location in embeddings:
            vectors = _embedding_vectors(location, pairs)
            for (tokenizer, encoder, _key), vector in zip(pairs, vectors, strict=True):
                pipe.load_textual_inversion(
                    vector, token=token, tokenizer=tokenizer, text_encoder=encoder
                )
        yield
    finally:
        for (tokenizer, encoder, _key), seen in zip(pairs, before, strict=True):
            added = sorted(set(tokenizer.get_added_vocab()) - seen)
            if added:
                pipe.unload_textual_inversion(
                    tokens=added, tokenizer=tokenizer, text_encoder=encoder
                )


def _embedding_targets(pipe: Any) -> list[tuple[Any, Any, str]]:
    """(tokenizer, text encoder, SDXL file key) of each CLIP encoder embeddings go into."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return [(pipe.tokenizer, pipe.text_encoder, "")]
    pairs = [
        (pipe.tokenizer, pipe.text_encoder, "clip_l"),
        (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g"),
    ]
    return [(tok, enc, key) for tok, enc, key in pairs if tok is not None and enc is not None]


def _embedding_vectors(location: str, pairs: list[tuple[Any, Any, str]]) -> list[Any]:
    """What `load_textual_inversion` takes for each target: the file's tensors for one encoder,
    its `clip_l` / `clip_g` tensors for SDXL's two. A warm `.safetensors` embedding is not read
    again (the LoRA cache holds it too); a `.pt` file or a Hub id goes to diffusers as it is."""
    local = location.endswith(".safetensors") and Path(location).is_file()
    tensors = shared_cache().get(location, load_file) if local else {}
    if len(pairs) == 1 and not pairs[0][2]:
        return [tensors if tensors else location]
    missing = [key for _tok, _enc, key in pairs if key not in tensors]
    if missing:
        raise ValueError(
            f"This SDXL embedding has no {' or '.join(missing)} vectors: SDXL embeddings hold "
            "one set per text encoder (clip_l and clip_g) in a .safetensors file."
        )
    return [tensors[key] for _tok, _enc, key in pairs]


@contextmanager
def _token_merging(pipe: Any) -> Iterator[None]:
    """Patch the UNet's transformer blocks with token merging; restore the classes afterwards."""
    downsample = first_attention_downsample(pipe.unet.config.down_block_types)
    tomesd.apply_patch(pipe, ratio=TOME_RATIO, max_downsample=downsample, use_rand=False)
    try:
        yield
    finally:
        tomesd.remove_patch(pipe)


def first_attention_downsample(down_block_types: list[str]) -> int:
    """The downsampling factor of the UNet's highest-resolution attention layers."""
    for level, block_type in enumerate(down_block_types):
        if "Attn" in block_type:
            return int(2**level)
    return 1
