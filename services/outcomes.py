"""A job's terminal transition and its webhook, in one transaction (the webhook outbox).

Used by the GPU worker when a job ends, by the sweeper when a job runs out of attempts and by
the API when a queued job is canceled, so every path creates the delivery row the same way,
and only the caller that won the transition does. The worker passes its claim's `attempt`
(the fencing token, see db.repositories.jobs): a run whose claim was superseded wins nothing.
"""

from __future__ import annotations

import json

from sqlalchemy.orm import Session

from darkroom import metrics
from darkroom.metrics import FailureReason
from darkroom.settings import Settings
from db.models import Job
from db.repositories import jobs, webhooks
from services.links import OutputLinks
from services.responses import webhook_body

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


def queue_webhook(session: Session, job: Job, settings: Settings) -> int | None:
    """Freeze the job's webhook payload as a pending delivery; its id, or None without webhook."""
    if not job.webhook_url:
        return None
    existing = webhooks.get_delivery_for_job(session, job.id)
    if existing is not None:  # one delivery per job, whatever happens (its id never changes)
        return existing.id
    session.refresh(job)
    links = OutputLinks.from_settings(settings)
    body = webhook_body(job, links, links.storage.read)
    payload = json.dumps(body, separators=(",", ":"))
    delivery = webhooks.create_delivery(
        session, job_id=job.id, url=job.webhook_url, payload=payload
    )
    return delivery.id


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
    return queue_webhook(session, job, settings) if won else None


def fail(
    session: Session,
    settings: Settings,
    job: Job,
    message: str,
    *,
    attempt: int | None = None,
    reason: FailureReason | None = None,
) -> int | None:
    """Record failure with a client-safe message and queue its webhook; counted under `reason`
    (by default, the reason the message implies). With `attempt`, only while the claim that
    wrote it holds the job."""
    won = jobs.fail_job(session, job.id, message, attempt=attempt)
    if won:
        metrics.record_job_end(session, job, failure=message, reason=reason)
        jobs.notify_job_done(session, job.id)
    return queue_webhook(session, job, settings) if won else None
