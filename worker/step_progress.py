"""The step hook of a running batch: its progress, previews and progress webhooks are written,
and its cancel requests read, by a writer thread, not on the pipeline's thread.

A diffusers pipeline calls its step callback between two denoising steps, on the thread that
drives the GPU: whatever the hook does there, the GPU waits for. A database transaction there
(its round trips each wait for the interpreter lock again: 26 ms median per batch in the
saturation benchmark, issue 15) stalled every batch at its first step. So the hook only
decides, at most every `PROGRESS_INTERVAL_S`, makes the due previews (they read the call's
latents, which live only during the step) and hands the write to the worker's one writer
thread (`WorkerRuntime.progress_writer`). The cancel requests the writer reads reach the hook
through the batch's `canceled` set, which the hook checks at every step: a call whose jobs were
all canceled stops at the first step after the read.

At most one write per batch is in flight: one that falls due while the previous still runs is
skipped (progress is best effort; the next write carries the newer fraction). When the call
ends, the batch waits for its last write (`flush`), so that no progress write or progress
webhook lands after the conclusion's terminal write.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

from sqlalchemy.exc import SQLAlchemyError

from darkroom.settings import Settings
from db.repositories import jobs
from db.session import session_scope
from worker.batching import StopBatch
from worker.progress_hooks import BatchProgress

log = logging.getLogger(__name__)

#: How often a running batch records its progress and looks for cancel requests, at most.
PROGRESS_INTERVAL_S = 0.5


class JobCanceledError(StopBatch):
    """Raised between denoising steps when every job of the running call was canceled."""


class ProgressHook:
    """A batch's step hook (`worker.batching.BatchStepHook`): see the module's docstring.

    `canceled` is the batch's own set (its conclusion reads the requests once more); the writer
    adds to it. `extras`, when given, makes the previews and records them and the due progress
    webhooks in the same write."""

    def __init__(
        self,
        job_ids: list[int],
        settings: Settings,
        canceled: set[int],
        writer: ThreadPoolExecutor,
        extras: BatchProgress | None = None,
    ) -> None:
        self.job_ids, self.settings, self.canceled = job_ids, settings, canceled
        self._writer, self._extras = writer, extras
        self._last_write = float("-inf")
        self._pending: Future[None] | None = None

    def __call__(self, running: list[int], done: int, total: int) -> None:
        ids = [self.job_ids[index] for index in running]
        if all(job_id in self.canceled for job_id in ids):
            raise JobCanceledError
        now = time.monotonic()
        if now - self._last_write < PROGRESS_INTERVAL_S or self._writing():
            return
        self._last_write = now
        fraction = min(done / max(total, 1), 1.0)
        made = self._extras.previews(running, done) if self._extras is not None else {}
        self._pending = self._writer.submit(self._write, ids, fraction, made)

    def flush(self) -> None:
        """Wait for the write in flight, if any (it never raises)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def _writing(self) -> bool:
        return self._pending is not None and not self._pending.done()

    def _write(self, ids: list[int], fraction: float, made: dict[int, bytes]) -> None:
        """One transaction: the progress, the previews and due webhooks, the cancel requests.
        A failure only skips this write (logged): the next one tries again."""
        try:
            with session_scope(self.settings.resolved_database_url) as session:
                jobs.record_progress(session, ids, fraction)
                requested = jobs.any_cancel_requested(session, self.job_ids)
                if self._extras is not None:
                    self._extras.record(session, ids, made, fraction)
        except SQLAlchemyError:
            log.warning("progress of jobs %s not recorded; will retry", ids, exc_info=True)
            return
        except Exception:
            log.exception("progress of jobs %s not recorded", ids)
            return
        self.canceled.update(requested)
