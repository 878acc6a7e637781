"""What img2img and pix2pix share to run several requests in one pipeline call.

Samples are laid out request by request: request 0's samples (its seeds in order), then request
1's, and so on. Every per-sample input follows that order: the prompt embeddings (the request's,
repeated per sample), the init image, and a generator seeded with the sample's seed. diffusers
draws each sample's noise from that sample's own generator, and img2img encodes each sample's init
image on its own, so a sample depends on its batch mates only through the summation order of
batched kernels: the same image as alone, up to floating-point rounding.

A family's prompt encoding (`worker.families`) gives each request a `PromptEmbeds`: the pipeline's
embedding arguments (`prompt_embeds`, `negative_prompt_embeds`, and SDXL's pooled ones), each with
a batch dimension of 1, which are stacked sample by sample in batch order.

Prompt embeddings stack only when they have the same length (77 positions per 75-token window,
`worker.pipelines.prompts`). Padding a shorter prompt with empty windows would add keys to every
cross-attention and so change its image; instead requests of different window counts run as
consecutive calls of the same batch (`run_by_prompt_length`), each with a fresh scheduler.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from worker import previews
from worker.pipelines.request import GenerationRequest, StepHook

#: A request's embedding arguments to the pipeline, by name, each of batch size 1.
PromptEmbeds = dict[str, torch.Tensor]
#: One pipeline call on the requests at these indices, with its diffusers step callback.
PipelineCall = Callable[[list[int], Callable[..., dict[str, Any]] | None], list[Image.Image]]


def sample_generators(device: Any, seeds: Sequence[int]) -> list[torch.Generator]:
    """One freshly seeded generator per sample: a shared one would couple the samples."""
    return [torch.Generator(device).manual_seed(seed) for seed in seeds]


def batch_seeds(requests: Sequence[GenerationRequest], indices: Sequence[int]) -> list[int]:
    """The seeds of the requests at `indices`, sample by sample, in batch order."""
    return [seed for index in indices for seed in requests[index].seeds]


def stack_prompts(
    embeds: Sequence[PromptEmbeds], requests: Sequence[GenerationRequest], indices: Sequence[int]
) -> PromptEmbeds:
    """Every embedding argument of every sample, stacked in batch order."""
    return {
        name: torch.cat([_repeated(embeds[i][name], len(requests[i].seeds)) for i in indices])
        for name in embeds[indices[0]]
    }


def _repeated(tensor: torch.Tensor, times: int) -> torch.Tensor:
    """`tensor` (batch size 1) repeated `times` along the batch axis."""
    return tensor.repeat(times, *[1] * (tensor.dim() - 1))


def per_sample(
    items: Sequence[Any], requests: Sequence[GenerationRequest], indices: Sequence[int]
) -> list[Any]:
    """`items[i]` once per sample of request i, for each of `indices`, in batch order."""
    return [items[i] for i in indices for _seed in requests[i].seeds]


def step_callback(
    on_step: StepHook | None, part: int = 0, parts: int = 1
) -> Callable[..., dict[str, Any]] | None:
    """A diffusers `callback_on_step_end` calling `on_step(done, total)`; for call `part` of
    `parts` consecutive calls, counted over all of them so progress never goes back."""
    if on_step is None:
        return None

    def callback(pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        total = int(getattr(pipe, "num_timesteps", 0) or step + 1)
        previews.offer(pipe, tensors)  # before the hook, which may make a preview of them
        on_step(part * total + step + 1, parts * total)
        return tensors

    return callback


def by_prompt_length(embeds: Sequence[PromptEmbeds]) -> list[list[int]]:
    """Request indices grouped by embedding length (which stacks), in order of first sight."""
    groups: dict[int, list[int]] = {}
    for index, embed in enumerate(embeds):
        groups.setdefault(int(embed["prompt_embeds"].shape[1]), []).append(index)
    return list(groups.values())


def run_by_prompt_length(
    requests: Sequence[GenerationRequest],
    embeds: Sequence[PromptEmbeds],
    on_step: StepHook | None,
    call: PipelineCall,
) -> list[list[Image.Image]]:
    """Run `call` once per prompt length; the images of each request, in request order."""
    results: list[list[Image.Image]] = [[] for _ in requests]
    groups = by_prompt_length(embeds)
    for part, indices in enumerate(groups):
        images = call(indices, step_callback(on_step, part, len(groups)))
        start = 0
        for index in indices:
            count = len(requests[index].seeds)
            results[index] = list(images[start : start + count])
            start += count
    return results
