"""Accepting a job: store it, commit, then publish its id (the transactional outbox).

The row is committed before its id reaches the broker, so a worker never receives an id it
cannot read. If publishing fails the row keeps `enqueued_at` empty and the sweeper sends it
later: an accepted job is never lost. This function therefore owns its commits.
"""

from __future__ import annotations

from typing import Any, Protocol

from celery import Celery
from sqlalchemy.orm import Session

from api.errors import ApiError
from api.limits import admit
from darkroom.jobspec import JobSpec, describe
from darkroom.queue import RUN_JOB_TASK, send
from darkroom.responses import processing_body
from darkroom.settings import Settings
from db.models import ApiKey
from db.repositories import jobs

#: The eta quoted before any job of an operation has finished, in seconds.
DEFAULT_ETA_S = 10.0


class SubmitRequest(Protocol):
    """What every endpoint's request model offers (see api.schemas)."""

    @property
    def webhook(self) -> str | None: ...

    def to_spec(self) -> JobSpec: ...

    def warnings(self) -> list[str]: ...

    def model_errors(self, settings: Settings) -> dict[str, list[str]]: ...


def submit_job(
    session: Session,
    broker: Celery,
    settings: Settings,
    key: ApiKey,
    request: SubmitRequest,
    endpoint: str,
) -> dict[str, Any]:
    """Store and enqueue one job; answer the processing shape."""
    errors = request.model_errors(settings)
    if errors:
        raise ApiError(422, errors)
    admit(session, settings, key)
    spec = request.to_spec()
    job = jobs.create_job(
        session,
        jobs.NewJob(
            api_key_id=key.id,
            operation=spec.operation,
            endpoint=endpoint,
            params=spec.to_row(),
            meta={},
            track_id=None if spec.track_id is None else str(spec.track_id),
            webhook_url=request.webhook,
        ),
    )
    job.meta = describe(spec, job.file_prefix, request.warnings())
    session.commit()
    if send(broker, RUN_JOB_TASK, job.id):
        jobs.mark_enqueued(session, job.id)
        session.commit()
    eta = jobs.typical_generation_time(session, spec.operation) or DEFAULT_ETA_S
    return processing_body(job, settings.public_url, eta)
