"""Concluding a batch: store each successful job's images, then record every success of the
batch in one transaction; cancels, refusals and errors are recorded one job at a time.

Guarantees (docs/RELIABILITY.md): a job is recorded as success only once its files are stored,
in the transaction that references them. Each job's write is fenced by its claim's attempt
(`outcomes.succeed_many`): a job that another run won or ended is left as it is, and this
run's files for it are deleted. A write that cannot reach the database is tried again with
backoff for `finish_retry_s` (the images are still in memory); past that, or when the write
fails otherwise, the jobs are left to their leases and the sweeper (exactly one run records
each). One job whose row refuses the batch's write (a constraint) does not hold back its batch
mates: the batch is then recorded one job at a time.

Storage faults: a failed write is retried `storage_write_attempts` times with backoff; then the
job fails with a message that says its images could not be stored (`storage` reason).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError

from darkroom.identities import FailureReason
from darkroom.logs import job_context
from darkroom.settings import Settings
from darkroom.storage import StorageError
from db.models import utcnow
from db.repositories import jobs
from db.repositories.jobs import OutputRecord
from db.session import session_scope
from services import outcomes
from services import webhooks as webhook_service
from services.outcomes import Recorded, RunSuccess, storage_failed_message
from services.responses import run_output_filename
from worker import png
from worker.batching import Outcome, StopBatch
from worker.images import ImageInputError
from worker.pipelines.request import GenerationResult
from worker.runtime import Ready, WorkerRuntime

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long `temp: yes` output links work; the sweeper deletes the files afterwards.
TEMP_LIFETIME = timedelta(hours=24)
#: The longest pause between two tries of a failed output write.
STORAGE_RETRY_MAX_DELAY_S = 10.0
#: The first and the longest pause between two tries of a terminal write (database down).
FINISH_RETRY_FIRST_DELAY_S, FINISH_RETRY_MAX_DELAY_S = 0.25, 5.0
INTERNAL_ERROR = "The image could not be generated because of an internal error."


def conclude_batch(
    runtime: WorkerRuntime,
    ready: list[Ready],
    results: list[Outcome],
    canceled: set[int],
    stored: Callable[[], None] = lambda: None,
) -> None:
    """Check the cancel requests once more, end the failed and canceled jobs, store the
    successful jobs' images, call `stored`, then record their successes together."""
    try:
        canceled.update(_cancel_requests(runtime.settings, [item.job.id for item in ready]))
        runs = _conclude_each(runtime, ready, results, canceled)
        stored()
        record_successes(runtime, [run for run in runs if run is not None])
    finally:  # whatever was not recorded is left to its lease (worker.held)
        runtime.held.released(item.job.id for item in ready)


def _conclude_each(
    runtime: WorkerRuntime, ready: list[Ready], results: list[Outcome], canceled: set[int]
) -> list[RunSuccess | None]:
    """`conclude` each job: in the pool when pipelining, so that one job's PNG encoding (which
    releases the GIL) overlaps another's write and fsync."""

    def one(pair: tuple[Ready, Outcome]) -> RunSuccess | None:
        item, result = pair
        with job_context(job_id=item.job.id, track_id=item.job.track_id):
            try:
                return conclude(runtime, item, result, canceled=item.job.id in canceled)
            except Exception:
                log.exception("job %s could not be recorded", item.job.id)
                return None  # its lease runs out and the sweeper queues it again

    pairs = list(zip(ready, results, strict=True))
    if runtime.overlap is None:
        return [one(pair) for pair in pairs]
    return runtime.overlap.store_map(one, pairs)


def conclude(
    runtime: WorkerRuntime, item: Ready, result: Outcome, *, canceled: bool
) -> RunSuccess | None:
    """End a canceled, refused or failed job; store a successful one's images and return the
    success to record (None once the job is ended here)."""
    job_id, attempt = item.job.id, item.job.attempts
    if canceled or isinstance(result, StopBatch):
        message, reason = outcomes.CANCELED_MESSAGE, FailureReason.CANCELED
    elif isinstance(result, ImageInputError | ValueError):
        message, reason = str(result), FailureReason.REJECTED
    elif isinstance(result, Exception):
        log.error("job %s failed", job_id, exc_info=result)
        message, reason = INTERNAL_ERROR, FailureReason.INTERNAL
    else:
        return _store(runtime, item, result)
    finish(runtime, job_id, message, attempt=attempt, reason=reason)
    return None


def _store(runtime: WorkerRuntime, item: Ready, result: GenerationResult) -> RunSuccess | None:
    """Encode and write the images under this run's names; the success to record with them,
    or None when they could not be stored (the job is failed saying so)."""
    job, spec, request = item.job, item.spec, item.request
    expires_at = utcnow() + TEMP_LIFETIME if spec.temp else None
    run_id = f"{job.attempts}-{secrets.token_hex(4)}"
    records: list[OutputRecord] = []
    samples = zip(result.images, spec.seeds, result.nsfw, strict=True)
    try:
        for index, (image, seed, nsfw) in enumerate(samples):
            name = run_output_filename(job, index, run_id)
            _save(runtime, name, png.encode(image, runtime.settings.png_compress_level))
            records.append(
                OutputRecord(index, name, image.width, image.height, seed, nsfw, expires_at)
            )
    except StorageError as exc:
        log.error("job %s: its images could not be stored: %s", job.id, exc.reason)
        _discard(runtime, [record.filename for record in records])
        message = storage_failed_message(exc.reason)
        finish(runtime, job.id, message, attempt=job.attempts, reason=FailureReason.STORAGE)
        return None
    meta = {**job.meta, "W": request.width, "H": request.height}
    if spec.safety_checker:
        meta["nsfw_content_detected"] = list(result.nsfw)
    if expires_at is not None:
        meta["temp_expires_at"] = expires_at.isoformat()
    meta["model_load_time"] = round(result.model_load_seconds, 3)
    return RunSuccess(job, records, meta, result.pipeline_seconds, attempt=job.attempts)


def _save(runtime: WorkerRuntime, name: str, data: bytes) -> None:
    """Store one file, trying again with backoff while the storage refuses it; the last
    StorageError is raised once `storage_write_attempts` tries have failed."""
    settings = runtime.settings
    tries = settings.storage_write_attempts
    for attempt in range(1, tries + 1):
        try:
            runtime.storage.save(name, data)
            return
        except StorageError as exc:
            if attempt == tries:
                raise
            delay = min(
                settings.storage_retry_backoff_s * 2 ** (attempt - 1), STORAGE_RETRY_MAX_DELAY_S
            )
            log.warning(
                "writing output %s failed (%s): try %d of %d in %.2f s",
                name,
                exc.reason,
                attempt + 1,
                tries,
                delay,
            )
            time.sleep(delay)


def _discard(runtime: WorkerRuntime, names: list[str]) -> None:
    """Delete files that no job output will reference (best effort: a leftover is harmless,
    it is never linked)."""
    for name in names:
        try:
            runtime.storage.delete(name)
        except Exception:
            log.warning("could not delete unreferenced output %s", name, exc_info=True)


def record_successes(runtime: WorkerRuntime, runs: list[RunSuccess]) -> None:
    """Record the runs' successes and publish their webhooks, in one transaction; a run that
    lost its job (another run won or ended it) has its files deleted."""
    if not runs:
        return
    try:
        recorded = _write_successes(runtime, runs)
    except (OperationalError, InterfaceError):
        raise  # the database stayed unreachable: one job at a time would not reach it either
    except SQLAlchemyError:
        if len(runs) == 1:
            raise
        log.exception("jobs %s: the batch's write failed; one job at a time", _ids(runs))
        for run in runs:
            with job_context(job_id=run.job.id, track_id=run.job.track_id):
                try:
                    record_successes(runtime, [run])
                except Exception:
                    log.exception("job %s could not be recorded", run.job.id)
        return
    runtime.held.succeeded(job_id for job_id in _ids(runs) if job_id in recorded.won)
    for run in runs:
        if run.job.id not in recorded.won:
            log.warning("job %s was ended by another run: this run's files are deleted", run.job.id)
            _discard(runtime, [record.filename for record in run.outputs])


def _write_successes(runtime: WorkerRuntime, runs: list[RunSuccess]) -> Recorded:
    """The one transaction of `record_successes`, tried again while the database is away (a
    compare-and-set: a retry after a commit whose answer was lost still finds what it won)."""
    settings = runtime.settings

    def write() -> Recorded:
        with session_scope(settings.resolved_database_url) as session:
            recorded = outcomes.succeed_many(session, settings, runs)
            for delivery_id in recorded.deliveries.values():  # sent together after the commit
                webhook_service.publish(session, runtime.broker, settings, delivery_id)
            return recorded

    return _retrying_database(settings, runs[0].job.id, write)


def _ids(runs: list[RunSuccess]) -> list[int]:
    return [run.job.id for run in runs]


def finish(
    runtime: WorkerRuntime,
    job_id: int,
    message: str,
    *,
    attempt: int | None,
    reason: FailureReason,
) -> None:
    """Commit the job's failure with its client-safe `message`, counted under `reason`, and its
    webhook row, published once that commits. With `attempt` (this run's claim), only while that
    claim holds it. The job is released (worker.held) whatever happens: failed, it may be
    requeued; not recorded, its lease decides."""
    settings = runtime.settings

    def write() -> None:
        with session_scope(settings.resolved_database_url) as session:
            job = jobs.get_job(session, job_id)
            assert job is not None, "a claimed job cannot disappear"
            delivery_id = outcomes.fail(
                session, settings, job, message, reason=reason, attempt=attempt
            )
            webhook_service.publish(session, runtime.broker, settings, delivery_id)

    try:
        _retrying_database(settings, job_id, write)
    finally:
        runtime.held.released([job_id])


def _cancel_requests(settings: Settings, job_ids: list[int]) -> list[int]:
    """Those of `job_ids` whose cancel was requested (checked once more when the batch ends).
    Read again with backoff while the database cannot be reached, as the terminal writes are:
    raising here would lose the batch's images to a database restart."""

    def read() -> list[int]:
        with session_scope(settings.resolved_database_url) as session:
            return jobs.any_cancel_requested(session, job_ids)

    return _retrying_database(settings, job_ids[0], read)


def _retrying_database(settings: Settings, job_id: int, write: Callable[[], T]) -> T:
    """Run a terminal write, again with backoff while the database cannot be reached, for
    `finish_retry_s` at most. Safe to repeat: the write is a compare-and-set."""
    deadline = time.monotonic() + settings.finish_retry_s
    delay = FINISH_RETRY_FIRST_DELAY_S
    while True:
        try:
            return write()
        except (OperationalError, InterfaceError):  # connection refused, dropped or reset
            if time.monotonic() + delay > deadline:
                raise
            log.warning(
                "job %s: the database is unreachable; recording again in %.2f s", job_id, delay
            )
            time.sleep(delay)
            delay = min(delay * 2, FINISH_RETRY_MAX_DELAY_S)
