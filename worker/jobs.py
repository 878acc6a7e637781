"""Running jobs: claim one, take compatible queued jobs beside it, generate them as one batch,
store each job's images, record each outcome, notify.

`run_job` is a plain function (the Celery task is a thin shell around it), safe to call twice
with the same id: the claim lets one worker at a time run a job, and the terminal transition
happens once.

Fencing (docs/RELIABILITY.md): each claim writes a new `attempts` value, this run's token. The
lease renewals and the terminal update match it, so a run that stalled past its lease while
another worker took the job can neither renew, nor record anything, once superseded. Each run
stores its images under names of its own (`run_output_filename`), recorded in `job_outputs` in
the winner's terminal transaction: a stale run's files are never referenced, never replace the
winner's, and the run deletes them when it finds it lost.

Storage faults: a failed write is retried `storage_write_attempts` times with backoff, with
the images still in memory (the pipeline does not run again); then the job fails with a
message that says the images could not be stored, counted under the `storage` reason.
Database faults: a terminal write that cannot reach the database is tried again with backoff
for `finish_retry_s` (the images are still in memory); past that the lease decides.

Batching (see docs/PERFORMANCE.md): after claiming the job it was sent, the worker claims up to
`max_batch - 1` more queued jobs with the same `batch_key` in one conditional UPDATE
(`jobs.claim_batch_companions`, FOR UPDATE SKIP LOCKED on Postgres, so two workers never take
the same job). Their own messages arrive later and are refused by the claim (busy or terminal).
Every job of the batch has its lease renewed and its progress recorded; a job whose init image
cannot be fetched, or whose request is refused, fails alone.

Cancel within a batch: the step hook reads the cancel requests of every job of the batch. A
canceled job keeps computing with its batch mates (its samples cannot leave a running call) and
fails as canceled when the batch ends, without outputs; when every job of a running call is
canceled, the call stops at its next step.

Pipelining (`worker.overlap`, issue 15): with `runtime.overlap` set (`darkroom worker` sets it
unless `worker_pipeline` is false), a batch's init images are fetched in a thread pool; while its
pipeline call runs, the next batch of the same key is claimed ahead and prepared, and runs next
in the same task (`MAX_BATCHES_PER_TASK` at most); once its pipeline call ends, its conclusion
(the last cancel check, PNG encoding in the pool, storage writes, the terminal transactions) runs
in a background thread while the next batch (claimed ahead, or the next message's) generates.
One conclusion at a time: the next one waits for it. Without `overlap` (the tests' runtimes,
or `DARKROOM_WORKER_PIPELINE=false`), `run_job` returns only once every job of the batch is
recorded. The guarantees are the same either way: see worker/overlap.py.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

from celery import Celery
from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError

from darkroom.identities import FailureReason
from darkroom.jobspec import JobSpec, batch_key
from darkroom.logs import job_context
from darkroom.settings import Settings
from darkroom.storage import Storage, StorageError, make_storage
from db.models import Job, utcnow
from db.repositories import jobs, webhooks
from db.repositories.jobs import ClaimOutcome, OutputRecord
from db.session import session_scope
from services import outcomes
from services import webhooks as webhook_service
from services.outcomes import exhausted_message, storage_failed_message
from services.responses import run_output_filename
from worker.batching import BatchStepHook, Outcome, StopBatch, generate_batch
from worker.bench_generator import fake_generate_batch, fake_generator_enabled
from worker.families import output_size as family_output_size
from worker.fastpath import fast_path_for
from worker.images import ImageInputError, fetch_images, png_bytes
from worker.memory import device_budget
from worker.models.cache import ModelCache
from worker.overlap import Overlap
from worker.pipelines.request import GenerationRequest, GenerationResult, LoraSpec, StepHook
from worker.progress_hooks import BatchProgress

log = logging.getLogger(__name__)

#: How long `temp: yes` output links work; the sweeper deletes the files afterwards.
TEMP_LIFETIME = timedelta(hours=24)
#: How often a running batch records its progress and looks for cancel requests, at most.
PROGRESS_INTERVAL_S = 0.5
#: How often the first job of a batch looks for companions during `batch_window_ms`.
BATCH_POLL_S = 0.02
#: Jobs per batch when `max_batch` is 0 (auto): batching pays on a GPU, hardly on a CPU.
CUDA_MAX_BATCH = 8
#: The longest pause between two tries of a failed output write.
STORAGE_RETRY_MAX_DELAY_S = 10.0
#: The first and the longest pause between two tries of a terminal write (database down).
FINISH_RETRY_FIRST_DELAY_S, FINISH_RETRY_MAX_DELAY_S = 0.25, 5.0

T = TypeVar("T")
#: A batch claimed ahead: its jobs, and their requests once prepared.
_Ahead = tuple[list[tuple[Job, JobSpec]], list["_Ready"]]
#: Batches one task runs at most when pipelining (it claims the next ahead while one runs).
MAX_BATCHES_PER_TASK = 32
INTERNAL_ERROR = "The image could not be generated because of an internal error."


@dataclass
class WorkerRuntime:
    """What a worker process keeps between jobs: settings, resident models, storage, broker."""

    settings: Settings
    broker: Celery
    cache: ModelCache = field(default_factory=ModelCache)
    # Set: batches are pipelined (worker.overlap); None: each batch is recorded before return.
    overlap: Overlap | None = None
    storage: Storage = field(init=False)

    def __post_init__(self) -> None:
        self.storage = make_storage(self.settings)
        device = self.cache.device
        budget = device_budget(device, self.settings.gpu_memory_fraction)
        self.cache.configure(fast_path_for(self.settings, device), budget)

    @property
    def max_batch(self) -> int:
        """Jobs per batch at most: the setting, or by device when it is 0 (auto)."""
        if self.settings.max_batch:
            return self.settings.max_batch
        return CUDA_MAX_BATCH if self.cache.device == "cuda" else 1


@dataclass(frozen=True)
class _Ready:
    """A claimed job whose request is built: its init images are fetched."""

    job: Job
    spec: JobSpec
    request: GenerationRequest


def run_job(job_id: int, runtime: WorkerRuntime) -> None:
    """Run job `job_id`, and compatible queued jobs beside it as one batch, to terminal states,
    unless another worker has it or it has ended."""
    job = _claim(job_id, runtime)
    if job is None:
        return
    with job_context(job_id=job.id, track_id=job.track_id):
        spec = _read_spec(runtime, job)
        if spec is None:
            return
        batch = [(job, spec), *_claim_companions(runtime, job, spec)]
    _run_batch(runtime, batch)


def _read_spec(runtime: WorkerRuntime, job: Job) -> JobSpec | None:
    """The job's parameters; None (and the job failed) when they cannot be read."""
    try:
        return JobSpec.model_validate(job.params)
    except ValidationError:
        log.exception("job %s has unreadable parameters", job.id)
        _finish(
            runtime, job.id, INTERNAL_ERROR, attempt=job.attempts, reason=FailureReason.INTERNAL
        )
        return None


def _claim(job_id: int, runtime: WorkerRuntime) -> Job | None:
    """The job if this worker may run it now; fails it if it is out of attempts."""
    settings = runtime.settings
    with session_scope(settings.resolved_database_url) as session:
        outcome, job = jobs.claim_job(
            session, job_id, lease_s=settings.job_lease_s, max_attempts=settings.job_max_attempts
        )
    if outcome == ClaimOutcome.CLAIMED and job is not None and job.cancel_requested_at:
        # canceled while it was orphaned
        _finish(
            runtime,
            job_id,
            outcomes.CANCELED_MESSAGE,
            attempt=job.attempts,
            reason=FailureReason.CANCELED,
        )
        return None
    if outcome == ClaimOutcome.CLAIMED:
        return job
    log.info("job %s not run here: %s", job_id, outcome)
    if outcome == ClaimOutcome.EXHAUSTED and job is not None:
        _finish(
            runtime,
            job_id,
            exhausted_message(job.attempts),
            attempt=None,
            reason=FailureReason.WORKER_LOST,
        )  # no claim held
    return None


def _claim_companions(
    runtime: WorkerRuntime, leader: Job, spec: JobSpec
) -> list[tuple[Job, JobSpec]]:
    """Queued jobs that can share the leader's pipeline call, claimed for this worker.

    With `batch_window_ms`, keeps looking until the batch is full or the window has passed.
    """
    key, wanted = batch_key(spec), runtime.max_batch - 1
    if key is None or wanted < 1:
        return []
    settings = runtime.settings
    deadline = time.monotonic() + settings.batch_window_ms / 1000
    claimed: list[Job] = []
    while True:
        with session_scope(settings.resolved_database_url) as session:
            claimed += jobs.claim_batch_companions(
                session,
                leader_id=leader.id,
                batch_key=key,
                limit=wanted - len(claimed),
                lease_s=settings.job_lease_s,
                max_attempts=settings.job_max_attempts,
            )
        if len(claimed) >= wanted or time.monotonic() >= deadline:
            break
        time.sleep(min(BATCH_POLL_S, max(0.0, deadline - time.monotonic())))
    if claimed:
        log.info("job %s takes jobs %s into its batch", leader.id, [job.id for job in claimed])
    companions = []
    for job in claimed:
        with job_context(job_id=job.id, track_id=job.track_id):
            companion_spec = _read_spec(runtime, job)
        if companion_spec is not None:
            companions.append((job, companion_spec))
    return companions


def _run_batch(runtime: WorkerRuntime, batch: list[tuple[Job, JobSpec]]) -> None:
    """Run the batch; when pipelining, then the batches claimed ahead meanwhile, in turn."""
    prepared: list[_Ready] | None = None
    for turn in range(MAX_BATCHES_PER_TASK):
        # The last turn claims nothing ahead: a batch claimed and never run would wait for its
        # leases to run out.
        last = turn == MAX_BATCHES_PER_TASK - 1
        ahead = _run_one_batch(runtime, batch, prepared, claim_ahead=not last)
        if ahead is None:
            return
        batch, prepared = ahead.result()
        if not batch:
            return
    log.info("%d batches in one task: the next is left to its message", MAX_BATCHES_PER_TASK)


def _run_one_batch(
    runtime: WorkerRuntime,
    batch: list[tuple[Job, JobSpec]],
    prepared: list[_Ready] | None,
    *,
    claim_ahead: bool = True,
) -> Future[_Ahead] | None:
    """Fetch each job's images (unless `prepared`), generate them together, and conclude each
    job on its own; when pipelining, the next batch claimed ahead during the call."""
    settings = runtime.settings
    ahead: Future[_Ahead] | None = None
    with _heartbeat({job.id: job.attempts for job, _spec in batch}, settings):
        ready = prepared if prepared is not None else _prepare_all(runtime, batch)
        if not ready:
            return None
        overlap = runtime.overlap
        if overlap is not None and claim_ahead and not overlap.stopping.is_set():
            leader, spec = batch[0]
            ahead = overlap.ahead(lambda: _claim_ahead(runtime, leader, spec))
        ids = [item.job.id for item in ready]
        canceled: set[int] = set()
        extras = BatchProgress(settings, [(item.job, item.request) for item in ready])
        hook = _step_hook(ids, settings, canceled, extras)
        with job_context(batch_job_ids=ids), extras:
            results = _generate(runtime, [item.request for item in ready], hook)
        if overlap is None:
            _conclude_batch(runtime, ready, results, canceled)
            return None
    # The next message is taken while this batch is stored, its leases renewed meanwhile.
    claims = {item.job.id: item.job.attempts for item in ready}

    def conclude() -> None:
        with _heartbeat(claims, settings):
            _conclude_batch(runtime, ready, results, canceled)

    overlap.behind(conclude)
    return ahead


def _claim_ahead(runtime: WorkerRuntime, leader: Job, spec: JobSpec) -> _Ahead:
    """The next batch, claimed and prepared while the current one generates: up to `max_batch`
    queued jobs that share the leader's batch key (none without one)."""
    key = batch_key(spec)
    if key is None:
        return [], []
    settings = runtime.settings
    with session_scope(settings.resolved_database_url) as session:
        claimed = jobs.claim_batch_companions(
            session,
            leader_id=leader.id,
            batch_key=key,
            limit=runtime.max_batch,
            lease_s=settings.job_lease_s,
            max_attempts=settings.job_max_attempts,
        )
    if not claimed:
        return [], []
    log.info("job %s's batch claims jobs %s ahead", leader.id, [job.id for job in claimed])
    batch = []
    for job in claimed:
        with job_context(job_id=job.id, track_id=job.track_id):
            job_spec = _read_spec(runtime, job)
        if job_spec is not None:
            batch.append((job, job_spec))
    return batch, _prepare_all(runtime, batch)


def _prepare_all(runtime: WorkerRuntime, batch: list[tuple[Job, JobSpec]]) -> list[_Ready]:
    """Each job's request with its init images (fetched in the pool when pipelining); the jobs
    that cannot be prepared are failed and left out."""
    if runtime.overlap is None or len(batch) < 2:
        prepared = [_prepare(runtime, job, spec) for job, spec in batch]
    else:
        prepared = runtime.overlap.map(lambda pair: _prepare(runtime, *pair), batch)
    return [item for item in prepared if item is not None]


def _generate(
    runtime: WorkerRuntime, requests: list[GenerationRequest], hook: BatchStepHook
) -> list[Outcome]:
    """The batch's pipeline calls (the benchmark's fake generator when both its settings ask)."""
    settings = runtime.settings
    if fake_generator_enabled(settings):
        return fake_generate_batch(requests, settings, hook)
    return generate_batch(requests, runtime.cache, settings, hook)


def _conclude_batch(
    runtime: WorkerRuntime, ready: list[_Ready], results: list[Outcome], canceled: set[int]
) -> None:
    """Check the cancel requests once more, then record each job of the batch on its own."""
    ids = [item.job.id for item in ready]
    canceled.update(_cancel_requests(runtime.settings, ids))
    encoded = _encode_all(runtime, results)
    for item, result, pngs in zip(ready, results, encoded, strict=True):
        with job_context(job_id=item.job.id, track_id=item.job.track_id):
            try:
                _conclude(runtime, item, result, pngs, canceled=item.job.id in canceled)
            except Exception:
                # Not recorded (database trouble; storage faults end the job themselves):
                # its lease runs out and the sweeper queues it again; the others go on.
                log.exception("job %s could not be recorded", item.job.id)


def _encode_all(runtime: WorkerRuntime, results: list[Outcome]) -> list[list[bytes] | None]:
    """The PNGs of each successful result, encoded in the pool when pipelining (zlib releases
    the GIL); None for the others, and for all without the pool (encoded while stored)."""
    if runtime.overlap is None:
        return [None] * len(results)
    images = [r.images if isinstance(r, GenerationResult) else [] for r in results]
    flat = runtime.overlap.map(png_bytes, [image for group in images for image in group])
    encoded: list[list[bytes] | None] = []
    for group, result in zip(images, results, strict=True):
        encoded.append(flat[: len(group)] if isinstance(result, GenerationResult) else None)
        flat = flat[len(group) :]
    return encoded


def _prepare(runtime: WorkerRuntime, job: Job, spec: JobSpec) -> _Ready | None:
    """The job with its request built; None (and the job failed) when that is impossible."""
    with job_context(job_id=job.id, track_id=job.track_id):
        try:
            return _Ready(job, spec, _build_request(spec, runtime.settings))
        except (ImageInputError, ValueError) as exc:
            _finish(runtime, job.id, str(exc), attempt=job.attempts, reason=FailureReason.REJECTED)
        except Exception:
            log.exception("job %s failed", job.id)
            _finish(
                runtime, job.id, INTERNAL_ERROR, attempt=job.attempts, reason=FailureReason.INTERNAL
            )
    return None


def _conclude(
    runtime: WorkerRuntime,
    item: _Ready,
    result: Outcome,
    pngs: list[bytes] | None = None,
    *,
    canceled: bool,
) -> None:
    """Record the job's outcome: its images, a cancel, or the reason it failed."""
    job_id, attempt = item.job.id, item.job.attempts
    if canceled or isinstance(result, StopBatch):
        _finish(
            runtime,
            job_id,
            outcomes.CANCELED_MESSAGE,
            attempt=attempt,
            reason=FailureReason.CANCELED,
        )
    elif isinstance(result, ImageInputError | ValueError):
        _finish(runtime, job_id, str(result), attempt=attempt, reason=FailureReason.REJECTED)
    elif isinstance(result, Exception):
        log.error("job %s failed", job_id, exc_info=result)
        _finish(runtime, job_id, INTERNAL_ERROR, attempt=attempt, reason=FailureReason.INTERNAL)
    else:
        _store_and_finish(runtime, item.job, item.spec, item.request, result, pngs)


class JobCanceledError(StopBatch):
    """Raised between denoising steps when every job of the running call was canceled."""


def _step_hook(
    job_ids: list[int],
    settings: Settings,
    canceled: set[int],
    extras: BatchProgress | None = None,
) -> BatchStepHook:
    """A batch step hook that records the running jobs' progress (with `extras`, their
    previews and due progress webhooks too) and collects the cancel
    requests of the whole batch into `canceled`, raising JobCanceledError once every job of
    the running call is canceled. It touches the database at most twice a second, so a fast
    model is not slowed, and a database error only skips one check."""
    last_write = 0.0

    def on_step(running: list[int], done: int, total: int) -> None:
        nonlocal last_write
        if time.monotonic() - last_write < PROGRESS_INTERVAL_S:
            return
        last_write = time.monotonic()
        ids = [job_ids[index] for index in running]
        fraction = min(done / max(total, 1), 1.0)
        made = extras.previews(running, done) if extras is not None else {}
        try:
            with session_scope(settings.resolved_database_url) as session:
                jobs.record_progress(session, ids, fraction)
                canceled.update(jobs.any_cancel_requested(session, job_ids))
                if extras is not None:
                    extras.record(session, ids, made, fraction)
        except SQLAlchemyError:
            log.warning("progress of jobs %s not recorded; will retry", ids, exc_info=True)
        if all(job_id in canceled for job_id in ids):
            raise JobCanceledError

    return on_step


def _cancel_requests(settings: Settings, job_ids: list[int]) -> list[int]:
    """Those of `job_ids` whose cancel was requested (checked once more when the batch ends).
    Read again with backoff while the database cannot be reached, as the terminal writes are:
    raising here would lose the batch's images to a database restart."""

    def read() -> list[int]:
        with session_scope(settings.resolved_database_url) as session:
            return jobs.any_cancel_requested(session, job_ids)

    return _retrying_database(settings, job_ids[0], read)


def _build_request(
    spec: JobSpec, settings: Settings, on_step: StepHook | None = None
) -> GenerationRequest:
    """Fetch the init images and settle the output size."""
    images = fetch_images(spec.init_images, settings)
    # Sides that come from the image are rounded to the family's multiple (Flux: 16).
    width, height = family_output_size(spec.family, spec.width, spec.height, images[0])
    return GenerationRequest(
        operation=spec.operation,
        model_id=spec.model_id,
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        images=images,
        image_weights=tuple(spec.image_weights or ()),
        width=width,
        height=height,
        steps=spec.steps,
        guidance_scale=spec.guidance_scale,
        strength=spec.strength,
        image_guidance_scale=spec.image_guidance_scale,
        seeds=tuple(spec.seeds),
        scheduler=spec.scheduler,
        use_karras_sigmas=spec.use_karras_sigmas,
        algorithm_type=spec.algorithm_type,
        loras=tuple(LoraSpec(lora.name, lora.strength) for lora in spec.loras),
        vae=spec.vae,
        embeddings=tuple(spec.embeddings),
        clip_skip=spec.clip_skip,
        tomesd=spec.tomesd,
        safety_checker=spec.safety_checker,
        safety_checker_type=spec.safety_checker_type,
        on_step=on_step,
    )


def _store_and_finish(
    runtime: WorkerRuntime,
    job: Job,
    spec: JobSpec,
    request: GenerationRequest,
    result: GenerationResult,
    pngs: list[bytes] | None = None,
) -> None:
    """Write the images (`pngs`: already encoded) under this run's names, then record success
    with them; if they cannot be stored, fail the job saying so. A run that finds another one
    won deletes its files."""
    expires_at = utcnow() + TEMP_LIFETIME if spec.temp else None
    run_id = f"{job.attempts}-{secrets.token_hex(4)}"
    records: list[OutputRecord] = []
    samples = zip(result.images, spec.seeds, result.nsfw, strict=True)
    try:
        for index, (image, seed, nsfw) in enumerate(samples):
            name = run_output_filename(job, index, run_id)
            _save(runtime, name, pngs[index] if pngs is not None else png_bytes(image))
            records.append(
                OutputRecord(index, name, image.width, image.height, seed, nsfw, expires_at)
            )
    except StorageError as exc:
        log.error("job %s: its images could not be stored: %s", job.id, exc.reason)
        _discard(runtime, [record.filename for record in records])
        message = storage_failed_message(exc.reason)
        _finish(runtime, job.id, message, attempt=job.attempts, reason=FailureReason.STORAGE)
        return
    meta = {**job.meta, "W": request.width, "H": request.height}
    if spec.safety_checker:
        meta["nsfw_content_detected"] = list(result.nsfw)
    if expires_at is not None:
        meta["temp_expires_at"] = expires_at.isoformat()
    meta["model_load_time"] = round(result.model_load_seconds, 3)
    success = Success(records, meta, result.pipeline_seconds)
    if not _record_success(runtime, job.id, success, attempt=job.attempts):
        log.warning("job %s was ended by another run: this run's files are deleted", job.id)
        _discard(runtime, [record.filename for record in records])


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


@dataclass(frozen=True)
class Success:
    """What a successful run records."""

    outputs: list[OutputRecord]
    meta: dict[str, object]
    generation_time: float


def _finish(
    runtime: WorkerRuntime,
    job_id: int,
    message: str,
    *,
    attempt: int | None,
    reason: FailureReason,
) -> None:
    """Commit the job's failure with its client-safe `message`, counted under `reason`, and its
    webhook row, published once that commits. With `attempt` (this run's claim), only while that
    claim holds it."""
    settings = runtime.settings

    def write() -> None:
        with session_scope(settings.resolved_database_url) as session:
            job = jobs.get_job(session, job_id)
            assert job is not None, "a claimed job cannot disappear"
            delivery_id = outcomes.fail(
                session, settings, job, message, reason=reason, attempt=attempt
            )
            webhook_service.publish(session, runtime.broker, settings, delivery_id)

    _retrying_database(settings, job_id, write)


def _record_success(runtime: WorkerRuntime, job_id: int, success: Success, *, attempt: int) -> bool:
    """Commit the job's success with its outputs and webhook row while this run's claim holds
    it, its delivery published once that commits. False if the job had ended or another claim
    holds it."""
    settings = runtime.settings

    def write() -> bool:
        with session_scope(settings.resolved_database_url) as session:
            job = jobs.get_job(session, job_id)
            assert job is not None, "a claimed job cannot disappear"
            delivery_id = outcomes.succeed(
                session,
                settings,
                job,
                outputs=success.outputs,
                meta=success.meta,
                generation_time=success.generation_time,
                attempt=attempt,
            )
            # This run's output rows exist only if it won: complete_job writes them. (Asked
            # this way, a retry after a commit whose answer was lost still knows it won.)
            won = jobs.get_output(session, success.outputs[0].filename) is not None
            if won and delivery_id is None:
                delivery = webhooks.get_delivery_for_job(session, job_id)
                delivery_id = delivery.id if delivery is not None else None
            webhook_service.publish(session, runtime.broker, settings, delivery_id)
            return won

    return _retrying_database(settings, job_id, write)


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


@contextmanager
def _heartbeat(claims: dict[int, int], settings: Settings) -> Iterator[None]:
    """Renew the leases of a batch's jobs while it runs, so the sweeper knows this worker is
    alive. `claims` maps each job id to its claim's attempt: a job that has ended, or that
    another claim took (this run stalled past its lease), is skipped by the update."""
    stop = threading.Event()
    interval = settings.job_lease_s / 3

    def beat() -> None:
        while not stop.wait(interval):
            try:
                with session_scope(settings.resolved_database_url) as session:
                    renewed = jobs.extend_leases(session, claims, settings.job_lease_s)
            except Exception:
                log.warning("lease renewal for jobs %s failed; will retry", list(claims))
                continue
            if renewed < len(claims):
                log.debug(
                    "jobs %s: %d of the leases are no longer this run's",
                    list(claims),
                    len(claims) - renewed,
                )

    thread = threading.Thread(target=beat, name=f"lease-{next(iter(claims))}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
