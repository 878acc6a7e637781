"""A job's terminal transition and its webhook, in one transaction: the one home of finishing.

Used by the GPU worker when a job ends, by the sweeper when a job runs out of attempts and by
a cancel (`services.jobs.cancel`), so every path creates the delivery row the same way
(`services.webhooks.schedule`) and only the caller that won the transition does; the caller
publishes the delivery through the outbox (`services.webhooks.publish`). A failure carries its
`FailureReason`, which metrics count. The worker passes its claim's `attempt`
(the fencing token, see db.repositories.jobs): a run whose claim was superseded wins nothing.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from darkroom.identities import FailureReason
from darkroom.settings import Settings
from db.models import Job
from db.repositories import jobs
from services import metrics, webhooks

CANCELED_MESSAGE = "The job was canceled."


def storage_failed_message(reason: str) -> str:
    """Why a job whose images were generated failed: they could not be stored. `reason` is
    StorageError.reason (client-safe)."""
    return f"The images were generated but could not be stored: {reason}."


def exhausted_message(attempts: int) -> str:
    """Why a poison job failed: every attempt ended with its worker gone."""
    return (
        f"The job failed after {attempts} attempts: the worker stopped while running it each time."
    )


def succeed(
    session: Session,
    settings: Settings,
    job: Job,
    *,
    outputs: list[jobs.OutputRecord],
    meta: dict[str, object],
    generation_time: float,
    attempt: int | None = None,
) -> int | None:
    """Record success and queue its webhook; the delivery id, or None (no webhook, or lost race).
    With `attempt`, only while the claim that wrote it holds the job."""
    won = jobs.complete_job(
        session,
        job.id,
        outputs=outputs,
        meta=dict(meta),
        generation_time=generation_time,
        attempt=attempt,
    )
    if won:
        metrics.record_job_end(session, job, generation_time=generation_time)
        jobs.notify_job_done(session, job.id)  # wakes sync waits once this commits
    return webhooks.schedule(session, settings, job) if won else None


def fail(
    session: Session,
    settings: Settings,
    job: Job,
    message: str,
    *,
    reason: FailureReason,
    attempt: int | None = None,
) -> int | None:
    """Record failure with a client-safe message and queue its webhook; metrics count it under
    `reason`. With `attempt`, only while the claim that wrote it holds the job."""
    won = jobs.fail_job(session, job.id, message, attempt=attempt)
    if won:
        metrics.record_job_end(session, job, failure=reason)
        jobs.notify_job_done(session, job.id)
    return webhooks.schedule(session, settings, job) if won else None
