"""A benchmark-only generator: ready images after a fixed time per call, no diffusion.

`benchmarks/saturation.py` sets `DARKROOM_BENCH_FAKE_GENERATOR_MS` and
`DARKROOM_BENCH_FAKE_GENERATOR=true` in the worker's environment, so that the system's own cost
around the pipeline call shows. Both must be set; nothing a client sends reaches them. Each
call sleeps the set time (as a GPU call leaves the CPU free), and appends
`start end requests` (wall clock, seconds; the step hook's database writes come before
`start`) to `bench_generator_log` when set.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from darkroom.settings import Settings
from worker.batching import BatchStepHook, Outcome
from worker.pipelines.request import GenerationRequest, GenerationResult


def fake_generator_enabled(settings: Settings) -> bool:
    """Whether both benchmark settings ask for the fake generator."""
    return settings.bench_fake_generator and settings.bench_fake_generator_ms > 0


def fake_generate_batch(
    requests: Sequence[GenerationRequest],
    settings: Settings,
    on_step: BatchStepHook | None = None,
) -> list[Outcome]:
    """One outcome per request after `bench_fake_generator_ms`: its init image resized."""
    if on_step is not None:  # progress and cancel checks, as a real call's first step makes
        on_step(list(range(len(requests))), 1, 1)
    start = time.time()
    seconds = settings.bench_fake_generator_ms / 1000
    time.sleep(seconds)
    outcomes: list[Outcome] = [_result(request, seconds) for request in requests]
    if settings.bench_generator_log is not None:
        _append(settings.bench_generator_log, start, time.time(), len(requests))
    return outcomes


def _result(request: GenerationRequest, seconds: float) -> GenerationResult:
    """The request's images: its first init image at the output size, once per seed. Converted
    and resized only when needed: the fake's own CPU would count as the system's."""
    image = request.images[0]
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (request.width, request.height):
        image = image.resize((request.width, request.height))
    return GenerationResult([image.copy() for _ in request.seeds], seconds, 0.0)


def _append(path: Path, start: float, end: float, count: int) -> None:
    with path.open("a", encoding="utf-8") as log:
        log.write(f"{start:.6f} {end:.6f} {count}\n")
