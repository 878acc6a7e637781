"""Operator queries: filtered job lists, the queue's shape, a job's whole record, requeue.

Used by the `darkroom jobs` commands and the dashboard; the views they show of these rows are
built in services/job_views.py. Functions flush; the caller commits.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from darkroom.identities import Operation
from db.models import ApiKey, DeliveryState, Job, JobRequeue, JobState, WebhookDelivery, utcnow

#: The most rows one listing returns.
MAX_LIST = 1000


@dataclass(frozen=True)
class JobFilter:
    """Which jobs a listing shows, newest first."""

    state: JobState | None = None
    operation: Operation | None = None
    api_key_id: int | None = None
    limit: int = 50


@dataclass(frozen=True)
class JobRecord:
    """A job with everything an operator looks at: its key, webhook and earlier runs."""

    job: Job
    key: ApiKey | None
    delivery: WebhookDelivery | None
    requeues: list[JobRequeue]


@dataclass(frozen=True)
class QueueSummary:
    """Job counts by operation and state, and the signs of trouble."""

    counts: list[tuple[Operation, JobState, int]]
    oldest_queued_at: datetime | None
    expired_leases: int
    deliveries: dict[DeliveryState, int]


def list_jobs(session: Session, wanted: JobFilter) -> list[Job]:
    """The newest jobs that match the filter."""
    query = select(Job).order_by(Job.id.desc()).limit(max(1, min(wanted.limit, MAX_LIST)))
    if wanted.state is not None:
        query = query.where(Job.state == wanted.state)
    if wanted.operation is not None:
        query = query.where(Job.operation == wanted.operation)
    if wanted.api_key_id is not None:
        query = query.where(Job.api_key_id == wanted.api_key_id)
    return list(session.scalars(query))


def keys_by_id(session: Session, key_ids: set[int]) -> dict[int, ApiKey]:
    """The keys of a page of jobs, in one query."""
    if not key_ids:
        return {}
    return {key.id: key for key in session.scalars(select(ApiKey).where(ApiKey.id.in_(key_ids)))}


def deliveries_by_job(session: Session, job_ids: list[int]) -> dict[int, WebhookDelivery]:
    """The webhook deliveries of a page of jobs, in one query."""
    if not job_ids:
        return {}
    rows = session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id.in_(job_ids)))
    return {delivery.job_id: delivery for delivery in rows if delivery.job_id is not None}


def job_record(session: Session, job_id: int) -> JobRecord | None:
    """Job `job_id` with its key, webhook delivery (attempts load on access) and requeues."""
    job = session.get(Job, job_id) if 1 <= job_id < 2**31 else None
    if job is None:
        return None
    delivery = session.scalar(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id))
    requeues = session.scalars(
        select(JobRequeue).where(JobRequeue.job_id == job_id).order_by(JobRequeue.id)
    )
    return JobRecord(job, session.get(ApiKey, job.api_key_id), delivery, list(requeues))


def queue_summary(session: Session) -> QueueSummary:
    """Counts by (operation, state), the oldest queued job and leases nobody renews."""
    grouped = session.execute(
        select(Job.operation, Job.state, func.count(Job.id))
        .group_by(Job.operation, Job.state)
        .order_by(Job.operation, Job.state)
    )
    oldest = session.scalar(select(func.min(Job.created_at)).where(Job.state == JobState.QUEUED))
    expired = session.scalar(
        select(func.count(Job.id)).where(
            Job.state == JobState.PROCESSING, Job.lease_until < utcnow()
        )
    )
    deliveries = session.execute(
        select(WebhookDelivery.state, func.count(WebhookDelivery.id)).group_by(
            WebhookDelivery.state
        )
    )
    return QueueSummary(
        counts=[(Operation(op), JobState(state), int(n)) for op, state, n in grouped],
        oldest_queued_at=oldest,
        expired_leases=int(expired or 0),
        deliveries={DeliveryState(state): int(n) for state, n in deliveries},
    )


def lock_job(session: Session, job_id: int) -> Job | None:
    """Job `job_id`, locked until the transaction ends (Postgres), read afresh."""
    if not 1 <= job_id < 2**31:
        return None
    query = select(Job).where(Job.id == job_id).with_for_update()
    return session.scalar(query.execution_options(populate_existing=True))


def lock_delivery(session: Session, job_id: int) -> WebhookDelivery | None:
    """The job's webhook delivery, locked so that the dispatcher cannot claim it meanwhile."""
    query = select(WebhookDelivery).where(WebhookDelivery.job_id == job_id).with_for_update()
    return session.scalar(query.execution_options(populate_existing=True))


def supersede_run(
    session: Session,
    job: Job,
    delivery: WebhookDelivery | None,
    reason: str | None,
    *,
    previous_webhook: dict[str, Any] | None,
) -> JobRequeue:
    """Record the run a requeue replaces, and move its webhook delivery into that record.

    The delivery row (one per job) must go so that the next outcome gets a delivery of its
    own; its attempts are kept in the requeue record as `previous_webhook`, the delivery's JSON
    (services.job_views.superseded_webhook).
    """
    record = JobRequeue(
        job_id=job.id,
        reason=reason,
        previous_state=job.state,
        previous_error=job.error,
        previous_attempts=job.attempts,
        previous_started_at=job.started_at,
        previous_finished_at=job.finished_at,
        previous_webhook=previous_webhook,
    )
    session.add(record)
    if delivery is not None:
        for attempt in delivery.attempts:
            session.delete(attempt)
        session.delete(delivery)
    session.flush()
    return record


def reset_to_queued(session: Session, job_id: int, from_state: JobState) -> bool:
    """Put a failed or processing job back in the queue with fresh attempts. False if its
    state changed meanwhile."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == from_state)
        .values(
            state=JobState.QUEUED,
            attempts=0,
            error=None,
            generation_time=None,
            enqueued_at=None,
            started_at=None,
            lease_until=None,
            finished_at=None,
            cancel_requested_at=None,
            progress=None,
            queue_name=None,
        )
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount) == 1  # type: ignore[attr-defined]


def queued_job_ids(session: Session, key_id: int | None, limit: int) -> list[int]:
    """Up to `limit` queued jobs, oldest first: of key `key_id`, or of every key (None)."""
    query = select(Job.id).where(Job.state == JobState.QUEUED)
    if key_id is not None:
        query = query.where(Job.api_key_id == key_id)
    return list(session.scalars(query.order_by(Job.id).limit(limit)))
