"""Queries of model-affinity routing: where a job was published, and who waits in model queues.

Functions flush; the caller owns the commit (see `services.routing` for the routing itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from darkroom.identities import Operation
from db.clock import DbNow
from db.models import Job, JobState


def mark_published(session: Session, job_ids: Sequence[int], queue_name: str) -> None:
    """Record that the jobs' ids reached the broker, and on which queue, in one statement (the
    database's clock stamps them: the sweeper compares that with its own `now()`)."""
    session.execute(
        update(Job)
        .where(Job.id.in_(job_ids))
        .values(enqueued_at=DbNow(), queue_name=queue_name)
        .execution_options(synchronize_session=False)
    )


def requested_models(
    session: Session, job_ids: Sequence[int]
) -> dict[int, tuple[Operation, str | None]]:
    """Each job's operation and the model id its request named (None: the default model)."""
    if not job_ids:
        return {}
    rows = session.execute(select(Job.id, Job.operation, Job.params).where(Job.id.in_(job_ids)))
    return {job_id: (operation, params.get("model_id")) for job_id, operation, params in rows}


def jobs_in_model_queues(
    session: Session, prefix: str, *, enqueued_before: datetime, limit: int = 100
) -> list[tuple[int, str]]:
    """(id, queue) of queued jobs published before `enqueued_before` to a queue whose name
    starts with `prefix` (the model queues), oldest first."""
    rows = session.execute(
        select(Job.id, Job.queue_name)
        .where(
            Job.state == JobState.QUEUED,
            Job.queue_name.startswith(prefix, autoescape=True),
            Job.enqueued_at < enqueued_before,
        )
        .order_by(Job.id)
        .limit(limit)
    )
    return [(job_id, queue) for job_id, queue in rows if queue is not None]
