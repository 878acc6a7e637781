"""A run whose database goes away as it ends records its result once the database is back,
within `finish_retry_s`, from the images it holds: the pipeline does not run again.

The database is a Postgres cluster of the test's own (the shared one is never stopped). The
moment is made deterministic with a storage fault: the worker's first output write fails (the
outputs folder is a file), and while it waits to try again the test stops the database, frees
the folder and restarts the database two seconds later: the write then succeeds and the
terminal write meets a database that is down.
"""

from __future__ import annotations

import logging
import threading
import uuid
from pathlib import Path

import pytest

from darkroom.settings import Settings
from db.migrate import upgrade_to_head
from db.models import JobState
from db.repositories import jobs
from db.repositories.keys import create_key
from db.session import session_factory, session_scope
from tests.support.instances import owned_postgres
from tests.support.servers import ImageServer
from tests.support.system import free_port
from tests.worker.test_storage_faults import new_job, own_runtime, pipeline_runs
from worker.jobs import run_job
from worker.models.cache import ModelCache

DOWN_FOR_S = 2.0


def test_a_finished_job_is_recorded_once_the_database_is_back(
    tmp_path: Path,
    settings: Settings,
    tiny_settings: Settings,
    model_cache: ModelCache,
    image_server: ImageServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with owned_postgres(free_port()) as cluster:
        url = cluster.create_database(f"finish_{uuid.uuid4().hex[:8]}")
        upgrade_to_head(url)
        with session_scope(url) as session:
            key = create_key(session, "finish")
        runtime = own_runtime(
            settings, tiny_settings, model_cache, tmp_path / "data", database_url=url
        )
        outputs = runtime.settings.outputs_dir
        outputs.rmdir()
        outputs.write_bytes(b"")
        job_id = new_job(runtime.settings, key, image_server.url("/red.png"))
        restart: list[threading.Timer] = []

        class Outage(logging.Handler):
            """On the first write retry: the database goes down, the folder comes back."""

            def emit(self, record: logging.LogRecord) -> None:
                if record.getMessage().startswith("writing output ") and not restart:
                    cluster.stop()
                    outputs.unlink()
                    outputs.mkdir()
                    restart.append(threading.Timer(DOWN_FOR_S, cluster.start))
                    restart[0].start()

        outage = Outage()
        logging.getLogger("worker.recording").addHandler(outage)
        runs = pipeline_runs()
        try:
            with caplog.at_level(logging.WARNING, logger="worker.recording"):
                run_job(job_id, runtime)
        finally:
            logging.getLogger("worker.recording").removeHandler(outage)
            for timer in restart:
                timer.join()
        session_factory(url).kw["bind"].dispose()  # connections from before the restart

        with session_scope(url) as session:
            job = jobs.get_job(session, job_id)
            assert job is not None
            assert (job.state, job.attempts, len(job.outputs)) == (JobState.SUCCESS, 1, 2)
            stored = sorted(out.filename for out in job.outputs)
        assert pipeline_runs() - runs == 1
        assert sorted(p.name for p in outputs.iterdir()) == stored
        assert any("database is unreachable" in r.getMessage() for r in caplog.records)
