"""The sweeper: what makes Postgres, not the broker, the source of truth.

Every few seconds it (1) hands back jobs whose worker stopped renewing its lease, failing
those out of attempts, and deletes the images that dead run wrote but never recorded, (2)
publishes job ids that were committed but never reached the broker, or whose message the
broker lost, to the queue model-affinity routing picks now, (3) moves jobs
out of model queues that no live worker consumes to the general queue, (4) publishes webhook
deliveries whose retry time has come or whose message was lost (not beside the dispatcher's
loop, which reads the due rows itself and drops the messages), and (5) deletes the files of
temporary outputs and uploads (base64_to_url) that have expired (hourly, it also gives upload
files with no row their expiry, and removes half-done writes). Publishing twice is harmless:
workers and the dispatcher claim rows with conditional updates.

Lost messages are found by comparison, on every sweep: the ids the broker holds (its queues and
kombu's unacked hash, `darkroom.queue.held_ids`) against the rows waiting in the database. A
row published longer ago than `lost_message_grace_s` whose id the broker does not hold is sent
again, so a broker that restarts empty is refilled within seconds. Every age is measured on the
database's clock (`db.clock`), never this host's.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import redis
from celery import Celery
from sqlalchemy.orm import Session

from darkroom.identities import FailureReason
from darkroom.queue import DELIVER_WEBHOOK_TASK, RUN_JOB_TASK, HeldIds, held_ids
from darkroom.settings import Settings
from darkroom.storage import make_storage
from db.clock import db_now
from db.models import utcnow
from db.repositories import idempotency, jobs, progress, routing, uploads, webhooks
from db.session import session_scope
from services import jobs as job_service
from services import outcomes, server
from services import webhooks as webhook_service
from services.outbox import Receipt
from services.outcomes import exhausted_message
from services.routing import model_queue_prefix, routing_enabled, unconsumed
from worker.dead_runs import delete_unrecorded_files

log = logging.getLogger(__name__)

#: How long the sweeper waits for the broker to list a queue's messages.
BROKER_PROBE_TIMEOUT_S = 2.0
#: Waiting jobs compared with the broker per sweep at most (oldest first).
LOST_SCAN_LIMIT = 10_000
#: Age after which a temporary output file is a crashed write's leftover, and how often to look.
PARTIAL_WRITE_MAX_AGE_S = 3600.0


@dataclass(frozen=True)
class SweepReport:
    """What one sweep did, for logs and tests."""

    requeued_jobs: int = 0
    failed_jobs: int = 0
    enqueued_jobs: int = 0
    sent_deliveries: int = 0
    expired_outputs: int = 0
    rescued_jobs: int = 0
    expired_idempotency_keys: int = 0
    pruned_progress: int = 0
    expired_uploads: int = 0


def sweep_once(settings: Settings, broker: Celery, *, deliveries: bool = True) -> SweepReport:
    """One pass over leases, the job outbox and, unless `deliveries` is False, due webhooks.

    The dispatcher's loop (`worker.webhooks.loop`) claims due deliveries from their rows and
    drops the queue's messages, so beside it every delivery waiting longer than
    `lost_message_grace_s` looked lost: a backlog was published again on every sweep.
    """
    requeued, failed = _recover_orphans(settings, broker)
    return SweepReport(
        requeued_jobs=requeued,
        failed_jobs=failed,
        enqueued_jobs=_drain_job_outbox(settings, broker),
        rescued_jobs=_rescue_stranded(settings, broker),
        sent_deliveries=_send_due_deliveries(settings, broker) if deliveries else 0,
        expired_outputs=expire_temporary_outputs(settings),
        expired_idempotency_keys=expire_idempotency_keys(settings),
        pruned_progress=prune_progress(settings),
        expired_uploads=expire_uploads(settings),
    )


def _recover_orphans(settings: Settings, broker: Celery) -> tuple[int, int]:
    """Jobs whose lease expired: back to the queue, or failed when out of attempts. The
    images their dead runs wrote but never recorded are deleted once that is committed."""
    requeued, failed = 0, 0
    dead_runs: list[tuple[str, int]] = []
    with session_scope(settings.resolved_database_url) as session:
        for job in jobs.jobs_with_expired_lease(session):
            if job.attempts >= settings.job_max_attempts:
                message = exhausted_message(job.attempts)
                reason = FailureReason.WORKER_LOST
                delivery_id = outcomes.fail(session, settings, job, message, reason=reason)
                webhook_service.publish(session, broker, settings, delivery_id)
                failed += 1
            elif jobs.requeue_job(session, job.id):
                requeued += 1
            else:
                continue
            dead_runs.append((job.file_prefix, job.attempts))
    if dead_runs:
        storage = make_storage(settings)
        for file_prefix, attempt in dead_runs:
            delete_unrecorded_files(settings, storage, file_prefix, attempt)
    return requeued, failed


def _drain_job_outbox(settings: Settings, broker: Celery) -> int:
    """Publish queued jobs that never reached the broker, or whose message was lost."""
    lost = _lost_jobs(settings)
    with session_scope(settings.resolved_database_url) as session:
        created_before = db_now(session) - timedelta(seconds=settings.outbox_grace_s)
        pending = jobs.never_published(session, created_before=created_before) + lost
        models = routing.requested_models(session, pending)
        receipts = [
            job_service.publish(session, broker, settings, job_id, *models[job_id])
            for job_id in pending
        ]
    return _sent(receipts)  # a broker still down stops the batch: the rest wait a sweep


def _sent(receipts: list[Receipt]) -> int:
    """How many of the messages the outbox sent after the commit reached the broker."""
    return sum(1 for receipt in receipts if receipt.sent)


def _lost_jobs(settings: Settings) -> list[int]:
    """Queued jobs whose message the broker no longer holds: exactly those, not a whole backlog.

    The broker is read before the jobs: a job published after that read is younger than the
    grace (on the database's clock), and a job a worker took meanwhile was waiting when read.
    A message a consumer took and never acknowledged counts as held for `republish_after_s`.
    """
    with session_scope(settings.resolved_database_url) as session:
        queues = set(jobs.published_queued_counts(session, settings.job_queue))
    held = _held(settings, RUN_JOB_TASK, queues) if queues else None
    if held is None:
        return []
    with session_scope(settings.resolved_database_url) as session:
        now = db_now(session)
        waiting = _published_jobs(session, settings, now, settings.lost_message_grace_s)
        if any(not held.knows(queue, job_id) for job_id, queue in waiting):
            held = _look_again(settings, RUN_JOB_TASK, queues, held)
        missing = [(job_id, queue) for job_id, queue in waiting if not held.holds(queue, job_id)]
        taken = {job_id for job_id, queue in missing if held.delivered(queue, job_id)}
        old = _published_jobs(session, settings, now, settings.republish_after_s) if taken else []
    stale = {job_id for job_id, _ in old}
    return [job_id for job_id, _ in missing if job_id not in taken or job_id in stale]


def _published_jobs(
    session: Session, settings: Settings, now: datetime, seconds: float
) -> list[tuple[int, str]]:
    """(id, queue) of queued jobs published more than `seconds` before `now`, oldest first."""
    before = now - timedelta(seconds=seconds)
    rows = jobs.long_queued(session, published_before=before, limit=LOST_SCAN_LIMIT)
    return [(job_id, queue or settings.job_queue) for job_id, queue in rows]


def _look_again(settings: Settings, task_name: str, queues: set[str], held: HeldIds) -> HeldIds:
    """`held` with what a second look at the broker sees. One look can miss a message that is
    being handed to a consumer: kombu's Redis transport pops it from its queue (BRPOP) before
    it adds it to the unacked hash, and such a message would be published again for nothing.
    A message that is really lost is missing from both looks."""
    again = _held(settings, task_name, queues)
    return held if again is None else held.with_(again)


def _held(settings: Settings, task_name: str, queues: set[str]) -> HeldIds | None:
    """What the broker holds of `queues`; None (logged) when it cannot answer."""
    try:
        return held_ids(settings, task_name, queues, timeout_s=BROKER_PROBE_TIMEOUT_S)
    except Exception:
        log.warning("broker unreachable: cannot tell lost messages yet")
        return None


def _rescue_stranded(settings: Settings, broker: Celery) -> int:
    """Publish to the general queue the jobs stranded in model queues (see `_stranded_jobs`)."""
    stranded = _stranded_jobs(settings)
    if not stranded:
        return 0
    with session_scope(settings.resolved_database_url) as session:
        models = routing.requested_models(session, stranded)
        receipts = [
            job_service.publish(
                session, broker, settings, job_id, *models[job_id], queue=settings.job_queue
            )
            for job_id in stranded
        ]
    return _sent(receipts)


def _stranded_jobs(settings: Settings) -> list[int]:
    """Queued jobs that waited `affinity_stranded_after_s` in a model queue that no live worker
    advertises (its holder died or evicted the model); none when Redis cannot tell."""
    if not routing_enabled(settings):
        return []
    with session_scope(settings.resolved_database_url) as session:
        # The wait keeps a job routed a moment before its holder's renewal from moving needlessly.
        waited = db_now(session) - timedelta(seconds=settings.affinity_stranded_after_s)
        waiting = routing.jobs_in_model_queues(
            session, model_queue_prefix(settings), enqueued_before=waited
        )
    if not waiting:
        return []
    try:
        stranded = unconsumed(settings, (queue for _job_id, queue in waiting))
    except redis.RedisError:
        log.warning("cannot tell which model queues are consumed; stranded jobs wait a sweep")
        return []
    return [job_id for job_id, queue in waiting if queue in stranded]


def _send_due_deliveries(settings: Settings, broker: Celery) -> int:
    """Publish webhook deliveries whose next attempt is due and whose message is not in the
    broker: never published (a retry fell due), or published and lost."""
    due = _due_deliveries(settings)
    if not due:
        return 0
    with session_scope(settings.resolved_database_url) as session:
        receipts = [
            webhook_service.publish(session, broker, settings, delivery_id, mark=True)
            for delivery_id in due
        ]
    return _sent([receipt for receipt in receipts if receipt is not None])


def _due_deliveries(settings: Settings) -> list[int]:
    """Due deliveries held by nobody (no live lease) that the broker does not hold either; the
    broker is read first, as for jobs (`_lost_jobs`)."""
    queue = settings.webhook_queue
    held = _held(settings, DELIVER_WEBHOOK_TASK, {queue})
    with session_scope(settings.resolved_database_url) as session:
        now = db_now(session)
        published_before = now - timedelta(seconds=settings.lost_message_grace_s)
        due = webhooks.due_deliveries(session, published_before, limit=LOST_SCAN_LIMIT)
    stale = now - timedelta(seconds=settings.republish_after_s)
    if held is None:  # the broker cannot answer: send only what was never sent (it may work)
        return [delivery_id for delivery_id, published_at in due if published_at is None]
    if any(
        published_at is not None and not held.knows(queue, delivery_id)
        for delivery_id, published_at in due
    ):
        held = _look_again(settings, DELIVER_WEBHOOK_TASK, {queue}, held)
    lost = [
        delivery_id
        for delivery_id, published_at in due
        if published_at is not None
        and not held.holds(queue, delivery_id)
        and (not held.delivered(queue, delivery_id) or published_at < stale)
    ]
    return [delivery_id for delivery_id, published_at in due if published_at is None] + lost


def expire_temporary_outputs(settings: Settings) -> int:
    """Delete the files of `temp: yes` outputs whose 24 hours are over."""
    storage = make_storage(settings)
    with session_scope(settings.resolved_database_url) as session:
        expired = jobs.expired_outputs(session)
        for output in expired:
            storage.delete(output.filename)
        jobs.mark_outputs_deleted(session, expired)
    return len(expired)


def expire_uploads(settings: Settings) -> int:
    """Delete the files of base64_to_url uploads whose 24 hours are over (as temp outputs)."""
    storage = make_storage(settings)
    with session_scope(settings.resolved_database_url) as session:
        expired = uploads.expired_uploads(session)
        for upload in expired:
            storage.delete(upload.filename)
        uploads.mark_uploads_deleted(session, expired)
    return len(expired)


def expire_idempotency_keys(settings: Settings) -> int:
    """Forget `Idempotency-Key`s older than their 24 hours, a bounded number per sweep."""
    with session_scope(settings.resolved_database_url) as session:
        return idempotency.delete_expired(session)


def prune_progress(settings: Settings) -> int:
    """Drop the previews of jobs no longer running, and give up the progress webhooks still
    due for ended jobs (services/progress_events.py): both stay bounded by the running jobs."""
    with session_scope(settings.resolved_database_url) as session:
        return progress.delete_ended_previews(session) + progress.drop_unsent_of_ended(session)


def remove_partial_writes(settings: Settings) -> int:
    """Delete output files whose write a killed worker left half done (an hour old at least:
    a write takes milliseconds, so none in progress is touched)."""
    return make_storage(settings).remove_partial_writes(PARTIAL_WRITE_MAX_AGE_S)


def adopt_unrecorded_uploads(
    settings: Settings, *, min_age_s: float = PARTIAL_WRITE_MAX_AGE_S
) -> int:
    """Give upload files that have no row the expiry they would have had (see
    `services.server.adopt_unrecorded_uploads`); files younger than `min_age_s` are left, as
    their request may still be committing its row. Lists the uploads (a day's worth)."""
    cutoff = utcnow() - timedelta(seconds=min_age_s)
    files = make_storage(settings).listing(server.UPLOAD_PREFIX)
    with session_scope(settings.resolved_database_url) as session:
        return server.adopt_unrecorded_uploads(session, (f for f in files if f.modified < cutoff))


def run_sweeper(
    settings: Settings, broker: Celery, stop: threading.Event, *, deliveries: bool = True
) -> None:
    """Sweep every `sweep_interval_s` until `stop` is set; a failing sweep is logged and retried.
    Partial writes and unrecorded uploads are looked for at start and hourly: that lists the
    outputs folder (or bucket)."""
    next_partials_check = 0.0
    while not stop.wait(settings.sweep_interval_s):
        try:
            if time.monotonic() >= next_partials_check:
                next_partials_check = time.monotonic() + PARTIAL_WRITE_MAX_AGE_S
                if removed := remove_partial_writes(settings):
                    log.info("removed %d partial output writes", removed)
                if adopted := adopt_unrecorded_uploads(settings):
                    log.info("%d unrecorded uploads now expire as recorded ones", adopted)
            report = sweep_once(settings, broker, deliveries=deliveries)
        except Exception:
            log.exception("sweep failed; retrying next interval")
            continue
        if report != SweepReport():
            log.info("sweep: %s", report)
