"""The sweeper: what makes Postgres, not the broker, the source of truth.

Every few seconds it (1) hands back jobs whose worker stopped renewing its lease, failing
those out of attempts, (2) publishes job ids that were committed but never reached the broker,
(3) publishes webhook deliveries whose retry time has come, and (4) deletes the files of
temporary outputs that have expired. Publishing twice is harmless:
workers and the dispatcher claim rows with conditional updates.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

from celery import Celery

from darkroom import outcomes
from darkroom.outcomes import exhausted_message
from darkroom.queue import DELIVER_WEBHOOK_TASK, RUN_JOB_TASK, send
from darkroom.settings import Settings
from darkroom.storage import make_storage
from db.models import utcnow
from db.repositories import jobs, webhooks
from db.session import session_scope

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepReport:
    """What one sweep did, for logs and tests."""

    requeued_jobs: int = 0
    failed_jobs: int = 0
    enqueued_jobs: int = 0
    sent_deliveries: int = 0
    expired_outputs: int = 0


def sweep_once(settings: Settings, broker: Celery) -> SweepReport:
    """One pass over leases, the job outbox and due webhooks."""
    requeued, failed = _recover_orphans(settings, broker)
    return SweepReport(
        requeued_jobs=requeued,
        failed_jobs=failed,
        enqueued_jobs=_drain_job_outbox(settings, broker),
        sent_deliveries=_send_due_deliveries(settings, broker),
        expired_outputs=expire_temporary_outputs(settings),
    )


def _recover_orphans(settings: Settings, broker: Celery) -> tuple[int, int]:
    """Jobs whose lease expired: back to the queue, or failed when out of attempts."""
    requeued, failed, deliveries = 0, 0, []
    with session_scope(settings.resolved_database_url) as session:
        for job in jobs.jobs_with_expired_lease(session):
            if job.attempts >= settings.job_max_attempts:
                delivery_id = outcomes.fail(session, settings, job, exhausted_message(job.attempts))
                failed += 1
                deliveries.append(delivery_id)
            elif jobs.requeue_job(session, job.id):
                requeued += 1
    for delivery_id in deliveries:
        if delivery_id is not None:
            send(broker, DELIVER_WEBHOOK_TASK, delivery_id)
    return requeued, failed


def _drain_job_outbox(settings: Settings, broker: Celery) -> int:
    """Publish queued jobs that never reached the broker, or whose message may be lost."""
    now = utcnow()
    with session_scope(settings.resolved_database_url) as session:
        pending = jobs.jobs_to_publish(
            session,
            created_before=now - timedelta(seconds=settings.outbox_grace_s),
            republish_before=now - timedelta(seconds=settings.republish_after_s),
        )
    sent = 0
    for job_id in pending:
        if not send(broker, RUN_JOB_TASK, job_id):
            break  # broker still down: try again next sweep
        with session_scope(settings.resolved_database_url) as session:
            jobs.mark_enqueued(session, job_id)
        sent += 1
    return sent


def _send_due_deliveries(settings: Settings, broker: Celery) -> int:
    """Publish webhook deliveries whose next attempt is due."""
    republish_before = utcnow() - timedelta(seconds=settings.republish_after_s)
    with session_scope(settings.resolved_database_url) as session:
        due = webhooks.due_delivery_ids(session, republish_before=republish_before)
    sent = 0
    for delivery_id in due:
        if not send(broker, DELIVER_WEBHOOK_TASK, delivery_id):
            break
        with session_scope(settings.resolved_database_url) as session:
            webhooks.mark_published(session, delivery_id)
        sent += 1
    return sent


def expire_temporary_outputs(settings: Settings) -> int:
    """Delete the files of `temp: yes` outputs whose 24 hours are over."""
    storage = make_storage(settings)
    with session_scope(settings.resolved_database_url) as session:
        expired = jobs.expired_outputs(session)
        for output in expired:
            storage.delete(output.filename)
            output.deleted_at = utcnow()
    return len(expired)


def run_sweeper(settings: Settings, broker: Celery, stop: threading.Event) -> None:
    """Sweep every `sweep_interval_s` until `stop` is set; a failing sweep is logged and retried."""
    while not stop.wait(settings.sweep_interval_s):
        try:
            report = sweep_once(settings, broker)
        except Exception:
            log.exception("sweep failed; retrying next interval")
            continue
        if report != SweepReport():
            log.info("sweep: %s", report)
