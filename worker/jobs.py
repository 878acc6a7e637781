"""Running one job: claim it, generate, store the images, record the outcome, notify.

`run_job` is a plain function (the Celery task is a thin shell around it), safe to call twice
with the same id: the claim lets one worker at a time run a job, outputs are written under
stable names, and the terminal transition happens once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

from celery import Celery
from pydantic import ValidationError

from darkroom import outcomes
from darkroom.jobspec import JobSpec
from darkroom.outcomes import exhausted_message
from darkroom.queue import DELIVER_WEBHOOK_TASK, send
from darkroom.responses import output_filename
from darkroom.settings import Settings
from darkroom.storage import Storage, make_storage
from db.models import Job, utcnow
from db.repositories import jobs
from db.repositories.jobs import ClaimOutcome, OutputRecord
from db.session import session_scope
from worker.images import ImageInputError, fetch_image, output_size, png_bytes
from worker.models.cache import ModelCache
from worker.pipelines.generate import generate
from worker.pipelines.request import GenerationRequest, GenerationResult, LoraSpec

log = logging.getLogger(__name__)

#: How long `temp: yes` output links work; the sweeper deletes the files afterwards.
TEMP_LIFETIME = timedelta(hours=24)
#: How often a running job records its progress and looks for a cancel request, at most.
PROGRESS_INTERVAL_S = 0.5
INTERNAL_ERROR = "The image could not be generated because of an internal error."


@dataclass
class WorkerRuntime:
    """What a worker process keeps between jobs: settings, resident models, storage, broker."""

    settings: Settings
    broker: Celery
    cache: ModelCache = field(default_factory=ModelCache)
    storage: Storage = field(init=False)

    def __post_init__(self) -> None:
        self.storage = make_storage(self.settings)


def run_job(job_id: int, runtime: WorkerRuntime) -> None:
    """Run job `job_id` to a terminal state, unless another worker has it or it has ended."""
    job = _claim(job_id, runtime)
    if job is None:
        return
    try:
        spec = JobSpec.model_validate(job.params)
    except ValidationError:
        log.exception("job %s has unreadable parameters", job_id)
        _finish(runtime, job_id, INTERNAL_ERROR)
        return
    try:
        with _heartbeat(job_id, runtime.settings):
            request = _build_request(spec, runtime.settings, _step_hook(job_id, runtime.settings))
            result = generate(request, runtime.cache, runtime.settings)
    except JobCanceledError:
        _finish(runtime, job_id, outcomes.CANCELED_MESSAGE)
        return
    except (ImageInputError, ValueError) as exc:
        _finish(runtime, job_id, str(exc))
        return
    except Exception:
        log.exception("job %s failed", job_id)
        _finish(runtime, job_id, INTERNAL_ERROR)
        return
    _store_and_finish(runtime, job, spec, request, result)


def _claim(job_id: int, runtime: WorkerRuntime) -> Job | None:
    """The job if this worker may run it now; fails it if it is out of attempts."""
    settings = runtime.settings
    with session_scope(settings.resolved_database_url) as session:
        outcome, job = jobs.claim_job(
            session, job_id, lease_s=settings.job_lease_s, max_attempts=settings.job_max_attempts
        )
    if outcome == ClaimOutcome.CLAIMED and job is not None and job.cancel_requested_at:
        _finish(runtime, job_id, outcomes.CANCELED_MESSAGE)  # canceled while it was orphaned
        return None
    if outcome == ClaimOutcome.CLAIMED:
        return job
    log.info("job %s not run here: %s", job_id, outcome)
    if outcome == ClaimOutcome.EXHAUSTED and job is not None:
        _finish(runtime, job_id, exhausted_message(job.attempts))
    return None


class JobCanceledError(Exception):
    """Raised between denoising steps when the job's cancel was requested."""


def _step_hook(job_id: int, settings: Settings) -> Callable[[int, int], None]:
    """An `on_step` hook that records progress and raises JobCanceledError once a cancel is
    recorded. It touches the database at most twice a second, so a fast model is not slowed."""
    last_write = 0.0

    def on_step(done: int, total: int) -> None:
        nonlocal last_write
        if time.monotonic() - last_write < PROGRESS_INTERVAL_S:
            return
        last_write = time.monotonic()
        with session_scope(settings.resolved_database_url) as session:
            jobs.record_progress(session, [job_id], min(done / max(total, 1), 1.0))
            if jobs.cancel_requested(session, job_id):
                raise JobCanceledError

    return on_step


def _build_request(
    spec: JobSpec, settings: Settings, on_step: Callable[[int, int], None] | None = None
) -> GenerationRequest:
    """Fetch the init images and settle the output size."""
    images = tuple(fetch_image(url, settings) for url in spec.init_images)
    width, height = output_size(spec.width, spec.height, images[0])
    return GenerationRequest(
        operation=spec.operation.value,
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
) -> None:
    """Write the images under their stable names, then record success with them."""
    expires_at = utcnow() + TEMP_LIFETIME if spec.temp else None
    records = []
    samples = zip(result.images, spec.seeds, result.nsfw, strict=True)
    for index, (image, seed, nsfw) in enumerate(samples):
        name = output_filename(job, index)
        runtime.storage.save(name, png_bytes(image))
        records.append(OutputRecord(index, name, image.width, image.height, seed, nsfw, expires_at))
    meta = {**job.meta, "W": request.width, "H": request.height}
    if spec.safety_checker:
        meta["nsfw_content_detected"] = list(result.nsfw)
    if expires_at is not None:
        meta["temp_expires_at"] = expires_at.isoformat()
    meta["model_load_time"] = round(result.model_load_seconds, 3)
    _finish(runtime, job.id, Success(records, meta, result.pipeline_seconds))


@dataclass(frozen=True)
class Success:
    """What a successful run records."""

    outputs: list[OutputRecord]
    meta: dict[str, object]
    generation_time: float


def _finish(runtime: WorkerRuntime, job_id: int, outcome: Success | str) -> None:
    """Commit the terminal state with its webhook row, then publish the delivery.

    `outcome` is the success, or the client-safe failure message.
    """
    settings = runtime.settings
    with session_scope(settings.resolved_database_url) as session:
        job = jobs.get_job(session, job_id)
        assert job is not None, "a claimed job cannot disappear"
        if isinstance(outcome, str):
            delivery_id = outcomes.fail(session, settings, job, outcome)
        else:
            delivery_id = outcomes.succeed(
                session,
                settings,
                job,
                outputs=outcome.outputs,
                meta=outcome.meta,
                generation_time=outcome.generation_time,
            )
    _notify(runtime.broker, delivery_id)


def _notify(broker: Celery, delivery_id: int | None) -> None:
    """Publish the delivery after commit; if the broker is down the sweeper sends it later."""
    if delivery_id is not None:
        send(broker, DELIVER_WEBHOOK_TASK, delivery_id)


@contextmanager
def _heartbeat(job_id: int, settings: Settings) -> Iterator[None]:
    """Renew the job's lease while it runs, so the sweeper knows this worker is alive."""
    stop = threading.Event()
    interval = settings.job_lease_s / 3

    def beat() -> None:
        while not stop.wait(interval):
            try:
                with session_scope(settings.resolved_database_url) as session:
                    jobs.extend_lease(session, job_id, settings.job_lease_s)
            except Exception:
                log.warning("lease renewal for job %s failed; will retry", job_id)

    thread = threading.Thread(target=beat, name=f"lease-{job_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
