"""Job rows for tests, stored through the real repositories and services as the API and worker
store them: one place instead of a private helper in every test module."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from darkroom.identities import FailureReason, Operation
from darkroom.jobspec import JobSpec, batch_key, describe
from darkroom.settings import Settings
from db.models import Job
from db.repositories import jobs
from db.session import session_scope
from services import outcomes


def job_row(
    session: Session,
    key_id: int,
    *,
    spec: JobSpec | None = None,
    operation: Operation = Operation.PIX2PIX,
    endpoint: str = "v5",
    params: dict[str, Any] | None = None,
    track_id: str | None = None,
    webhook: str | None = None,
    batch_key: str | None = None,
    **fields: Any,
) -> Job:
    """A queued job, flushed not committed; with `spec`, its row and the `meta` the API writes
    (else `operation` and raw `params`). `fields` then set columns (state, created_at, ...)."""
    if spec is not None:
        operation, params = spec.operation, spec.to_row()
    new = jobs.NewJob(key_id, operation, endpoint, params or {}, {}, track_id, webhook, batch_key)
    job = jobs.create_job(session, new)
    if spec is not None:
        job.meta = describe(spec, job.file_prefix, [])
    for name, value in fields.items():
        if not hasattr(Job, name):  # a typo would otherwise set a plain attribute silently
            raise AttributeError(f"Job has no column {name!r}")
        setattr(job, name, value)
    session.flush()
    return job


def queued_job(settings: Settings, key_id: int, **row: Any) -> int:
    """`job_row` in its own committed transaction; its id. Nothing is published."""
    with session_scope(settings.resolved_database_url) as session:
        return job_row(session, key_id, **row).id


def batchable_img2img_job(settings: Settings, key_id: int, image_url: str, *, prompt: str) -> int:
    """A queued 64x64, 2-step img2img job of `image_url`, with the batch key the API gives it:
    jobs made by this with the same prompt may share a pipeline call. Its id."""
    spec = JobSpec(
        operation=Operation.IMG2IMG,
        prompt=prompt,
        init_images=[image_url],
        width=64,
        height=64,
        steps=2,
        strength=0.5,
        guidance_scale=7.0,
        seed=7,
    )
    return queued_job(settings, key_id, spec=spec, batch_key=batch_key(spec))


def failed_with_delivery(
    settings: Settings,
    key_id: int,
    url: str,
    *,
    message: str = "nope",
    reason: FailureReason = FailureReason.REJECTED,
    **row: Any,
) -> int:
    """A job with `url` as its webhook failed by the worker's outcome; the delivery it queued."""
    with session_scope(settings.resolved_database_url) as session:
        job = job_row(session, key_id, webhook=url, **row)
        delivery_id = outcomes.fail(session, settings, job, message, reason=reason)
    assert delivery_id is not None
    return delivery_id
