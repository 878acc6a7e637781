"""Admission control: per-key limits (429 with retry_after) and global backpressure (503).

Counted from the jobs table itself, so the limits hold across API replicas and survive
restarts, and need no extra service in the embedded profile.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from datetime import timedelta

from sqlalchemy.orm import Session

from api.errors import ApiError
from darkroom.settings import Settings
from db.models import utcnow
from db.repositories import jobs
from db.repositories.jobs import KeyLoad

RATE_WINDOW = timedelta(minutes=1)
BACKPRESSURE_RETRY_S = 30


class Admission:
    """The limits for a group of submissions stored together: the counts are read once (two
    queries), then kept up to date locally, so that every submission of the group is judged as
    if the ones before it had already been stored."""

    def __init__(self, session: Session, settings: Settings, key_ids: Collection[int]) -> None:
        self._settings = settings
        self._loads = jobs.key_loads(session, key_ids, utcnow() - RATE_WINDOW)
        self._queued = jobs.queued_jobs(session)

    def admit(self, key_id: int) -> None:
        """Count one more job for `key_id`, or raise ApiError if it may not queue one now."""
        settings = self._settings
        load = self._loads.get(key_id, KeyLoad(active=0, recent=0))
        if load.active >= settings.max_active_jobs_per_key:
            raise ApiError(
                429,
                f"Too many queued jobs: at most {settings.max_active_jobs_per_key} per key at "
                "once.",
                retry_after=10,
            )
        if load.recent >= settings.max_jobs_per_minute_per_key:
            raise ApiError(
                429,
                f"Rate limit: at most {settings.max_jobs_per_minute_per_key} jobs a minute per "
                "key.",
                retry_after=int(RATE_WINDOW.total_seconds()),
            )
        if self._queued >= settings.max_queue_depth:
            raise ApiError(
                503,
                "The service is at capacity; try again shortly.",
                retry_after=BACKPRESSURE_RETRY_S,
            )
        self._loads[key_id] = replace(load, active=load.active + 1, recent=load.recent + 1)
        self._queued += 1
