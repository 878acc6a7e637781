"""Jobs stored straight in Postgres, as the API stores an accepted request, for worker tests."""

from __future__ import annotations

from darkroom.jobspec import JobSpec, describe
from darkroom.settings import Settings
from db.repositories import jobs
from db.session import session_scope


def store_job(
    settings: Settings,
    api_key_id: int,
    spec: JobSpec,
    *,
    endpoint: str = "v5",
    track_id: str | None = None,
    webhook: str | None = None,
    batch_key: str | None = None,
) -> int:
    """A queued job for `spec` with the `meta` the API writes; its id. Nothing is published."""
    with session_scope(settings.resolved_database_url) as session:
        new = jobs.NewJob(
            api_key_id, spec.operation, endpoint, spec.to_row(), {}, track_id, webhook, batch_key
        )
        job = jobs.create_job(session, new)
        job.meta = describe(spec, job.file_prefix, [])
        return job.id
