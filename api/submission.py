"""Accepting jobs: store them, commit, then publish their ids (the transactional outbox).

Rows are committed before their ids reach the broker, so a worker never receives an id it
cannot read. If publishing fails a row keeps `enqueued_at` empty and the sweeper sends it
later: an accepted job is never lost. Submissions are stored in groups (`api.intake`): one
admission read, one multi-row insert and one commit serve every submission of a group. Each id
goes to the queue model-affinity routing picks (`darkroom.affinity`), recorded in `queue_name`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from celery import Celery
from sqlalchemy.orm import Session

from api.errors import ApiError
from api.limits import Admission
from darkroom.affinity import publish_job
from darkroom.jobspec import JobSpec, batch_key, describe
from darkroom.settings import Settings
from db.models import Job, Operation
from db.repositories import jobs, routing
from db.repositories.jobs import NewJob
from db.session import session_scope

log = logging.getLogger(__name__)

#: The eta quoted before any job of an operation has finished, in seconds.
DEFAULT_ETA_S = 10.0


class SubmitRequest(Protocol):
    """What every endpoint's request model offers (see api.schemas)."""

    @property
    def webhook(self) -> str | None: ...

    def to_spec(self) -> JobSpec: ...

    def warnings(self) -> list[str]: ...

    def model_errors(self, settings: Settings) -> dict[str, list[str]]: ...


@dataclass(frozen=True)
class PreparedJob:
    """A validated request, ready to be stored."""

    spec: JobSpec
    new: NewJob


@dataclass(frozen=True)
class Accepted:
    """A stored job and the eta to quote for it."""

    job: Job
    eta: float


def prepare_job(
    settings: Settings, key_id: int, request: SubmitRequest, endpoint: str
) -> PreparedJob:
    """Check what the request names and build its row (no database access)."""
    errors = request.model_errors(settings)
    if errors:
        raise ApiError(422, errors)
    spec = request.to_spec()
    file_prefix = jobs.new_file_prefix()
    return PreparedJob(
        spec,
        NewJob(
            api_key_id=key_id,
            operation=spec.operation,
            endpoint=endpoint,
            params=spec.to_row(),
            meta=describe(spec, file_prefix, request.warnings()),
            track_id=None if spec.track_id is None else str(spec.track_id),
            webhook_url=request.webhook,
            batch_key=batch_key(spec),
            file_prefix=file_prefix,
        ),
    )


def store_jobs(
    settings: Settings, broker: Celery, group: Sequence[PreparedJob]
) -> list[Accepted | BaseException]:
    """Admit, insert and commit a group of jobs, then publish them: one outcome per job, in
    order (the stored job, or the ApiError that refused it)."""
    with session_scope(settings.resolved_database_url) as session:
        admission = Admission(session, settings, {prepared.new.api_key_id for prepared in group})
        refusals = [_refusal(admission, prepared) for prepared in group]
        admitted = [
            prepared for prepared, refusal in zip(group, refusals, strict=True) if not refusal
        ]
        rows = jobs.create_jobs(session, [prepared.new for prepared in admitted])
        session.commit()
        etas = _publish_and_estimate(session, settings, broker, admitted, rows)
    accepted = iter([Accepted(job, eta) for job, eta in zip(rows, etas, strict=True)])
    return [refusal or next(accepted) for refusal in refusals]


def _refusal(admission: Admission, prepared: PreparedJob) -> ApiError | None:
    """Why the job may not be queued now, or None once it is counted."""
    try:
        admission.admit(prepared.new.api_key_id)
    except ApiError as refusal:
        return refusal
    return None


def _publish_and_estimate(
    session: Session,
    settings: Settings,
    broker: Celery,
    admitted: Sequence[PreparedJob],
    rows: Sequence[Job],
) -> list[float]:
    """Publish committed jobs and record where they went; their etas.

    The jobs are accepted whatever happens here: a failure is logged and the sweeper publishes
    what was not marked, so the client still gets its processing answer.
    """
    try:
        by_queue: dict[str, list[int]] = defaultdict(list)
        for prepared, job in zip(admitted, rows, strict=True):
            spec = prepared.spec
            queue = publish_job(broker, settings, job.id, spec.operation, spec.model_id)
            if queue is not None:
                by_queue[queue].append(job.id)
        for queue, job_ids in by_queue.items():
            routing.mark_published_many(session, job_ids, queue)
        session.commit()
        return _etas(session, rows)
    except Exception:
        session.rollback()
        log.exception(
            "jobs %s stored but not all published; the sweeper will", [j.id for j in rows]
        )
        return [DEFAULT_ETA_S] * len(rows)


def _etas(session: Session, rows: Sequence[Job]) -> list[float]:
    """Each new job's eta, from one look at the queue: a job of the group also waits for the
    ones stored before it."""
    if not rows:
        return []
    snapshot = jobs.queue_snapshot(session, rows[0])
    ahead: dict[Operation, int] = defaultdict(int, snapshot.queued_ahead)
    etas = []
    for job in rows:
        own_view = replace(snapshot, queued_ahead=dict(ahead))
        etas.append(jobs.eta_from(own_view, job, default_s=DEFAULT_ETA_S))
        ahead[job.operation] += 1
    return etas
