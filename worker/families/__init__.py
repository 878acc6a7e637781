"""One module per model family: what it loads, how it encodes prompts, how img2img calls it.

`darkroom.families` (free of torch) says what each family is, which request fields it takes and
which family a model's files are; the modules here run it. Adding a family is a module here with
an `encode` (a request's prompts to the pipeline's embedding arguments) and a `run_batch` (the
img2img call), and its entry in `darkroom.families.FAMILIES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from darkroom import families
from darkroom.identities import Family
from darkroom.limits import MIN_SIDE
from worker import images
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


def img2img_runner(family: Family) -> FamilyRunner:
    """The img2img runner of `family`."""
    try:
        return _IMG2IMG[family]
    except KeyError:
        raise ValueError(f"No worker module for the model family {family!r}.") from None


def output_size(
    family: Family | None, width: int | None, height: int | None, first: Image.Image
) -> tuple[int, int]:
    """The size to generate on a model of `family`: `worker.images.output_size` (as asked, else
    from the first image, multiples of 8), then, where the family needs a larger multiple (Flux:
    16), each side that came from the image rounded down to it rather than refused, as the
    hosted API does. Of the two multiples below each such side, the pair whose aspect is nearest
    the image's wins (the larger on a tie); a side the client gave is kept (the API has checked
    it). The job's `meta` W and H say the size used."""
    out_width, out_height = images.output_size(width, height, first)
    multiple = families.family(family or Family.SD).size_multiple
    if out_width % multiple == 0 and out_height % multiple == 0:
        return out_width, out_height
    widths = [out_width] if width is not None else _multiples_below(out_width, multiple)
    heights = [out_height] if height is not None else _multiples_below(out_height, multiple)
    aspect = first.width / first.height

    def distance(size: tuple[int, int]) -> tuple[float, int]:
        return abs(math.log(size[0] / size[1] / aspect)), -size[0] * size[1]

    return min(((w, h) for w in widths for h in heights), key=distance)


def _multiples_below(side: int, multiple: int) -> list[int]:
    """The two largest multiples of `multiple` at most `side`, never below the minimum side."""
    below = max(MIN_SIDE, side // multiple * multiple)
    return [below, below - multiple] if below - multiple >= MIN_SIDE else [below]
