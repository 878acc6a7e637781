"""Queries of a running job's progress extras: its latest preview and its progress webhooks.

Functions flush; the caller commits. Times compared between processes use the database's clock.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from db.models import (
    TERMINAL_STATES,
    ApiKey,
    Job,
    JobPreview,
    JobState,
    ProgressDelivery,
    utcnow,
)

PENDING, SENDING, DELIVERED, FAILED = "pending", "sending", "delivered", "failed"


def save_preview(
    session: Session, job_id: int, image: bytes, media_type: str, step: int, steps: int
) -> None:
    """Store the job's latest preview in place of the one before (one row per job)."""
    values = {"image": image, "media_type": media_type, "step": step, "steps": steps}
    changed = session.execute(
        update(JobPreview)
        .where(JobPreview.job_id == job_id)
        .values(**values, updated_at=func.now())
        .execution_options(synchronize_session=False)
    )
    if getattr(changed, "rowcount", 0) == 0:
        session.add(JobPreview(job_id=job_id, **values))
    session.flush()


def get_preview(session: Session, job_id: int) -> JobPreview | None:
    """The job's latest preview, if its worker has made one."""
    return session.get(JobPreview, job_id)


def delete_ended_previews(session: Session) -> int:
    """Drop the previews of jobs that have ended (or were requeued); how many."""
    live = select(Job.id).where(Job.state == JobState.PROCESSING)
    result = session.execute(
        delete(JobPreview)
        .where(JobPreview.job_id.not_in(live))
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def count_deliveries(session: Session, job_id: int, event: str) -> int:
    """How many `event` deliveries the job has had."""
    query = select(func.count()).where(
        ProgressDelivery.job_id == job_id, ProgressDelivery.event == event
    )
    return int(session.scalar(query) or 0)


def create_delivery(session: Session, job_id: int, event: str, url: str, payload: str) -> None:
    """Record a progress delivery as due (the dispatcher makes its one attempt)."""
    message_id = f"msg_{secrets.token_hex(16)}"
    session.add(
        ProgressDelivery(
            job_id=job_id,
            event=event,
            message_id=message_id,
            url=url,
            payload=payload,
            state=PENDING,
        )
    )
    session.flush()


@dataclass(frozen=True)
class ClaimedProgress:
    """A claimed progress delivery and what signs it."""

    id: int
    job_id: int
    event: str
    url: str
    payload: str
    message_id: str
    secrets: list[str]
    track_id: str | None


def claim_due(session: Session, *, limit: int) -> list[ClaimedProgress]:
    """Take up to `limit` due progress deliveries (oldest first) for this dispatcher; a
    claimed one is never claimed again, whatever happens to its attempt (no retries)."""
    rows = session.scalars(
        select(ProgressDelivery)
        .where(ProgressDelivery.state == PENDING)
        .order_by(ProgressDelivery.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    claimed = []
    for row in rows:
        row.state = SENDING
        job = session.get(Job, row.job_id)
        key = session.get(ApiKey, job.api_key_id) if job is not None else None
        if job is None or key is None:
            row.state = FAILED
            continue
        signing = key.signing_secrets(utcnow())
        claimed.append(
            ClaimedProgress(
                row.id,
                row.job_id,
                row.event,
                row.url,
                row.payload,
                row.message_id,
                signing,
                job.track_id,
            )
        )
    session.flush()
    return claimed


def record_attempt(
    session: Session,
    delivery_id: int,
    *,
    status_code: int | None,
    error: str | None,
    duration_ms: float,
) -> None:
    """Record the one attempt of a progress delivery: delivered on a 2xx, else failed."""
    delivered = status_code is not None and 200 <= status_code < 300
    session.execute(
        update(ProgressDelivery)
        .where(ProgressDelivery.id == delivery_id)
        .values(
            state=DELIVERED if delivered else FAILED,
            status_code=status_code,
            error=error,
            duration_ms=duration_ms,
            attempted_at=func.now(),
        )
        .execution_options(synchronize_session=False)
    )


def deliveries_for_job(session: Session, job_id: int) -> Sequence[ProgressDelivery]:
    """The job's progress deliveries, oldest first."""
    query = select(ProgressDelivery).where(ProgressDelivery.job_id == job_id)
    return session.scalars(query.order_by(ProgressDelivery.id)).all()


def drop_unsent_of_ended(session: Session) -> int:
    """Mark failed the progress deliveries still due for jobs that have ended: news of a
    running job is worthless once its terminal webhook is on its way."""
    ended = select(Job.id).where(Job.state.in_(list(TERMINAL_STATES)))
    result = session.execute(
        update(ProgressDelivery)
        .where(ProgressDelivery.state == PENDING, ProgressDelivery.job_id.in_(ended))
        .values(state=FAILED, error="job ended before it was sent")
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)
