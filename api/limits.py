"""Admission control: per-key limits (429 with retry_after) and global backpressure (503).

Counted from the jobs table itself, so the limits hold across API replicas and survive
restarts, and need no extra service in the embedded profile.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.orm import Session

from api.errors import ApiError
from darkroom.settings import Settings
from db.models import ApiKey, utcnow
from db.repositories import jobs

RATE_WINDOW = timedelta(minutes=1)
BACKPRESSURE_RETRY_S = 30


def admit(session: Session, settings: Settings, key: ApiKey) -> None:
    """Raise ApiError unless this key may queue one more job now."""
    if jobs.active_jobs_of_key(session, key.id) >= settings.max_active_jobs_per_key:
        raise ApiError(
            429,
            f"Too many queued jobs: at most {settings.max_active_jobs_per_key} per key at once.",
            retry_after=10,
        )
    since = utcnow() - RATE_WINDOW
    if jobs.jobs_of_key_since(session, key.id, since) >= settings.max_jobs_per_minute_per_key:
        raise ApiError(
            429,
            f"Rate limit: at most {settings.max_jobs_per_minute_per_key} jobs a minute per key.",
            retry_after=int(RATE_WINDOW.total_seconds()),
        )
    if jobs.queued_jobs(session) >= settings.max_queue_depth:
        raise ApiError(
            503, "The service is at capacity; try again shortly.", retry_after=BACKPRESSURE_RETRY_S
        )
