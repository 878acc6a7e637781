"""The GPU worker's Celery app: consumes job ids from the jobs queue, one at a time.

Run with the solo pool (`darkroom worker`): CUDA must never be initialised in a process that
forks, and the model cache must live as long as the process. Beside the general jobs queue it
consumes the queue of each model it holds (`worker.residency`).

Importing this module builds nothing: `create_worker_app(settings)` builds the app, its model
cache and its hooks, as `api.app.create_app` does for the API. The Celery command line
(`celery -A worker.gpu_app inspect ...`) finds `app`, built from the environment's settings
when first asked for.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down
from celery.worker.control import control_command
from diffusers.utils import logging as diffusers_logging
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from transformers.utils import logging as transformers_logging

from darkroom.celery_hooks import connect_replacing
from darkroom.heap import freeze_startup_objects
from darkroom.logs import install_celery_logging
from darkroom.metrics import serve_metrics_in_worker
from darkroom.queue import RUN_JOB_TASK, make_celery
from darkroom.settings import Settings, get_settings
from services.server import CLEAR_CACHE_COMMAND, NSFW_CHECK_COMMAND
from worker.jobs import WorkerRuntime, run_job
from worker.models.tiny import ensure_tiny_models
from worker.overlap import Overlap
from worker.residency import TrackedCache, WorkerAffinity
from worker.server_control import check_image

log = logging.getLogger(__name__)

#: What a database that cannot be reached raises (down, restarting, or every connection busy).
DATABASE_UNREACHABLE = (OperationalError, InterfaceError, PoolTimeoutError)

#: The ids under which the worker's lifecycle hooks are connected (one of each per process).
READY_HOOK = "darkroom.gpu_app.ready"
SHUTTING_DOWN_HOOK = "darkroom.gpu_app.shutting_down"
SHUTDOWN_HOOK = "darkroom.gpu_app.shutdown"


@dataclass(frozen=True)
class WorkerApp:
    """A GPU worker: its Celery app and what it keeps between jobs."""

    app: Celery
    runtime: WorkerRuntime
    affinity: WorkerAffinity

    @property
    def settings(self) -> Settings:
        """The settings this worker was built with."""
        return self.runtime.settings


def create_worker_app(settings: Settings) -> WorkerApp:
    """Build a GPU worker for `settings`: its app, task, control commands and signal hooks.

    The hooks are process-wide (Celery's signals and control commands): building a second
    worker in one process replaces the first one's hooks rather than adding to them.
    """
    app = make_celery(settings, "darkroom-worker")
    install_celery_logging(settings.log_format, settings.log_level)
    serve_metrics_in_worker(settings.worker_metrics_port, settings.metrics_host)
    # Loading bars would flood the worker's log with one line per component.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    # The one piece of process-wide state: resident models survive between jobs.
    cache = TrackedCache()
    worker = WorkerApp(
        app=app,
        runtime=WorkerRuntime(
            settings=settings,
            broker=app,
            cache=cache,
            # A batch's storing and recording overlap the next one's call (worker.overlap).
            overlap=Overlap() if settings.worker_pipeline else None,
        ),
        affinity=WorkerAffinity(settings, cache),
    )
    _register_task(worker)
    _register_control_commands(worker)
    _connect_lifecycle(worker)
    return worker


def _register_task(worker: WorkerApp) -> None:
    """The job task, on this app only (`shared=False`: other apps in the process lack it)."""
    settings, runtime, affinity = worker.settings, worker.runtime, worker.affinity

    @worker.app.task(name=RUN_JOB_TASK, bind=True, shared=False)
    def run_job_task(self: Task[[int], None], job_id: int) -> None:
        """Thin shell: everything happens in worker.jobs.run_job.

        A job that cannot reach the database (its claim raised) is not acknowledged: with acks
        late, a task that raises is acknowledged all the same and its message is gone until the
        sweeper notices, so the message goes back to its queue after a pause
        (`claim_retry_delay_s`, which keeps a worker from spinning while the database is
        down). Should the run have claimed the job before losing the database, the message
        comes back to a claim that refuses it (busy): harmless.
        """
        with affinity.tracking(job_id):
            try:
                run_job(job_id, runtime)
            except DATABASE_UNREACHABLE as exc:
                log.warning("job %s: database unreachable, message returned to the queue", job_id)
                time.sleep(settings.claim_retry_delay_s)
                raise Reject(exc, requeue=True) from exc


def _register_control_commands(worker: WorkerApp) -> None:
    """The server-management commands (services.server); registered by name, so a second
    worker's commands replace the first's."""
    settings, cache, affinity = worker.settings, worker.affinity.cache, worker.affinity

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


def _connect_lifecycle(worker: WorkerApp) -> None:
    """Prepare models when the worker is ready; withdraw its advertisement when it stops."""
    settings, affinity = worker.settings, worker.affinity

    def prepare_models(sender: Any, **_kwargs: Any) -> None:
        """Build the tiny preset's models before the first job rather than during it; then
        load the configured models and consume their queues."""
        if settings.model_preset == "tiny":
            ensure_tiny_models(settings.tiny_models_dir)
            log.info("tiny models ready in %s", settings.tiny_models_dir)
        # Everything is imported and no model is loaded yet: what exists now lives as long as
        # the process, and the collector need never walk it again.
        log.info("%d start-up objects frozen out of garbage collection", freeze_startup_objects())
        affinity.start(sender)

    def withdraw(**_kwargs: Any) -> None:
        """Stop advertising models as soon as shutdown begins, so new jobs go elsewhere, and
        claim no batch ahead (pipelining). No waiting here: this may interrupt a task."""
        affinity.stop()
        if worker.runtime.overlap is not None:
            worker.runtime.overlap.stopping.set()

    def finish(**_kwargs: Any) -> None:
        """Withdraw, then record the batch still being stored in the background."""
        withdraw()
        if worker.runtime.overlap is not None:
            worker.runtime.overlap.drain()

    connect_replacing(worker_ready, prepare_models, READY_HOOK)
    connect_replacing(worker_shutting_down, withdraw, SHUTTING_DOWN_HOOK)
    # A shutdown control command (restart_server) sends no `worker_shutting_down`: withdraw
    # on `worker_shutdown` too (withdrawing twice is harmless).
    connect_replacing(worker_shutdown, finish, SHUTDOWN_HOOK)


@functools.cache
def _command_line_worker() -> WorkerApp:
    """The worker the Celery command line gets, from the environment's settings; built once."""
    return create_worker_app(get_settings())


def __getattr__(name: str) -> Celery:
    """`app`, built on first access, for `celery -A worker.gpu_app`; nothing at import."""
    if name == "app":
        return _command_line_worker().app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
