"""A real `darkroom worker` process: SIGTERM during a job finishes the job, then exits."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
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


def _state(settings: Settings, job_id: int) -> JobState:
    with session_scope(settings.resolved_database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.state


def test_sigterm_lets_the_running_job_finish(
    tmp_path: Path,
    settings: Settings,
    api_key: IssuedKey,
    image_server: ImageServer,
) -> None:
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
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "worker"], env=env, stdout=log, stderr=log
    )
    try:
        assert send(
            make_celery(settings.model_copy(update={"job_queue": queue})), RUN_JOB_TASK, job_id
        )
        deadline = time.monotonic() + 120
        while _state(settings, job_id) == JobState.QUEUED and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _state(settings, job_id) == JobState.PROCESSING

        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=120)
    finally:
        if worker.poll() is None:
            worker.kill()
        log.close()

    logged = (tmp_path / "worker.log").read_text(errors="replace")
    assert code == 0, logged[-3000:]
    assert _state(settings, job_id) == JobState.SUCCESS, logged[-3000:]
