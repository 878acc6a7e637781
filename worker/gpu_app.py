"""The GPU worker's Celery app: consumes job ids from the jobs queue, one at a time.

Run with the solo pool (`darkroom worker`): CUDA must never be initialised in a process that
forks, and the model cache must live as long as the process.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import worker_ready
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from darkroom.queue import RUN_JOB_TASK, make_celery
from darkroom.settings import get_settings
from worker.jobs import WorkerRuntime, run_job
from worker.models.tiny import ensure_tiny_models

log = logging.getLogger(__name__)

settings = get_settings()
app = make_celery(settings, "darkroom-worker")

# Loading bars would flood the worker's log with one line per component.
diffusers_logging.disable_progress_bar()
transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

# The one piece of process-wide state: resident models survive between jobs.
runtime = WorkerRuntime(settings=settings, broker=app)


@app.task(name=RUN_JOB_TASK)
def run_job_task(job_id: int) -> None:
    """Thin shell: everything happens in worker.jobs.run_job."""
    run_job(job_id, runtime)


@worker_ready.connect
def _prepare_models(**_kwargs: Any) -> None:
    """Build the tiny preset's models before the first job rather than during it."""
    if settings.model_preset == "tiny":
        ensure_tiny_models(settings.tiny_models_dir)
        log.info("tiny models ready in %s", settings.tiny_models_dir)
