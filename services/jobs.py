"""Jobs: publish, cancel and requeue, one home each for the API, the CLI, the server-management
endpoints and the sweeper.

Plain functions over a session: the caller (a route, a command, a task) owns the transaction and
commits; these flush. What must reach the broker is asked of the outbox (`services.outbox`), so
it is sent once the caller commits, to the queue model-affinity routing picks.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from celery import Celery
from sqlalchemy.orm import Session

from darkroom.identities import FailureReason, Operation
from darkroom.settings import Settings
from db.clock import db_now
from db.models import TERMINAL_STATES, Job, JobRequeue, JobState
from db.repositories import jobs, operator
from services import job_views, outbox, outcomes, webhooks
from services.outbox import JobMessage, Receipt


class RefusedError(Exception):
    """A cancel or requeue that cannot be carried out; the message says why."""


class JobNotFoundError(RefusedError):
    """No such job (or, asked with a key, not that key's job)."""


class JobFinishedError(RefusedError):
    """The job has already ended: it cannot be canceled."""


class JobRunningError(RefusedError):
    """The job is running, and the caller asked to cancel queued jobs only."""


@dataclass(frozen=True)
class Canceled:
    """A cancel's outcome: the job's state afterwards and its failure webhook's delivery id."""

    state: JobState
    delivery_id: int | None


def publish(
    session: Session,
    broker: Celery,
    settings: Settings,
    job_id: int,
    operation: Operation,
    model_id: str | None,
    *,
    queue: str | None = None,
) -> Receipt:
    """Send job `job_id`'s id once the caller commits, to the queue model-affinity routing picks
    for its operation and model (or to `queue`: the sweeper's rescue to the general queue); the
    row is marked published once sent (`services.outbox`)."""
    message = JobMessage(job_id, operation, model_id, queue)
    return outbox.publish_job(session, broker, settings, message)


def cancel(
    session: Session,
    broker: Celery,
    settings: Settings,
    job_id: int,
    *,
    key_id: int | None = None,
    message: str = outcomes.CANCELED_MESSAGE,
    queued_only: bool = False,
) -> Canceled:
    """Cancel job `job_id` (with `key_id`: only that key's job), its row locked: a queued job
    fails at once and its webhook is sent once the caller commits; a running one is asked to
    stop at its next step. With `queued_only` (clearing a queue) a running job is refused."""
    job = operator.lock_job(session, job_id)
    if job is None or (key_id is not None and job.api_key_id != key_id):
        raise JobNotFoundError(f"no job {job_id}")
    if job.state in TERMINAL_STATES:
        raise JobFinishedError(f"job {job_id} has already finished ({job.state}): not canceled")
    if queued_only and job.state != JobState.QUEUED:
        raise JobRunningError(f"job {job_id} is running: not canceled")
    delivery_id = None
    if job.state == JobState.QUEUED:
        delivery_id = outcomes.fail(session, settings, job, message, reason=FailureReason.CANCELED)
        webhooks.publish(session, broker, settings, delivery_id)
    jobs.request_cancel(session, job_id)
    jobs.refresh_job(session, job)
    return Canceled(job.state, delivery_id)


def requeue(
    session: Session,
    broker: Celery,
    settings: Settings,
    job_id: int,
    *,
    force: bool = False,
    reason: str | None = None,
) -> tuple[JobRequeue, Receipt]:
    """Requeue job `job_id`: attempts start again from 0, its webhook delivery moves into the
    returned requeue record (so that its next outcome gets a new webhook of its own), and its id
    is published once the caller commits (the receipt says whether it reached the broker).

    Leases are read on the database's clock, as workers and dispatchers write them: an operator's
    host whose clock runs ahead must not see a live worker's lease as expired."""
    job = operator.lock_job(session, job_id)
    if job is None:
        raise JobNotFoundError(f"no job {job_id}")
    now = db_now(session)
    _check_requeueable(job, force, now)
    delivery = operator.lock_delivery(session, job_id)
    sending = delivery is not None and delivery.lease_until and delivery.lease_until > now
    if sending:  # the dispatcher holds it for one attempt: a short wait
        raise RefusedError(f"job {job_id}'s webhook is being sent right now: try again")
    superseded = job_views.superseded_webhook(delivery)
    record = operator.supersede_run(session, job, delivery, reason, previous_webhook=superseded)
    if not operator.reset_to_queued(session, job_id, record.previous_state):
        raise RefusedError(f"job {job_id} changed state meanwhile: try again")
    model_id = job.params.get("model_id")
    return record, publish(session, broker, settings, job.id, job.operation, model_id)


def _check_requeueable(job: Job, force: bool, now: datetime) -> None:
    """Only failed jobs, and processing ones whose worker is gone or (with force) stuck."""
    if job.state == JobState.SUCCESS:
        raise RefusedError(f"job {job.id} succeeded: only failed or stuck jobs can be requeued")
    if job.state == JobState.QUEUED:
        raise RefusedError(f"job {job.id} is already queued")
    live = job.lease_until is not None and job.lease_until >= now
    if job.state == JobState.PROCESSING and live and not force:
        raise RefusedError(
            f"job {job.id} is running and its worker renews its lease (until "
            f"{job.lease_until:%H:%M:%S}): pass --force if that worker is stuck"
        )
