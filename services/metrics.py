"""Metrics that need the database or the broker: the API's scrape-time gauges, and counting a
job's end once its transaction commits.

The counters and histograms themselves, and serving them, are the shared kernel's
(darkroom/metrics.py); this module reads shared state for them. Gauges of state that all
processes share (queue depth, jobs waiting, deliveries pending) are read once, at scrape time,
by the API's `SystemCollector`, so they are neither summed nor duplicated across targets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from datetime import datetime

import redis
from kombu.transport.redis import Channel as RedisChannel
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import event
from sqlalchemy.orm import Session

from darkroom import metrics
from darkroom.identities import FailureReason, Operation
from darkroom.queue import filesystem_queue_lengths, redis_list_lengths
from darkroom.settings import Settings
from db.models import DeliveryState, Job, JobState, utcnow
from db.repositories import metrics as queries
from db.repositories.metrics import JobCount
from db.session import session_scope

log = logging.getLogger(__name__)

ACTIVE_STATES = (JobState.QUEUED, JobState.PROCESSING)
WATCHED_DELIVERY_STATES = (DeliveryState.PENDING, DeliveryState.FAILED)


def record_job_end(
    session: Session,
    job: Job,
    *,
    failure: FailureReason | None = None,
    generation_time: float = 0.0,
) -> None:
    """Count `job`'s terminal transition, once `session` commits it (a rollback counts nothing):
    a failure (with its reason) or a success."""
    operation = job.operation.value
    state = JobState.FAILED.value if failure is not None else JobState.SUCCESS.value
    latency = max((utcnow() - job.created_at).total_seconds(), 0.0)

    def observe(_session: Session) -> None:
        metrics.count_job_end(
            operation, state, latency, failure=failure, generation_time=generation_time
        )

    event.listen(session, "after_commit", observe, once=True)


class SystemCollector:
    """Shared state read at scrape time: broker queue depths and the database's waiting work.

    Each probe is bounded by `metrics_probe_timeout_s`; a probe that fails reports
    `darkroom_broker_up 0` or `darkroom_database_up 0` instead of failing the scrape.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._redis: redis.Redis | None = None

    def collect(self) -> Iterator[Metric]:
        """The broker's gauges, then the database's."""
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
                queries.bound_statements(session, self.settings.metrics_probe_timeout_s)
                jobs = queries.job_counts(session, ACTIVE_STATES)
                deliveries = queries.delivery_counts(session, WATCHED_DELIVERY_STATES)
        except Exception as exc:  # any database trouble: report it as a gauge, never a 500
            log.warning("metrics: database counts unavailable: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield from _job_families(jobs)
        yield _delivery_family(deliveries)
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


def _job_families(rows: list[JobCount]) -> Iterator[GaugeMetricFamily]:
    """Unfinished jobs by state and operation, and the age of the oldest queued one."""
    counts = {(row.state, row.operation): row.count for row in rows}
    jobs = GaugeMetricFamily(
        "darkroom_jobs",
        "Jobs not finished yet, by state and operation.",
        labels=["state", "operation"],
    )
    for state in ACTIVE_STATES:
        for operation in Operation:
            jobs.add_metric([state.value, operation.value], counts.get((state, operation), 0))
    yield jobs
    queued: list[datetime] = [
        row.oldest_created_at
        for row in rows
        if row.state == JobState.QUEUED and row.oldest_created_at
    ]
    age = (utcnow() - min(queued)).total_seconds() if queued else 0.0
    yield GaugeMetricFamily(
        "darkroom_oldest_queued_job_age_seconds",
        "Seconds the oldest queued job has waited (0 when none waits).",
        value=max(age, 0.0),
    )


def _delivery_family(counts: dict[DeliveryState, int]) -> GaugeMetricFamily:
    """Webhook deliveries waiting for an attempt (pending) or given up (failed, replayable)."""
    family = GaugeMetricFamily(
        "darkroom_webhook_deliveries", "Webhook deliveries by state.", labels=["state"]
    )
    for state in WATCHED_DELIVERY_STATES:
        family.add_metric([state.value], counts.get(state, 0))
    return family
