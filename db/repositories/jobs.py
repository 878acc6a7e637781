"""Every query on jobs and their outputs. Functions flush; the caller owns the commit.

State changes are conditional UPDATEs (compare-and-set on `state` and `lease_until`), so two
workers that receive the same job id cannot both run it, and a job reaches a terminal state once.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from db.models import TERMINAL_STATES, Job, JobOutput, JobState, Operation, utcnow


@dataclass(frozen=True)
class NewJob:
    """What the API tier stores for an accepted request."""

    api_key_id: int
    operation: Operation
    endpoint: str
    params: dict[str, Any]
    meta: dict[str, Any]
    track_id: str | None
    webhook_url: str | None
    batch_key: str | None = None


@dataclass(frozen=True)
class OutputRecord:
    """One written output file, to be recorded with the job's success."""

    index: int
    filename: str
    width: int
    height: int
    seed: int
    nsfw: bool = False
    expires_at: datetime | None = None


class ClaimOutcome(enum.StrEnum):
    """Why a worker may or may not run a job it received."""

    CLAIMED = "claimed"
    BUSY = "busy"  # another worker holds a live lease on it
    TERMINAL = "terminal"  # already success or failed: a duplicate delivery
    EXHAUSTED = "exhausted"  # out of attempts: the caller fails it
    MISSING = "missing"


def create_job(session: Session, new: NewJob) -> Job:
    """Insert a queued job with an unguessable file prefix."""
    job = Job(
        api_key_id=new.api_key_id,
        operation=new.operation,
        endpoint=new.endpoint,
        params=new.params,
        meta=new.meta,
        track_id=new.track_id,
        webhook_url=new.webhook_url,
        batch_key=new.batch_key,
        file_prefix=secrets.token_hex(16),
    )
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, job_id: int) -> Job | None:
    """A job by id, whoever owns it (workers only)."""
    return session.get(Job, job_id)


#: Job ids are a 32-bit serial on Postgres; a larger id cannot exist (and would not bind).
MAX_JOB_ID = 2**31 - 1


def get_job_for_key(session: Session, job_id: int, api_key_id: int) -> Job | None:
    """A job by id if `api_key_id` owns it; another key's job looks exactly like a missing one."""
    if not 1 <= job_id <= MAX_JOB_ID:
        return None
    return session.scalar(select(Job).where(Job.id == job_id, Job.api_key_id == api_key_id))


def mark_enqueued(session: Session, job_id: int) -> None:
    """Record that the job's id reached the broker (the outbox is drained for it)."""
    session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow()))


def claim_job(
    session: Session, job_id: int, *, lease_s: float, max_attempts: int
) -> tuple[ClaimOutcome, Job | None]:
    """Take a job: queued, or processing with an expired lease, and with attempts left."""
    now = utcnow()
    claimable = or_(
        Job.state == JobState.QUEUED,
        and_(Job.state == JobState.PROCESSING, Job.lease_until < now),
    )
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, claimable, Job.attempts < max_attempts)
        .values(
            state=JobState.PROCESSING,
            attempts=Job.attempts + 1,
            started_at=now,
            lease_until=now + timedelta(seconds=lease_s),
            progress=0.0,
        )
        .execution_options(synchronize_session=False)
    )
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        return ClaimOutcome.MISSING, None
    if _rowcount(result) == 1:
        return ClaimOutcome.CLAIMED, job
    if job.state in TERMINAL_STATES:
        return ClaimOutcome.TERMINAL, job
    if job.lease_until is not None and job.lease_until >= now and job.state == JobState.PROCESSING:
        return ClaimOutcome.BUSY, job
    return ClaimOutcome.EXHAUSTED, job


def extend_lease(session: Session, job_id: int, lease_s: float) -> bool:
    """Heartbeat: push the lease forward while the job still runs here. False if it was lost."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.PROCESSING)
        .values(lease_until=utcnow() + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result) == 1


def complete_job(
    session: Session,
    job_id: int,
    *,
    outputs: list[OutputRecord],
    meta: dict[str, Any],
    generation_time: float,
) -> bool:
    """Move a processing job to success with its outputs. False if it was already terminal."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.PROCESSING)
        .values(
            state=JobState.SUCCESS,
            meta=meta,
            generation_time=generation_time,
            finished_at=utcnow(),
            lease_until=None,
        )
        .execution_options(synchronize_session=False)
    )
    if _rowcount(result) != 1:
        return False
    session.add_all(
        JobOutput(
            job_id=job_id,
            index=out.index,
            filename=out.filename,
            width=out.width,
            height=out.height,
            seed=out.seed,
            nsfw=out.nsfw,
            expires_at=out.expires_at,
        )
        for out in outputs
    )
    session.flush()
    return True


def fail_job(session: Session, job_id: int, message: str) -> bool:
    """Move a non-terminal job to failed with a client-safe message. False if already terminal."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_([JobState.QUEUED, JobState.PROCESSING]))
        .values(state=JobState.FAILED, error=message, finished_at=utcnow(), lease_until=None)
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result) == 1


def jobs_to_publish(
    session: Session, *, created_before: datetime, republish_before: datetime, limit: int = 100
) -> list[int]:
    """Queued jobs whose id must (again) go to the broker.

    Those never published (the API crashed after commit, or the broker was down), once past a
    grace period that lets the API publish them itself; and those published long ago that are
    still queued, whose message the broker may have lost (a Redis restart without persistence).
    """
    never = and_(Job.enqueued_at.is_(None), Job.created_at < created_before)
    stale = Job.enqueued_at < republish_before
    rows = session.scalars(
        select(Job.id)
        .where(Job.state == JobState.QUEUED, or_(never, stale))
        .order_by(Job.id)
        .limit(limit)
    )
    return list(rows)


def jobs_with_expired_lease(session: Session, *, limit: int = 100) -> list[Job]:
    """Processing jobs whose worker stopped renewing the lease (it crashed or vanished)."""
    rows = session.scalars(
        select(Job)
        .where(Job.state == JobState.PROCESSING, Job.lease_until < utcnow())
        .order_by(Job.id)
        .limit(limit)
    )
    return list(rows)


def requeue_job(session: Session, job_id: int) -> bool:
    """Hand an orphaned processing job back to the queue (the sweeper re-sends its id)."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.PROCESSING, Job.lease_until < utcnow())
        .values(state=JobState.QUEUED, enqueued_at=None, lease_until=None)
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result) == 1


def active_jobs_of_key(session: Session, api_key_id: int) -> int:
    """Jobs of a key that are queued or running."""
    active = Job.state.in_([JobState.QUEUED, JobState.PROCESSING])
    count = session.scalar(select(func.count(Job.id)).where(Job.api_key_id == api_key_id, active))
    return int(count or 0)


def jobs_of_key_since(session: Session, api_key_id: int, since: datetime) -> int:
    """Jobs a key submitted since `since` (its request rate)."""
    window = and_(Job.api_key_id == api_key_id, Job.created_at >= since)
    return int(session.scalar(select(func.count(Job.id)).where(window)) or 0)


def queued_jobs(session: Session) -> int:
    """Jobs waiting for a worker, over all keys (the backpressure signal)."""
    count = session.scalar(select(func.count(Job.id)).where(Job.state == JobState.QUEUED))
    return int(count or 0)


def typical_generation_time(session: Session, operation: Operation) -> float | None:
    """The mean pipeline time of the last successful jobs of `operation`, for `eta`."""
    recent = (
        select(Job.generation_time)
        .where(Job.operation == operation, Job.state == JobState.SUCCESS)
        .order_by(Job.id.desc())
        .limit(20)
        .subquery()
    )
    value = session.scalar(select(func.avg(recent.c.generation_time)))
    return float(value) if value is not None else None


def get_output(session: Session, filename: str) -> JobOutput | None:
    """An output by its file name."""
    return session.scalar(select(JobOutput).where(JobOutput.filename == filename))


def expired_outputs(session: Session, *, limit: int = 200) -> list[JobOutput]:
    """Temporary outputs past their expiry whose file has not been deleted yet."""
    rows = session.scalars(
        select(JobOutput)
        .where(JobOutput.expires_at < utcnow(), JobOutput.deleted_at.is_(None))
        .order_by(JobOutput.expires_at)
        .limit(limit)
    )
    return list(rows)


def _rowcount(result: Any) -> int:
    """Rows matched by an UPDATE (typed accessor: Result.rowcount is untyped in stubs)."""
    return int(result.rowcount)


def request_cancel(session: Session, job_id: int) -> None:
    """Ask a running job's worker to stop at its next denoising step."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.PROCESSING)
        .values(cancel_requested_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def cancel_requested(session: Session, job_id: int) -> bool:
    """Whether someone asked job `job_id` to stop."""
    value = session.scalar(select(Job.cancel_requested_at).where(Job.id == job_id))
    return value is not None


def record_progress(session: Session, job_ids: list[int], progress: float) -> None:
    """Store the denoising progress (0..1) of running jobs (several when they run as a batch)."""
    session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.state == JobState.PROCESSING)
        .values(progress=progress)
        .execution_options(synchronize_session=False)
    )


def any_cancel_requested(session: Session, job_ids: list[int]) -> list[int]:
    """Those of `job_ids` whose cancel was requested."""
    rows = session.scalars(
        select(Job.id).where(Job.id.in_(job_ids), Job.cancel_requested_at.is_not(None))
    )
    return list(rows)
