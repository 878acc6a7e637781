"""What a running batch adds to its progress writes: previews and due progress webhooks.

`BatchProgress` is opened around a batch's pipeline calls (worker/jobs.py): it records the
`start` webhooks its jobs asked for, opens the latent tap (worker/previews.py), and at each of
the step hook's progress writes makes the due previews (before the write's session opens: the
projection is the only work here that is not a query) and records them and the due `progress`
webhooks in that session (services/progress_events.py). The dispatcher sends the webhooks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextvars import Token
from types import TracebackType

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from darkroom.settings import Settings
from db.models import Job
from db.session import session_scope
from services import progress_events
from services.progress_events import ProgressRecorder, Watched
from worker import previews
from worker.pipelines.request import GenerationRequest

log = logging.getLogger(__name__)


class BatchProgress:
    """The previews and progress webhooks of one batch (jobs in batch order)."""

    def __init__(self, settings: Settings, batch: Sequence[tuple[Job, GenerationRequest]]) -> None:
        self.job_ids = [job.id for job, _request in batch]
        watched = {job.id: Watched.of(job) for job, _request in batch}
        self.recorder = ProgressRecorder(settings, watched)
        self.tap = previews.LatentTap()
        self.maker = previews.PreviewMaker(
            self.tap,
            settings.preview_every_steps,
            [len(request.seeds) for _job, request in batch],
            [(request.width, request.height) for _job, request in batch],
        )
        self._token: Token[previews.LatentTap | None] | None = None
        self._record_start(settings, list(watched.values()))

    def _record_start(self, settings: Settings, watched: list[Watched]) -> None:
        """Record the `start` webhooks asked for; a database error only loses them."""
        if not any(job.wants(progress_events.START) for job in watched):
            return
        try:
            with session_scope(settings.resolved_database_url) as session:
                progress_events.record_start(session, watched)
        except SQLAlchemyError:
            log.warning("start webhooks of jobs %s not recorded", self.job_ids, exc_info=True)

    def __enter__(self) -> BatchProgress:
        self._token = previews.open_tap(self.tap)
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _error: BaseException | None,
        _trace: TracebackType | None,
    ) -> None:
        if self._token is not None:
            previews.close_tap(self._token)
            self._token = None
        self.tap.latents = None  # let the last call's latents go (device memory)

    def previews(self, running: Sequence[int], done: int) -> dict[int, bytes]:
        """The running jobs' new previews by job id (none unless one is due); never raises: a
        preview that cannot be made is only missing."""
        try:
            made = self.maker.previews(running, done)
        except Exception:
            log.warning("previews of jobs %s not made", self.job_ids, exc_info=True)
            return {}
        return {self.job_ids[index]: image for index, image in made.items()}

    def record(
        self, session: Session, running_ids: list[int], made: dict[int, bytes], fraction: float
    ) -> None:
        """Store `made` and record the due progress webhooks, in the progress write's session."""
        self.recorder.save_previews(session, made, previews.PREVIEW_MEDIA_TYPE, fraction)
        self.recorder.record_webhooks(session, running_ids, fraction)
