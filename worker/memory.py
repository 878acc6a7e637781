"""Peak GPU memory per model, output size and sample: how many samples a batch may hold, and
what the model cache must leave free beside the weights.

Every batched pipeline call on CUDA is measured: `torch.cuda.max_memory_allocated` minus what
was allocated before the call (the weights and the cache's other residents) is the call's
activation peak, and divided by its samples the bytes one sample needs at that model and size.
The largest figure seen is kept, so a batch is sized from the worst case observed. A call that
runs out of memory caps later batches of that model and size below its sample count.

On the CPU nothing is measured: batches are bounded by `max_batch_samples` alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from darkroom.model_ids import ModelSpec


@dataclass(frozen=True)
class ShapeKey:
    """What activation memory depends on besides the batch: the model and the output size."""

    spec: ModelSpec
    width: int
    height: int


@dataclass
class PeakReading:
    """The activation bytes of one measured block; None where nothing could be measured."""

    bytes: int | None = None


class MemoryProfile:
    """Measured activation bytes per sample, per model and size, and the sizes that failed."""

    def __init__(self) -> None:
        self._per_sample: dict[ShapeKey, int] = {}
        self._ceilings: dict[ShapeKey, int] = {}  # the fewest samples that ran out of memory
        self._peaks: dict[ModelSpec, int] = {}  # the largest activation peak of each model

    def record(self, key: ShapeKey, samples: int, peak_bytes: int) -> None:
        """Remember a call of `samples` samples that needed `peak_bytes` beyond the weights."""
        per_sample = math.ceil(max(peak_bytes, 0) / max(samples, 1))
        self._per_sample[key] = max(self._per_sample.get(key, 0), per_sample)
        self._peaks[key.spec] = max(self._peaks.get(key.spec, 0), peak_bytes)

    def record_oom(self, key: ShapeKey, samples: int) -> None:
        """Remember that `samples` samples did not fit, so no later batch tries as many."""
        self._ceilings[key] = min(self._ceilings.get(key, samples), samples)

    def per_sample_bytes(self, key: ShapeKey) -> int | None:
        """The largest activation bytes per sample measured for `key`, if any."""
        return self._per_sample.get(key)

    def samples_that_fit(self, key: ShapeKey, free_bytes: int | None, cap: int) -> int:
        """How many samples one call may hold: within `cap`, below any size that ran out of
        memory, and within `free_bytes` at the measured bytes per sample (always at least 1)."""
        limit = cap
        if key in self._ceilings:
            limit = min(limit, self._ceilings[key] - 1)
        per_sample = self._per_sample.get(key)
        if per_sample and free_bytes is not None:
            limit = min(limit, free_bytes // per_sample)
        return max(1, limit)

    def reserve_bytes(self, spec: ModelSpec) -> int:
        """The largest activation peak measured for `spec`: room its batches need to run."""
        return self._peaks.get(spec, 0)


def available_bytes(device: str, fraction: float) -> int | None:
    """Memory a pipeline call may still use on `device` within `fraction` of it; None on CPU.

    Free device memory plus what PyTorch's allocator holds unused, less the share of the
    device that `fraction` keeps back (for other processes, the CUDA context, fragmentation).
    """
    if device != "cuda" or not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    unused_in_pool = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    return max(0, int(free + unused_in_pool - (1 - fraction) * total))


def device_budget(device: str, fraction: float) -> int | None:
    """The bytes that models and activations may use together on `device`; None on CPU."""
    if device != "cuda" or not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(0).total_memory * fraction)


@contextmanager
def measure_peak(device: str) -> Iterator[PeakReading]:
    """Measure the peak memory the block allocates beyond what was allocated before it."""
    reading = PeakReading()
    if device != "cuda" or not torch.cuda.is_available():
        yield reading
        return
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    yield reading
    torch.cuda.synchronize()
    reading.bytes = torch.cuda.max_memory_allocated() - before


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is the device running out of memory (worth a smaller batch)."""
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def release_cached_memory(device: str) -> None:
    """Give the allocator's unused blocks back after an out-of-memory error."""
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
