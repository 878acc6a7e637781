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
from typing import Any, Protocol

from celery import Celery
from sqlalchemy.orm import Session

from api.errors import INVALID_KEY, ApiError
from api.limits import Admission
from darkroom.affinity import choose_queue
from darkroom.jobspec import JobSpec, batch_key, describe
from darkroom.queue import RUN_JOB_TASK, send
from darkroom.settings import Settings
from db.models import ApiKey, Job, Operation
from db.repositories import jobs, routing
from db.repositories.jobs import NewJob
from db.repositories.keys import active_keys_by_digest, hash_key
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
    """A validated request, ready to be stored once its key is known."""

    spec: JobSpec
    key_digest: str  # the presented key's digest: keys are checked a group at a time
    endpoint: str
    meta: dict[str, Any]
    webhook_url: str | None
    file_prefix: str

    def new_job(self, api_key_id: int) -> NewJob:
        """The row to insert for the key `api_key_id`."""
        spec = self.spec
        return NewJob(
            api_key_id=api_key_id,
            operation=spec.operation,
            endpoint=self.endpoint,
            params=spec.to_row(),
            meta=self.meta,
            track_id=None if spec.track_id is None else str(spec.track_id),
            webhook_url=self.webhook_url,
            batch_key=batch_key(spec),
            file_prefix=self.file_prefix,
        )


@dataclass(frozen=True)
class Accepted:
    """A stored job, the key that submitted it and the eta to quote."""

    job: Job
    key: ApiKey
    eta: float


def prepare_job(
    settings: Settings, presented_key: str, request: SubmitRequest, endpoint: str
) -> PreparedJob:
    """Check what the request names and build its row (no database access)."""
    errors = request.model_errors(settings)
    if errors:
        raise ApiError(422, errors)
    spec = request.to_spec()
    file_prefix = jobs.new_file_prefix()
    return PreparedJob(
        spec=spec,
        key_digest=hash_key(presented_key),
        endpoint=endpoint,
        meta=describe(spec, file_prefix, request.warnings()),
        webhook_url=request.webhook,
        file_prefix=file_prefix,
    )


def store_jobs(
    settings: Settings, broker: Celery, group: Sequence[PreparedJob]
) -> list[Accepted | BaseException]:
    """Authenticate, admit, insert and commit a group of jobs, then publish them: one outcome
    per job, in order (the stored job, or the ApiError that refused it)."""
    with session_scope(settings.resolved_database_url) as session:
        keys = active_keys_by_digest(session, {prepared.key_digest for prepared in group})
        admission = Admission(session, settings, {key.id for key in keys.values()})
        decisions = [_decide(admission, keys.get(prepared.key_digest)) for prepared in group]
        admitted = [
            (prepared, key)
            for prepared, key in zip(group, decisions, strict=True)
            if isinstance(key, ApiKey)
        ]
        rows = jobs.create_jobs(session, [prepared.new_job(key.id) for prepared, key in admitted])
        session.commit()
        etas = _publish_and_estimate(
            session, settings, broker, [prepared for prepared, _ in admitted], rows
        )
    accepted = iter(
        [Accepted(job, key, eta) for job, (_, key), eta in zip(rows, admitted, etas, strict=True)]
    )
    return [next(accepted) if isinstance(key, ApiKey) else key for key in decisions]


def _decide(admission: Admission, key: ApiKey | None) -> ApiKey | ApiError:
    """The key, once its job is counted; or why the job may not be queued now."""
    if key is None:
        return ApiError(401, INVALID_KEY)
    try:
        admission.admit(key.id)
    except ApiError as refusal:
        return refusal
    return key


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
        queue_of_model: dict[tuple[str, str | None], str] = {}  # one routing lookup per model
        for prepared, job in zip(admitted, rows, strict=True):
            model = (prepared.spec.operation.value, prepared.spec.model_id)
            if model not in queue_of_model:
                queue_of_model[model] = choose_queue(settings, *model)
            if send(broker, RUN_JOB_TASK, job.id, queue=queue_of_model[model]):
                by_queue[queue_of_model[model]].append(job.id)
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
