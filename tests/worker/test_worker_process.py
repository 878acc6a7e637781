"""A real `darkroom worker` process: SIGTERM during a job finishes the job, then exits."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from darkroom.identities import Operation
from darkroom.jobspec import JobSpec
from darkroom.queue import RUN_JOB_TASK, make_celery, send
from darkroom.settings import Settings
from db.models import Job, JobState
from db.repositories.keys import IssuedKey
from db.session import session_scope
from tests.support.rows import queued_job
from tests.support.servers import ImageServer
from tests.support.system import settings_env

pytestmark = pytest.mark.slow


#: How long a worker may take to exit once its running job is recorded (Celery's warm
#: shutdown: withdraw its models, drain the pipeline, close the pool and the broker connection,
#: then the interpreter's exit with torch loaded). Measured 5-14 s at load 7-11 on 2 CPUs.
SHUTDOWN_BOUND_S = 60.0
#: How long the worker may take to start the job, and the job to run. Not what this test
#: measures (both scale with the machine's load): only a bound so that a hung worker fails the
#: test instead of CI.
JOB_PATIENCE_S = 600.0


def _job(settings: Settings, job_id: int) -> Job:
    with session_scope(settings.resolved_database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def _state(settings: Settings, job_id: int) -> JobState:
    return _job(settings, job_id).state


def _wait_for(what: str, done: Callable[[], bool], timeout_s: float, log: Path) -> float:
    """Poll `done` until it holds; the seconds it took (fails with the worker's log)."""
    started = time.monotonic()
    while not done():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{what}: not after {timeout_s:.0f} s\n{_tail(log)}")
        time.sleep(0.1)
    return time.monotonic() - started


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def test_sigterm_lets_the_running_job_finish(
    tmp_path: Path,
    settings: Settings,
    api_key: IssuedKey,
    image_server: ImageServer,
) -> None:
    """SIGTERM while a job is denoising: the job runs to its end and is recorded, then the
    worker exits 0 promptly. The job's own length is not measured; the exit after it is."""
    queue = f"test.jobs.{uuid.uuid4().hex[:8]}"
    spec = JobSpec(
        operation=Operation.IMG2IMG,
        prompt="a slow one",
        init_images=[image_server.url("/red.png")],
        width=512,
        height=512,
        steps=40,
        strength=1.0,
        guidance_scale=7.0,
        seed=3,
    )
    job_id = queued_job(settings, api_key.row.id, spec=spec, endpoint="enterprise")
    env = settings_env(settings.model_copy(update={"job_queue": queue}), tmp_path / "data")
    log_path = tmp_path / "worker.log"
    log = log_path.open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "worker"], env=env, stdout=log, stderr=log
    )
    try:
        assert send(
            make_celery(settings.model_copy(update={"job_queue": queue})), RUN_JOB_TASK, job_id
        )
        # Mid-denoising (a step recorded, the last not yet), not merely claimed.
        _wait_for(
            "job denoising", lambda: bool(_job(settings, job_id).progress), JOB_PATIENCE_S, log_path
        )
        worker.send_signal(signal.SIGTERM)
        assert (_job(settings, job_id).progress or 0) < 1.0, "the job ended before SIGTERM"
        ran = _wait_for(
            "job recorded",
            lambda: _state(settings, job_id) != JobState.PROCESSING,
            JOB_PATIENCE_S,
            log_path,
        )
        exit_started = time.monotonic()
        try:
            code = worker.wait(timeout=SHUTDOWN_BOUND_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker still running {SHUTDOWN_BOUND_S:.0f} s after its job ended\n"
                + _tail(log_path)
            ) from None
        print(
            f"\nSIGTERM: the job ran {ran:.1f} s more, the worker exited"
            f" {time.monotonic() - exit_started:.1f} s after it was recorded"
        )
    finally:
        if worker.poll() is None:
            worker.kill()
        log.close()

    logged = (tmp_path / "worker.log").read_text(errors="replace")
    assert code == 0, logged[-3000:]
    assert _state(settings, job_id) == JobState.SUCCESS, logged[-3000:]
    # torch, diffusers and the rest were frozen out of garbage collection before the first job.
    frozen = re.search(r"(\d+) start-up objects frozen out of garbage collection", logged)
    assert frozen is not None, logged[-3000:]
    assert int(frozen.group(1)) > 100_000
