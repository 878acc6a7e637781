"""A job's terminal transition and its webhook, in one transaction (the webhook outbox).

Used by the GPU worker when a job ends, by the sweeper when a job runs out of attempts and by
the API when a queued job is canceled, so every path creates the delivery row the same way,
and only the caller that won the transition does.
"""

from __future__ import annotations

import json

from sqlalchemy.orm import Session

from darkroom import metrics
from darkroom.links import OutputLinks
from darkroom.responses import webhook_body
from darkroom.settings import Settings
from db.models import Job
from db.repositories import jobs, webhooks

CANCELED_MESSAGE = "The job was canceled."


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
) -> int | None:
    """Record success and queue its webhook; the delivery id, or None (no webhook, or lost race)."""
    won = jobs.complete_job(
        session, job.id, outputs=outputs, meta=dict(meta), generation_time=generation_time
    )
    if won:
        metrics.record_job_end(session, job, generation_time=generation_time)
        jobs.notify_job_done(session, job.id)  # wakes sync waits once this commits
    return queue_webhook(session, job, settings) if won else None


def fail(session: Session, settings: Settings, job: Job, message: str) -> int | None:
    """Record failure with a client-safe message and queue its webhook."""
    won = jobs.fail_job(session, job.id, message)
    if won:
        metrics.record_job_end(session, job, failure=message)
        jobs.notify_job_done(session, job.id)
    return queue_webhook(session, job, settings) if won else None
