"""Closed-loop load: `concurrency` callers each send their next request as soon as the last one
answered, until a fixed count is done. The same shape drives the system and its baselines, so
their figures compare."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from benchmarks.report import median, percentile


@dataclass
class Sample:
    """One timed run of `count` operations: each one's latency (seconds) and the failures."""

    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def per_second(self) -> float:
        """Operations completed per second of wall time."""
        return len(self.latencies) / self.elapsed if self.elapsed > 0 else 0.0


async def run_async(call: Callable[[], Awaitable[bool]], count: int, concurrency: int) -> Sample:
    """`count` calls of `call` (True: it succeeded) from `concurrency` coroutines."""
    sample = Sample()
    remaining = count

    async def caller() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1  # no await in between: coroutines never race for the same slot
            started = time.perf_counter()
            ok = await call()
            sample.latencies.append(time.perf_counter() - started)
            sample.errors += not ok

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    sample.elapsed = time.perf_counter() - started
    return sample


def run_threads(call: Callable[[], bool], count: int, concurrency: int) -> Sample:
    """`count` calls of `call` (True: it succeeded) from `concurrency` threads."""
    sample = Sample()
    lock = threading.Lock()
    remaining = count

    def caller() -> None:
        nonlocal remaining
        while True:
            with lock:
                if remaining <= 0:
                    return
                remaining -= 1
            started = time.perf_counter()
            ok = call()
            latency = time.perf_counter() - started
            with lock:
                sample.latencies.append(latency)
                sample.errors += not ok

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for future in [pool.submit(caller) for _ in range(concurrency)]:
            future.result()
    sample.elapsed = time.perf_counter() - started
    return sample


def summary(samples: Sequence[Sample]) -> dict[str, Any]:
    """Rounds of one case: the median of the rounds' rates, percentiles over every latency."""
    latencies = [latency for sample in samples for latency in sample.latencies]
    return {
        "per_s": median([sample.per_second for sample in samples]),
        "rounds_per_s": [round(sample.per_second, 1) for sample in samples],
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "count": len(latencies),
        "errors": sum(sample.errors for sample in samples),
    }
