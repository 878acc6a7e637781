"""Webhooks: schedule a job's delivery, publish it, replay failed ones; one home each.

A job's delivery is created in the transaction that ends the job (`services.outcomes`), with
its payload frozen, and published through the outbox once that transaction commits. The
dispatcher (worker/webhooks) makes the attempts; the sweeper publishes retries as they fall due.
Functions flush; the caller commits.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session

from darkroom.settings import Settings
from db.models import Job, WebhookDelivery
from db.repositories import jobs, webhooks
from services import outbox
from services.links import OutputLinks
from services.outbox import DeliveryMessage, Receipt
from services.responses import webhook_body


def schedule(session: Session, settings: Settings, job: Job) -> int | None:
    """Freeze the job's webhook payload as a pending delivery; its id, or None without webhook."""
    return schedule_many(session, settings, [job]).get(job.id)


def schedule_many(session: Session, settings: Settings, ended: Sequence[Job]) -> dict[int, int]:
    """`schedule` for ended jobs: job id -> delivery id, for those with a webhook. A job that
    has its delivery keeps it (one delivery per job, whatever happens: its id never changes);
    the others' payloads are frozen from their rows as this transaction sees them, and inserted
    together. A fixed number of statements, whatever the number of jobs."""
    hooked = [job.id for job in ended if job.webhook_url]
    if not hooked:
        return {}
    found = webhooks.deliveries_for_jobs(session, hooked)
    links = OutputLinks.from_settings(settings)
    new = [
        webhooks.JobDelivery(
            job.id,
            job.api_key_id,
            job.webhook_url,
            _frozen(webhook_body(job, links, links.storage.read)),
        )
        for job in jobs.fresh_jobs(session, [job_id for job_id in hooked if job_id not in found])
        if job.webhook_url
    ]
    return found | webhooks.create_job_deliveries(session, new)


def _frozen(body: dict[str, Any]) -> str:
    """The compact JSON of a webhook body: the exact bytes every attempt signs."""
    return json.dumps(body, separators=(",", ":"))


def freeze(
    session: Session,
    url: str,
    body: dict[str, Any],
    *,
    job_id: int | None = None,
    api_key_id: int | None = None,
    model_install_id: int | None = None,
) -> int:
    """Freeze `body` as a pending delivery to `url` (a job's, or a model install's signed with
    `api_key_id`); its id. The compact JSON written here is the exact bytes every attempt signs."""
    delivery = webhooks.create_delivery(
        session,
        job_id=job_id,
        url=url,
        payload=_frozen(body),
        api_key_id=api_key_id,
        model_install_id=model_install_id,
    )
    return delivery.id


def publish(
    session: Session,
    broker: Celery,
    settings: Settings,
    delivery_id: int | None,
    *,
    mark: bool = False,
) -> Receipt | None:
    """Send the delivery's id once the caller commits (None: no webhook, nothing to send).
    `mark`: stamp `enqueued_at` once it is sent, for a row that is not stamped (a replayed
    delivery, a retry the sweeper publishes); `schedule` stamps a new delivery itself."""
    if delivery_id is None:
        return None
    return outbox.deliver_webhook(session, broker, settings, DeliveryMessage(delivery_id, mark))


def replay(
    session: Session, broker: Celery, settings: Settings, delivery_id: int | None
) -> list[WebhookDelivery]:
    """Start failed deliveries again, due now, with the same webhook-id and body, and publish
    them once the caller commits: the one with `delivery_id`, or (None) every failed one."""
    failed = webhooks.failed_deliveries(session, limit=10_000)
    chosen = [delivery for delivery in failed if delivery_id is None or delivery.id == delivery_id]
    for delivery in chosen:
        webhooks.replay(session, delivery)
        publish(session, broker, settings, delivery.id, mark=True)
    return chosen
