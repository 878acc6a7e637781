"""Queries of a running job's progress extras: its latest preview and its progress webhooks.

Functions flush; the caller commits. Times compared between processes use the database's clock.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, delete, exists, func, or_, select, update
from sqlalchemy.orm import Session

from db.clock import DbNow, db_now
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
    """A claimed progress delivery, what signs it, and its claim (`lease_until` fences the
    recording: a claimer that outlived its lease cannot overwrite the next one's outcome)."""

    id: int
    job_id: int
    event: str
    url: str
    payload: str
    message_id: str
    secrets: list[str]
    track_id: str | None
    lease_until: datetime


def _job_ended() -> ColumnElement[bool]:
    """Whether the delivery's job has reached a terminal state."""
    return exists().where(Job.id == ProgressDelivery.job_id, Job.state.in_(list(TERMINAL_STATES)))


def _abandoned(now: ColumnElement[datetime] | datetime) -> ColumnElement[bool]:
    """Claimed by a dispatcher whose lease ran out before it recorded the attempt: it died (or
    stalled) mid-attempt. Rows claimed before leases existed (no lease) count as expired."""
    return and_(
        ProgressDelivery.state == SENDING,
        or_(ProgressDelivery.lease_until.is_(None), ProgressDelivery.lease_until < now),
    )


def _claimable(now: datetime) -> ColumnElement[bool]:
    """Due for the first time, or abandoned while its job still runs. An abandoned attempt
    may have reached the receiver already, so it is repeated only while the news is current:
    once the job has ended its terminal webhook supersedes it and the sweeper gives it up."""
    return or_(ProgressDelivery.state == PENDING, and_(_abandoned(now), ~_job_ended()))


def claim_due(session: Session, *, limit: int, lease_s: float) -> list[ClaimedProgress]:
    """Take up to `limit` claimable progress deliveries (oldest first) for one attempt each,
    held for `lease_s` seconds on the database's clock (longer than any attempt lasts).

    One claim at a time: rows being claimed elsewhere are skipped (SKIP LOCKED), and Postgres
    checks the condition again on a row another claim just committed, whose lease is live.
    A delivery whose attempt was recorded is never claimed again (no retries after an answer).
    """
    now = db_now(session)
    lease_until = now + timedelta(seconds=lease_s)
    rows = session.scalars(
        select(ProgressDelivery)
        .where(_claimable(now))
        .order_by(ProgressDelivery.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    claimed = []
    for row in rows:
        row.state, row.lease_until = SENDING, lease_until
        job = session.get(Job, row.job_id)
        key = session.get(ApiKey, job.api_key_id) if job is not None else None
        if job is None or key is None:
            row.state, row.lease_until = FAILED, None
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
                lease_until,
            )
        )
    session.flush()
    return claimed


def record_attempt(
    session: Session,
    claimed: ClaimedProgress,
    *,
    status_code: int | None,
    error: str | None,
    duration_ms: float,
) -> bool:
    """Record the attempt of a progress delivery: delivered on a 2xx, else failed. False (and
    nothing written) when the claim is no longer this one's: its lease ran out and another
    dispatcher took the delivery over, whose outcome is the one kept."""
    delivered = status_code is not None and 200 <= status_code < 300
    result = session.execute(
        update(ProgressDelivery)
        .where(
            ProgressDelivery.id == claimed.id,
            ProgressDelivery.state == SENDING,
            ProgressDelivery.lease_until == claimed.lease_until,
        )
        .values(
            state=DELIVERED if delivered else FAILED,
            status_code=status_code,
            error=error,
            duration_ms=duration_ms,
            attempted_at=func.now(),
            lease_until=None,
        )
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0) == 1


def deliveries_for_job(session: Session, job_id: int) -> Sequence[ProgressDelivery]:
    """The job's progress deliveries, oldest first."""
    query = select(ProgressDelivery).where(ProgressDelivery.job_id == job_id)
    return session.scalars(query.order_by(ProgressDelivery.id)).all()


def drop_unsent_of_ended(session: Session) -> int:
    """Mark failed the progress deliveries of ended jobs that are still due or whose claim was
    abandoned (its dispatcher died mid-attempt): news of a running job is worthless once its
    terminal webhook is on its way. A live claim is left to finish its attempt."""
    result = session.execute(
        update(ProgressDelivery)
        .where(
            or_(ProgressDelivery.state == PENDING, _abandoned(DbNow())),
            _job_ended(),
        )
        .values(state=FAILED, error="job ended before it was sent", lease_until=None)
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)
