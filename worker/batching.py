"""Cross-request batching: compatible generation requests run as one pipeline call.

`generate_batch` takes the requests of the jobs a worker claimed together and returns one outcome
per request, a `GenerationResult` or the exception that ended it, so that a bad request fails
alone:

1. Each request is checked on its own (`check_request`); a refused one gets its ValueError.
2. The rest are grouped by what one call shares (`darkroom.jobspec.shared_fields`, read from the
   requests themselves, so the actual output size counts, not the job's `batch_key`). The mixer
   never groups. Each group loads its model once.
3. A group is cut into calls of at most `samples_that_fit` samples: `max_batch_samples`, and on
   CUDA what free memory holds at the bytes per sample measured for that model and size
   (`worker.memory`). A job's samples always stay in one call.
4. A call that fails is split in halves and each half retried, down to single requests, so the
   request that broke it (or the batch that ran out of memory) fails alone; an out-of-memory
   error also caps later batches of that model and size. A `StopBatch` raised by the step hook
   (every job of the call canceled) ends the call without a retry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from darkroom.identities import Operation
from darkroom.jobspec import shared_fields
from darkroom.settings import Settings
from worker.memory import (
    ShapeKey,
    available_bytes,
    is_out_of_memory,
    measure_peak,
    release_cached_memory,
)
from worker.models.cache import ModelCache
from worker.pipelines.generate import Loaded, check_request, load_for, run_loaded
from worker.pipelines.request import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

Outcome = GenerationResult | Exception
#: Called after every denoising step with (indices of the requests in the running call, steps
#: done, steps in all); it may raise StopBatch to end that call.
BatchStepHook = Callable[[list[int], int, int], None]


class StopBatch(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by a step hook to end the running call; its requests get it as their outcome."""


def generate_batch(
    requests: Sequence[GenerationRequest],
    cache: ModelCache,
    settings: Settings,
    on_step: BatchStepHook | None = None,
) -> list[Outcome]:
    """Run `requests`, compatible ones together; one outcome per request, in order."""
    outcomes: list[Outcome | None] = [None] * len(requests)
    runnable = []
    for index, request in enumerate(requests):
        try:
            check_request(request)
        except ValueError as exc:
            outcomes[index] = exc
        else:
            runnable.append(index)
    for group in compatible_groups(requests, runnable):
        _Group(requests, group, cache, settings, on_step, outcomes).run()
    assert all(outcome is not None for outcome in outcomes), "every request has an outcome"
    return [outcome for outcome in outcomes if outcome is not None]


def compatibility(request: GenerationRequest) -> tuple[Any, ...] | None:
    """What a request must share with others to join their call; None: it never joins one."""
    if request.operation == Operation.IMG_MIXER:
        return None
    return tuple(getattr(request, name) for name in shared_fields(request.operation))


def compatible_groups(
    requests: Sequence[GenerationRequest], indices: Sequence[int]
) -> list[list[int]]:
    """`indices` grouped by compatibility, in order of first appearance."""
    groups: dict[Any, list[int]] = {}
    for index in indices:
        signature = compatibility(requests[index])
        key = ("alone", index) if signature is None else signature
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def pack(
    indices: Sequence[int], requests: Sequence[GenerationRequest], max_samples: int
) -> list[list[int]]:
    """Consecutive calls of at most `max_samples` samples (a larger request goes alone)."""
    calls: list[list[int]] = []
    samples = 0
    for index in indices:
        count = len(requests[index].seeds)
        if calls and samples + count <= max_samples:
            calls[-1].append(index)
            samples += count
        else:
            calls.append([index])
            samples = count
    return calls


class _Group:
    """One group of compatible requests: loaded once, run in calls, split where a call fails."""

    def __init__(
        self,
        requests: Sequence[GenerationRequest],
        indices: list[int],
        cache: ModelCache,
        settings: Settings,
        on_step: BatchStepHook | None,
        outcomes: list[Outcome | None],
    ) -> None:
        self.requests, self.indices, self.cache = requests, indices, cache
        self.settings, self.on_step, self.outcomes = settings, on_step, outcomes

    def run(self) -> None:
        """Load the group's model, then run it in calls that fit."""
        try:
            loaded = load_for([self.requests[i] for i in self.indices], self.cache, self.settings)
        except Exception as exc:  # a model that cannot load fails every request of the group
            self._settle(self.indices, exc)
            return
        first = self.requests[self.indices[0]]
        key = ShapeKey(loaded.spec, first.width, first.height)
        free = available_bytes(self.cache.device, self.settings.gpu_memory_fraction)
        limit = self.cache.memory.samples_that_fit(key, free, self.settings.max_batch_samples)
        for call in pack(self.indices, self.requests, limit):
            self._run_or_split(loaded, key, call)

    def _run_or_split(self, loaded: Loaded, key: ShapeKey, call: list[int]) -> None:
        """Run one call; on failure retry its halves, down to single requests."""
        subset = [self.requests[i] for i in call]
        samples = sum(len(request.seeds) for request in subset)
        try:
            with measure_peak(self.cache.device) as peak:
                results = run_loaded(loaded, subset, self.cache, self.settings, self._hook(call))
        except StopBatch as stop:
            self._settle(call, stop)
            return
        except Exception as exc:
            if len(call) == 1:
                self._settle(call, exc)
                return
            self._note_failure(key, call, samples, exc)
            middle = len(call) // 2
            self._run_or_split(loaded, key, call[:middle])
            self._run_or_split(loaded, key, call[middle:])
            return
        if peak.bytes is not None:
            self.cache.memory.record(key, samples, peak.bytes)
        for index, result in zip(call, results, strict=True):
            self.outcomes[index] = result

    def _note_failure(self, key: ShapeKey, call: list[int], samples: int, exc: Exception) -> None:
        """Log a failed call; after running out of memory, cap this model and size's batches."""
        if is_out_of_memory(exc):
            self.cache.memory.record_oom(key, samples)
            release_cached_memory(self.cache.device)
        log.warning(
            "a batch of %d requests (%d samples) failed (%s: %s); retrying it in halves",
            len(call),
            samples,
            type(exc).__name__,
            exc,
        )

    def _hook(self, call: list[int]) -> Callable[[int, int], None] | None:
        """The step hook of one call, telling the batch hook which requests are running."""
        on_step = self.on_step
        if on_step is None:
            return None
        return lambda done, total: on_step(call, done, total)

    def _settle(self, indices: Sequence[int], outcome: Exception) -> None:
        for index in indices:
            self.outcomes[index] = outcome
