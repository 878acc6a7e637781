"""One module per model family: what it loads, how it encodes prompts, how img2img calls it.

`darkroom.families` (free of torch) says what each family is, which request fields it takes and
which family a model's files are; the modules here run it. Adding a family is a module here with
an `encode` (a request's prompts to the pipeline's embedding arguments) and a `run_batch` (the
img2img call), and its entry in `darkroom.families.FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from darkroom.identities import Family
from worker.families import flux, sd, sdxl
from worker.pipelines.options import RequestAssets
from worker.pipelines.request import GenerationRequest, StepHook

#: Runs compatible img2img requests on a family's pipeline; the images of each request, in order.
FamilyRunner = Callable[
    [tuple[Any, ...], Sequence[GenerationRequest], RequestAssets, StepHook | None],
    list[list[Image.Image]],
]

_IMG2IMG: dict[str, FamilyRunner] = {
    Family.SD: sd.run_batch,
    Family.SDXL: sdxl.run_batch,
    Family.FLUX: flux.run_batch,
}


def img2img_runner(family: str) -> FamilyRunner:
    """The img2img runner of `family`."""
    try:
        return _IMG2IMG[family]
    except KeyError:
        raise ValueError(f"No worker module for the model family {family!r}.") from None
