"""Prometheus metrics: what each process counts, and what the API reads from shared state.

Every tier is its own process, possibly on its own machine, so each exports its own registry
(the API on its /metrics route, a worker or dispatcher on `*_metrics_port`), as Prometheus
expects of separate targets. Counters and histograms live where the event happens: a job's
terminal transition in whichever process won it (worker, sweeper, API cancel), a webhook
attempt in the dispatcher, a model load in the worker. State that all processes share (queue
depth, jobs waiting, deliveries pending) is read once, at scrape time, by the API's
`SystemCollector`, so it is neither summed nor duplicated across targets.

This module never imports torch: GPU memory is read only where torch is already loaded.
"""

from __future__ import annotations

import enum
import functools
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

import redis
from celery.signals import worker_init
from kombu.transport.redis import Channel as RedisChannel
from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import event, func, select, text
from sqlalchemy.orm import Session

from darkroom.celery_hooks import connect_replacing
from darkroom.identities import Operation
from darkroom.queue import filesystem_queue_lengths, redis_list_lengths
from darkroom.settings import Settings
from db.models import DeliveryState, Job, JobState, WebhookDelivery, utcnow
from db.repositories.webhooks import AttemptRecord
from db.session import session_scope

log = logging.getLogger(__name__)

ACTIVE_STATES = (JobState.QUEUED, JobState.PROCESSING)
WATCHED_DELIVERY_STATES = (DeliveryState.PENDING, DeliveryState.FAILED)

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


class FailureReason(enum.StrEnum):
    """The bounded label of a failed job in `darkroom_job_failures`."""

    CANCELED = "canceled"
    WORKER_LOST = "worker_lost"
    INTERNAL = "internal"
    STORAGE = "storage"  # the images were generated, the write failed: given by the caller
    REJECTED = "rejected"


def failure_reason(message: str) -> FailureReason:
    """The label of a failure whose caller gave none, from its client-safe message."""
    if message == "The job was canceled.":
        return FailureReason.CANCELED
    if "the worker stopped while running it" in message:
        return FailureReason.WORKER_LOST
    if "internal error" in message:
        return FailureReason.INTERNAL
    return FailureReason.REJECTED


def record_job_end(
    session: Session,
    job: Job,
    *,
    failure: str | None = None,
    reason: FailureReason | None = None,
    generation_time: float = 0.0,
) -> None:
    """Count `job`'s terminal transition, once `session` commits it (a rollback counts nothing).

    A failure is counted under `reason`, or the reason its message implies."""
    operation = job.operation.value
    state = JobState.FAILED.value if failure is not None else JobState.SUCCESS.value
    latency = max((utcnow() - job.created_at).total_seconds(), 0.0)

    def observe(_session: Session) -> None:
        JOBS_FINISHED.labels(operation, state).inc()
        JOB_LATENCY.labels(operation, state).observe(latency)
        if failure is not None:
            label = reason or failure_reason(failure)
            JOB_FAILURES.labels(operation, label.value).inc()
        else:
            JOB_GENERATION.labels(operation).observe(generation_time)

    event.listen(session, "after_commit", observe, once=True)


def record_webhook_attempt(record: AttemptRecord) -> None:
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


def record_delivery_end(state: DeliveryState) -> None:
    """Count a webhook delivery that was delivered or given up."""
    WEBHOOK_DELIVERIES_FINISHED.labels(state.value).inc()


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


class SystemCollector:
    """Shared state read at scrape time: broker queue depths and the database's waiting work.

    Each probe is bounded by `metrics_probe_timeout_s`; a probe that fails reports
    `darkroom_broker_up 0` or `darkroom_database_up 0` instead of failing the scrape.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._redis: redis.Redis | None = None

    def collect(self) -> Iterator[Metric]:
        yield from self._broker_metrics()
        yield from self._database_metrics()

    def _broker_metrics(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "darkroom_queue_depth", "Messages waiting in each broker queue.", labels=["queue"]
        )
        up = GaugeMetricFamily("darkroom_broker_up", "1 if this scrape could read the broker.")
        try:
            sizes = self._queue_sizes()
        except (redis.RedisError, OSError) as exc:
            log.warning("metrics: broker queue depth unavailable: %s", type(exc).__name__)
            up.add_metric([], 0)
        else:
            for queue, size in sorted(sizes.items()):
                depth.add_metric([queue], size)
            up.add_metric([], 1)
        yield depth
        yield up

    def _queue_sizes(self) -> dict[str, int]:
        settings = self.settings
        if settings.is_embedded_broker:
            return filesystem_queue_sizes(settings)
        if self._redis is None:
            timeout = settings.metrics_probe_timeout_s
            self._redis = redis.Redis.from_url(
                settings.resolved_broker_url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
        return redis_queue_sizes(self._redis, settings)

    def _database_metrics(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("darkroom_database_up", "1 if this scrape could read the database.")
        try:
            with session_scope(self.settings.resolved_database_url) as session:
                _bound_statement(session, self.settings.metrics_probe_timeout_s)
                families = [*_job_families(session), _delivery_family(session)]
        except Exception as exc:  # any database trouble: report it as a gauge, never a 500
            log.warning("metrics: database counts unavailable: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield from families
        yield up


def _queue_names(settings: Settings, found: Iterable[str]) -> set[str]:
    """The fixed queues, plus the per-model job queues (`<job_queue>.model.<id>`) in `found`."""
    prefix = f"{settings.job_queue}.model."
    return {settings.job_queue, settings.webhook_queue} | {q for q in found if q.startswith(prefix)}


def redis_queue_sizes(client: redis.Redis, settings: Settings) -> dict[str, int]:
    """Messages per queue, as kombu keeps them: one Redis list per queue and priority step."""
    deadline = time.monotonic() + settings.metrics_probe_timeout_s
    pattern = _glob_escape(settings.job_queue) + ".model.*"
    found = []
    for key in client.scan_iter(match=pattern, count=1000):
        found.append(key.decode(errors="replace").split(RedisChannel.sep)[0])
        if time.monotonic() > deadline:  # a huge keyspace: report the queues seen so far
            break
    return redis_list_lengths(client, _queue_names(settings, found))


def filesystem_queue_sizes(settings: Settings) -> dict[str, int]:
    """Messages per queue of the embedded broker, the fixed queues included."""
    counts = filesystem_queue_lengths(settings)
    return {name: counts.get(name, 0) for name in _queue_names(settings, counts)}


def _glob_escape(name: str) -> str:
    """`name` as a literal inside a Redis SCAN pattern."""
    return "".join(f"\\{char}" if char in "*?[]\\" else char for char in name)


def _bound_statement(session: Session, seconds: float) -> None:
    """On PostgreSQL, cancel this transaction's queries that run longer than `seconds`."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"SET LOCAL statement_timeout = {int(seconds * 1000)}"))


def _job_families(session: Session) -> Iterator[GaugeMetricFamily]:
    """Unfinished jobs by state and operation, and the age of the oldest queued one."""
    rows = session.execute(
        select(Job.state, Job.operation, func.count(Job.id), func.min(Job.created_at))
        .where(Job.state.in_(ACTIVE_STATES))
        .group_by(Job.state, Job.operation)
    ).all()
    counts = {(state, operation): count for state, operation, count, _ in rows}
    jobs = GaugeMetricFamily(
        "darkroom_jobs",
        "Jobs not finished yet, by state and operation.",
        labels=["state", "operation"],
    )
    for state in ACTIVE_STATES:
        for operation in Operation:
            jobs.add_metric([state.value, operation.value], counts.get((state, operation), 0))
    yield jobs
    queued: list[datetime] = [row[3] for row in rows if row[0] == JobState.QUEUED and row[3]]
    age = (utcnow() - min(queued)).total_seconds() if queued else 0.0
    yield GaugeMetricFamily(
        "darkroom_oldest_queued_job_age_seconds",
        "Seconds the oldest queued job has waited (0 when none waits).",
        value=max(age, 0.0),
    )


def _delivery_family(session: Session) -> GaugeMetricFamily:
    """Webhook deliveries waiting for an attempt (pending) or given up (failed, replayable)."""
    rows = session.execute(
        select(WebhookDelivery.state, func.count(WebhookDelivery.id))
        .where(WebhookDelivery.state.in_(WATCHED_DELIVERY_STATES))
        .group_by(WebhookDelivery.state)
    ).all()
    counts: dict[DeliveryState, int] = {state: count for state, count in rows}
    family = GaugeMetricFamily(
        "darkroom_webhook_deliveries", "Webhook deliveries by state.", labels=["state"]
    )
    for state in WATCHED_DELIVERY_STATES:
        family.add_metric([state.value], counts.get(state, 0))
    return family
