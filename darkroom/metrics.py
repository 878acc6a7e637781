"""Prometheus metrics: what each process counts, and what the API reads from shared state.

Every tier is its own process, possibly on its own machine, so each exports its own registry
(the API on its /metrics route, a worker or dispatcher on `*_metrics_port`), as Prometheus
expects of separate targets. Counters and histograms live where the event happens: a job's
terminal transition in whichever process won it (worker, sweeper, API cancel), a webhook
attempt in the dispatcher, a model load in the worker. State that all processes share (queue
depth, jobs waiting, deliveries pending) is read once, at scrape time, by the API's
`services.metrics.SystemCollector`, so it is neither summed nor duplicated across targets.

This module never imports torch: GPU memory is read only where torch is already loaded. It is
the shared kernel's: it defines and serves the metrics and imports nothing from db/ or the tiers
above; what reads the database or the broker for them is services/metrics.py.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Iterable
from typing import Any, Protocol

from celery.signals import worker_init
from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

from darkroom.celery_hooks import connect_replacing
from darkroom.identities import FailureReason

log = logging.getLogger(__name__)

JOBS_FINISHED = Counter(
    "darkroom_jobs_finished",
    "Jobs that reached a terminal state, counted by the process that recorded it.",
    ["operation", "state"],
)
JOB_FAILURES = Counter(
    "darkroom_job_failures",
    "Failed jobs by reason: canceled, worker_lost, internal, storage (the images could not be "
    "stored) or rejected (bad input).",
    ["operation", "reason"],
)
JOB_LATENCY = Histogram(
    "darkroom_job_latency_seconds",
    "Seconds from a job's submission to its terminal state.",
    ["operation", "state"],
    buckets=(0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600),
)
JOB_GENERATION = Histogram(
    "darkroom_job_generation_seconds",
    "Pipeline seconds of successful jobs (the generationTime clients see).",
    ["operation"],
    buckets=(0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300),
)
WEBHOOK_ATTEMPTS = Counter(
    "darkroom_webhook_attempts",
    "Webhook POSTs by outcome (delivered, rejected, timeout, connection_error, refused) and "
    "HTTP status class (2xx..5xx, none without a response).",
    ["outcome", "status_class"],
)
WEBHOOK_ATTEMPT_SECONDS = Histogram(
    "darkroom_webhook_attempt_seconds",
    "Seconds one webhook attempt took, answered or not.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30),
)
WEBHOOK_DELIVERIES_FINISHED = Counter(
    "darkroom_webhook_deliveries_finished",
    "Webhook deliveries that ended: delivered, or failed once the schedule gave up.",
    ["state"],
)
MODEL_CACHE_LOOKUPS = Counter(
    "darkroom_model_cache_lookups",
    "Model cache lookups by kind (an operation's pipelines, vae, safety_checker) and result.",
    ["kind", "result"],
)
MODEL_LOAD_SECONDS = Histogram(
    "darkroom_model_load_seconds",
    "Seconds spent loading a model on a cache miss (its _count is the number of loads).",
    ["kind"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)


def count_job_end(
    operation: str,
    state: str,
    latency_s: float,
    *,
    failure: FailureReason | None = None,
    generation_time: float = 0.0,
) -> None:
    """Count a job's terminal transition to `state`: a failure (with its reason) or a success.
    Called once the transition is committed (services.metrics.record_job_end)."""
    JOBS_FINISHED.labels(operation, state).inc()
    JOB_LATENCY.labels(operation, state).observe(latency_s)
    if failure is not None:
        JOB_FAILURES.labels(operation, failure.value).inc()
    else:
        JOB_GENERATION.labels(operation).observe(generation_time)


class AttemptResult(Protocol):
    """What a webhook attempt produced, as metrics read it (db.repositories.webhooks'
    AttemptRecord)."""

    @property
    def status_code(self) -> int | None: ...

    @property
    def error(self) -> str | None: ...

    @property
    def latency_ms(self) -> float: ...


def record_webhook_attempt(record: AttemptResult) -> None:
    """Count one webhook attempt by its outcome and status class, and observe its duration."""
    code = record.status_code
    if code is not None:
        outcome = "delivered" if 200 <= code < 300 else "rejected"
        status_class = f"{code // 100}xx"
    else:
        error = record.error or ""
        outcome = error.split(":")[0].replace(" ", "_") or "connection_error"
        status_class = "none"
    WEBHOOK_ATTEMPTS.labels(outcome, status_class).inc()
    WEBHOOK_ATTEMPT_SECONDS.observe(record.latency_ms / 1000)


def record_delivery_end(state: str) -> None:
    """Count a webhook delivery that was delivered or given up (`state`: its DeliveryState)."""
    WEBHOOK_DELIVERIES_FINISHED.labels(str(state)).inc()


def _model_kind(key: object) -> str:
    """A cache key's label: the component kind, or the operation a pipeline set serves."""
    return str(getattr(key, "kind", None) or getattr(key, "operation", "pipeline"))


def record_model_cache_hit(key: object) -> None:
    """Count a model cache lookup that found the model resident."""
    MODEL_CACHE_LOOKUPS.labels(_model_kind(key), "hit").inc()


def record_model_load(key: object, seconds: float) -> None:
    """Count a model cache miss and observe how long loading the model took."""
    kind = _model_kind(key)
    MODEL_CACHE_LOOKUPS.labels(kind, "miss").inc()
    MODEL_LOAD_SECONDS.labels(kind).observe(seconds)


class GpuMemoryCollector:
    """CUDA memory held by this process's tensors (allocated) and caching allocator (reserved).

    It reads torch only if the process already imported it, and never initialises CUDA: before
    the first CUDA use torch reports zero.
    """

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        torch: Any = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return []
        allocated, reserved = self._families()
        for index in range(torch.cuda.device_count()):
            allocated.add_metric([str(index)], torch.cuda.memory_allocated(index))
            reserved.add_metric([str(index)], torch.cuda.memory_reserved(index))
        return [allocated, reserved]

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "darkroom_gpu_memory_allocated_bytes",
                "CUDA memory occupied by tensors.",
                labels=["device"],
            ),
            GaugeMetricFamily(
                "darkroom_gpu_memory_reserved_bytes",
                "CUDA memory held by the caching allocator.",
                labels=["device"],
            ),
        )


@functools.cache
def _register_gpu_collector() -> None:
    """Add GPU memory to this process's registry, once (only processes that export it)."""
    REGISTRY.register(GpuMemoryCollector())


def serve_metrics(port: int, host: str) -> bool:
    """Serve this process's metrics on http://host:port/metrics; False if that port is taken."""
    _register_gpu_collector()
    try:
        start_http_server(port, addr=host)
    except OSError:
        log.exception("metrics exporter could not listen on %s:%s", host, port)
        return False
    log.info("metrics exporter on http://%s:%s/metrics", host, port)
    return True


def serve_metrics_in_worker(port: int, host: str) -> None:
    """Start the exporter when a Celery worker starts in this process (0: never).

    Not at import: Flower and `celery inspect` import the same app modules.
    """
    if port:
        connect_replacing(
            worker_init, lambda **_kwargs: serve_metrics(port, host), "darkroom.metrics.serve"
        )
    else:  # a factory called again without a port withdraws the previous one's exporter
        worker_init.disconnect(dispatch_uid="darkroom.metrics.serve")
