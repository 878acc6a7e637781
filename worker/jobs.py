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
winner's, and the run deletes them when it finds it lost. A run that died instead leaves them:
the claim that takes its expired job over (or fails it out of attempts) deletes them
(worker.dead_runs, in a thread), as the sweeper does when it hands such a job back or fails it.

Concluding a batch (its storage writes, one transaction for its successes, retries while the
storage or the database is away) is worker.recording's; the lease heartbeat
worker.job_leases'.

Batching (see docs/PERFORMANCE.md): after claiming the job it was sent, the worker claims up to
`max_batch - 1` more queued jobs with the same `batch_key` in one conditional UPDATE
(`jobs.claim_batch_companions`, FOR UPDATE SKIP LOCKED on Postgres, so two workers never take
the same job). Their own messages arrive later; this process acknowledges them without a claim
while it holds those jobs or once it recorded their success (worker.held).
Every job of the batch has its lease renewed and its progress recorded; a job whose init image
cannot be fetched, or whose request is refused, fails alone.

Cancel within a batch: the step hook (worker.step_progress, whose writes run off the
pipeline's thread) reads the cancel requests of every job of the batch. A
canceled job keeps computing with its batch mates (its samples cannot leave a running call) and
fails as canceled when the batch ends, without outputs; when every job of a running call is
canceled, the call stops at its next step.

Pipelining (`worker.overlap`, issue 15): with `runtime.overlap` set (`darkroom worker` sets it
unless `worker_pipeline` is false), a batch's init images are fetched in a thread pool; while its
pipeline call runs, the next batch of the same key is claimed ahead and prepared, and runs next
in the same task (`MAX_BATCHES_PER_TASK` at most); once its pipeline call ends, its conclusion
(the last cancel check, PNG encoding and storage writes in the pool, the terminal transactions)
runs in a background thread while the next batch (claimed ahead, or the next message's)
generates; the next conclusion waits for its images to be stored (worker.overlap). Without
`overlap` (the tests' runtimes, or `DARKROOM_WORKER_PIPELINE=false`), `run_job` returns only
once every job of the batch is recorded. The guarantees are the same either way: see
worker/overlap.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future

from pydantic import ValidationError

from darkroom.identities import FailureReason
from darkroom.jobspec import JobSpec, batch_key
from darkroom.logs import job_context
from darkroom.settings import Settings
from db.models import Job
from db.repositories import jobs
from db.repositories.jobs import ClaimOutcome
from db.session import session_scope
from services import outcomes
from services.outcomes import exhausted_message
from worker.batching import BatchStepHook, Outcome, generate_batch
from worker.bench_generator import fake_generate_batch, fake_generator_enabled
from worker.dead_runs import delete_unrecorded_files_soon
from worker.families import output_size as family_output_size
from worker.images import ImageInputError, fetch_images
from worker.pipelines.request import GenerationRequest, LoraSpec, StepHook
from worker.progress_hooks import BatchProgress
from worker.recording import INTERNAL_ERROR, TEMP_LIFETIME, conclude_batch, finish
from worker.runtime import Ready, WorkerRuntime
from worker.step_progress import ProgressHook

log = logging.getLogger(__name__)

__all__ = ["INTERNAL_ERROR", "MAX_BATCHES_PER_TASK", "TEMP_LIFETIME", "WorkerRuntime", "run_job"]

#: How often the first job of a batch looks for companions during `batch_window_ms`.
BATCH_POLL_S = 0.02
#: A batch claimed ahead: its jobs, and their requests once prepared.
_Ahead = tuple[list[tuple[Job, JobSpec]], list[Ready]]
#: Batches one task runs at most when pipelining (it claims the next ahead while one runs).
MAX_BATCHES_PER_TASK = 32


def run_job(job_id: int, runtime: WorkerRuntime) -> None:
    """Run job `job_id`, and compatible queued jobs beside it as one batch, to terminal states,
    unless another worker has it or it has ended. A message for a job this process holds or
    recorded as success is acknowledged without a claim (worker.held says why that is safe)."""
    if runtime.held.skips(job_id):
        log.debug("job %s is held or was ended by this worker: its message is acknowledged", job_id)
        return
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
        finish(runtime, job.id, INTERNAL_ERROR, attempt=job.attempts, reason=FailureReason.INTERNAL)
        return None


def _claim(job_id: int, runtime: WorkerRuntime) -> Job | None:
    """The job if this worker may run it now; fails it if it is out of attempts."""
    settings = runtime.settings
    since = time.monotonic()
    with session_scope(settings.resolved_database_url) as session:
        claim = jobs.take_job(
            session, job_id, lease_s=settings.job_lease_s, max_attempts=settings.job_max_attempts
        )
    outcome, job = claim.outcome, claim.job
    if outcome == ClaimOutcome.CLAIMED and job is not None:
        runtime.held.claimed([job_id], since)
    if claim.took_over and job is not None:  # the previous attempt's run died: its files go
        delete_unrecorded_files_soon(settings, runtime.storage, job.file_prefix, job.attempts - 1)
    if outcome == ClaimOutcome.CLAIMED and job is not None and job.cancel_requested_at:
        # canceled while it was orphaned
        finish(
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
        finish(
            runtime,
            job_id,
            exhausted_message(job.attempts),
            attempt=None,
            reason=FailureReason.WORKER_LOST,
        )  # no claim held
        # Its last run died (the sweeper, failing it first, would have deleted these too).
        delete_unrecorded_files_soon(settings, runtime.storage, job.file_prefix, job.attempts)
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
        since = time.monotonic()
        with session_scope(settings.resolved_database_url) as session:
            found = jobs.claim_batch_companions(
                session,
                leader_id=leader.id,
                batch_key=key,
                limit=wanted - len(claimed),
                lease_s=settings.job_lease_s,
                max_attempts=settings.job_max_attempts,
            )
        runtime.held.claimed((job.id for job in found), since)
        claimed += found
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
    prepared: list[Ready] | None = None
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
    prepared: list[Ready] | None,
    *,
    claim_ahead: bool = True,
) -> Future[_Ahead] | None:
    """Fetch each job's images (unless `prepared`), generate them together, and conclude each
    job on its own; when pipelining, the next batch claimed ahead during the call."""
    settings = runtime.settings
    ahead: Future[_Ahead] | None = None
    with runtime.leases.renewing({job.id: job.attempts for job, _spec in batch}):
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
        hook = ProgressHook(ids, settings, canceled, runtime.progress_writer, extras)
        with job_context(batch_job_ids=ids), extras:
            try:
                results = _generate(runtime, [item.request for item in ready], hook)
            finally:
                hook.flush()
        if overlap is None:
            conclude_batch(runtime, ready, results, canceled)
            return None
    # The next message is taken while this batch is stored, its leases renewed meanwhile
    # (until it is recorded: `stored` lets the next batch's storing begin before that).
    claims = {item.job.id: item.job.attempts for item in ready}

    def conclude(stored: Callable[[], None]) -> None:
        with runtime.leases.renewing(claims):
            conclude_batch(runtime, ready, results, canceled, stored)

    overlap.behind(conclude)
    return ahead


def _claim_ahead(runtime: WorkerRuntime, leader: Job, spec: JobSpec) -> _Ahead:
    """The next batch, claimed and prepared while the current one generates: up to `max_batch`
    queued jobs that share the leader's batch key (none without one)."""
    key = batch_key(spec)
    if key is None:
        return [], []
    settings = runtime.settings
    since = time.monotonic()
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
    runtime.held.claimed((job.id for job in claimed), since)
    log.info("job %s's batch claims jobs %s ahead", leader.id, [job.id for job in claimed])
    batch = []
    for job in claimed:
        with job_context(job_id=job.id, track_id=job.track_id):
            job_spec = _read_spec(runtime, job)
        if job_spec is not None:
            batch.append((job, job_spec))
    return batch, _prepare_all(runtime, batch)


def _prepare_all(runtime: WorkerRuntime, batch: list[tuple[Job, JobSpec]]) -> list[Ready]:
    """Each job's request with its init images (fetched in the pool when pipelining); the jobs
    that cannot be prepared are failed and left out."""
    if runtime.overlap is None or len(batch) < 2:
        prepared = [_prepare(runtime, job, spec) for job, spec in batch]
    else:
        prepared = runtime.overlap.fetch_map(lambda pair: _prepare(runtime, *pair), batch)
    return [item for item in prepared if item is not None]


def _generate(
    runtime: WorkerRuntime, requests: list[GenerationRequest], hook: BatchStepHook
) -> list[Outcome]:
    """The batch's pipeline calls (the benchmark's fake generator when both its settings ask)."""
    settings = runtime.settings
    if fake_generator_enabled(settings):
        return fake_generate_batch(requests, settings, hook)
    return generate_batch(requests, runtime.cache, settings, hook)


def _prepare(runtime: WorkerRuntime, job: Job, spec: JobSpec) -> Ready | None:
    """The job with its request built; None (and the job failed) when that is impossible.

    Only an ImageInputError's message is meant for the client (a rejected input); any other
    error, a bare ValueError included, carries a library's words and is logged as internal.
    """
    with job_context(job_id=job.id, track_id=job.track_id):
        try:
            return Ready(job, spec, _build_request(spec, runtime.settings))
        except ImageInputError as exc:
            finish(runtime, job.id, str(exc), attempt=job.attempts, reason=FailureReason.REJECTED)
        except Exception:
            log.exception("job %s failed", job.id)
            finish(
                runtime, job.id, INTERNAL_ERROR, attempt=job.attempts, reason=FailureReason.INTERNAL
            )
    return None


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
