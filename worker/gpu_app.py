"""The GPU worker's Celery app: consumes job ids from the jobs queue, one at a time.

Run with the solo pool (`darkroom worker`): CUDA must never be initialised in a process that
forks, and the model cache must live as long as the process. Beside the general jobs queue it
consumes the queue of each model it holds (`worker.residency`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task
from celery.exceptions import Reject
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down
from celery.worker.control import control_command
from diffusers.utils import logging as diffusers_logging
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from transformers.utils import logging as transformers_logging

from darkroom.logs import install_celery_logging
from darkroom.metrics import serve_metrics_in_worker
from darkroom.queue import RUN_JOB_TASK, make_celery
from darkroom.settings import get_settings
from services.server import CLEAR_CACHE_COMMAND, NSFW_CHECK_COMMAND
from worker.jobs import WorkerRuntime, run_job
from worker.models.tiny import ensure_tiny_models
from worker.residency import TrackedCache, WorkerAffinity
from worker.server_control import check_image

log = logging.getLogger(__name__)

settings = get_settings()
app = make_celery(settings, "darkroom-worker")
install_celery_logging(settings.log_format, settings.log_level)
serve_metrics_in_worker(settings.worker_metrics_port, settings.metrics_host)

# Loading bars would flood the worker's log with one line per component.
diffusers_logging.disable_progress_bar()
transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

# The one piece of process-wide state: resident models survive between jobs.
cache = TrackedCache()
runtime = WorkerRuntime(settings=settings, broker=app, cache=cache)
affinity = WorkerAffinity(settings, cache)


#: What a database that cannot be reached raises (down, restarting, or every connection busy).
DATABASE_UNREACHABLE = (OperationalError, InterfaceError, PoolTimeoutError)


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job_task(self: Task[[int], None], job_id: int) -> None:
    """Thin shell: everything happens in worker.jobs.run_job.

    A job that cannot reach the database (its claim raised) is not acknowledged: with acks late,
    a task that raises is acknowledged all the same and its message is gone until the sweeper
    notices, so the message goes back to its queue after a pause (`claim_retry_delay_s`, which
    keeps a worker from spinning while the database is down). Should the run have claimed the
    job before losing the database, the message comes back to a claim that refuses it (busy):
    harmless.
    """
    with affinity.tracking(job_id):
        try:
            run_job(job_id, runtime)
        except DATABASE_UNREACHABLE as exc:
            log.warning("job %s: database unreachable, message returned to the queue", job_id)
            time.sleep(settings.claim_retry_delay_s)
            raise Reject(exc, requeue=True) from exc


@control_command(name=CLEAR_CACHE_COMMAND)
def _clear_cache(_state: Any, **_kwargs: Any) -> dict[str, Any]:
    """clear_cache: drop resident models between jobs; they load again on demand."""
    dropped = affinity.clear_models()
    log.info("cache cleared on request: %d models dropped", dropped)
    return {"ok": f"{dropped} models dropped", "dropped": dropped}


@control_command(name=NSFW_CHECK_COMMAND, args=[("url", str)])
def _nsfw_check(_state: Any, url: str = "", **_kwargs: Any) -> dict[str, Any]:
    """nsfw_image_check: the safety checker's verdict on one image URL, between jobs."""
    return check_image(url, settings, cache)


@worker_ready.connect
def _prepare_models(sender: Any, **_kwargs: Any) -> None:
    """Build the tiny preset's models before the first job rather than during it; then load
    the configured models and consume their queues."""
    if settings.model_preset == "tiny":
        ensure_tiny_models(settings.tiny_models_dir)
        log.info("tiny models ready in %s", settings.tiny_models_dir)
    affinity.start(sender)


@worker_shutting_down.connect
def _withdraw(**_kwargs: Any) -> None:
    """Stop advertising models as soon as shutdown begins, so new jobs go elsewhere."""
    affinity.stop()


@worker_shutdown.connect
def _withdraw_on_remote_shutdown(**_kwargs: Any) -> None:
    """A shutdown control command (restart_server) sends no `worker_shutting_down`: withdraw
    here too (withdrawing twice is harmless)."""
    affinity.stop()
