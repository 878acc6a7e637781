"""Messages of jobs this worker process holds or recorded as success are acknowledged without a
claim (worker.held), and every message that must still run its job does: after the process
released it (its conclusion failed and its lease ran out), after a failure and a requeue, and
once the claim's lease is over. Real Postgres, storage and image host; the fixed-time generator.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, update

from darkroom.queue import make_celery
from darkroom.settings import Settings
from db.models import Job, JobState, utcnow
from db.repositories.keys import IssuedKey
from db.session import session_scope
from services import jobs as job_service
from tests.support.rows import batchable_img2img_job
from tests.support.servers import ImageServer
from worker.held import HeldJobs
from worker.jobs import WorkerRuntime, run_job
from worker.overlap import Overlap


@pytest.fixture(params=[False, True], ids=["serial", "pipelined"])
def runtime(settings: Settings, request: pytest.FixtureRequest) -> Iterator[WorkerRuntime]:
    """A worker runtime with the fixed-time generator and batches of two."""
    fast = settings.model_copy(
        update={"max_batch": 2, "bench_fake_generator": True, "bench_fake_generator_ms": 1}
    )
    overlap = Overlap() if request.param else None
    runtime = WorkerRuntime(settings=fast, broker=make_celery(fast), overlap=overlap)
    yield runtime
    if overlap is not None:
        overlap.close()


def settle(runtime: WorkerRuntime) -> None:
    """Wait for the pending conclusion, when pipelining."""
    if runtime.overlap is not None:
        runtime.overlap.drain()


def new_job(runtime: WorkerRuntime, key: IssuedKey, image_url: str) -> int:
    return batchable_img2img_job(runtime.settings, key.row.id, image_url, prompt="held")


def row(runtime: WorkerRuntime, job_id: int) -> tuple[JobState, int]:
    with session_scope(runtime.settings.resolved_database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.state, job.attempts


@pytest.fixture
def statements() -> Iterator[list[str]]:
    """Every SQL statement this process sends meanwhile."""
    sent: list[str] = []

    def note(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(statement)

    event.listen(Engine, "before_cursor_execute", note)
    yield sent
    event.remove(Engine, "before_cursor_execute", note)


def test_a_companions_message_is_acknowledged_without_the_database(
    runtime: WorkerRuntime,
    api_key: IssuedKey,
    image_server: ImageServer,
    statements: list[str],
) -> None:
    ids = [new_job(runtime, api_key, image_server.url("/blue.png")) for _ in range(2)]
    run_job(ids[0], runtime)  # the batch: both jobs
    settle(runtime)
    assert [row(runtime, job_id) for job_id in ids] == [(JobState.SUCCESS, 1)] * 2

    statements.clear()
    run_job(ids[1], runtime)  # the companion's own message
    settle(runtime)
    assert statements == []


def test_a_job_left_to_its_lease_runs_when_its_message_comes_again(
    runtime: WorkerRuntime, api_key: IssuedKey, image_server: ImageServer
) -> None:
    ids = [new_job(runtime, api_key, image_server.url("/blue.png")) for _ in range(2)]
    save = runtime.storage.save

    def broken(_name: str, _data: bytes) -> None:
        raise RuntimeError("not a storage fault: the job is left to its lease")

    runtime.storage.save = broken  # type: ignore[method-assign,assignment]
    run_job(ids[0], runtime)
    settle(runtime)
    assert [row(runtime, job_id) for job_id in ids] == [(JobState.PROCESSING, 1)] * 2

    # Its lease runs out; the sweeper's message for each job reaches this same process.
    runtime.storage.save = save  # type: ignore[method-assign]
    with session_scope(runtime.settings.resolved_database_url) as session:
        session.execute(
            update(Job).where(Job.id.in_(ids)).values(lease_until=utcnow() - timedelta(minutes=1))
        )
    for job_id in ids:
        run_job(job_id, runtime)
    settle(runtime)
    assert [row(runtime, job_id) for job_id in ids] == [(JobState.SUCCESS, 2)] * 2


def test_a_failed_job_that_is_requeued_runs_again_here(
    runtime: WorkerRuntime, api_key: IssuedKey, image_server: ImageServer
) -> None:
    job_id = new_job(runtime, api_key, image_server.url("/missing.png"))
    run_job(job_id, runtime)  # its init image cannot be fetched: failed
    settle(runtime)
    assert row(runtime, job_id) == (JobState.FAILED, 1)

    with session_scope(runtime.settings.resolved_database_url) as session:
        job_service.requeue(session, runtime.broker, runtime.settings, job_id)
    assert row(runtime, job_id) == (JobState.QUEUED, 0)
    run_job(job_id, runtime)  # the requeue's message
    settle(runtime)
    assert row(runtime, job_id) == (JobState.FAILED, 1)  # claimed and run again


def test_an_entry_is_trusted_for_one_lease_from_its_claim() -> None:
    held = HeldJobs(lease_s=60)
    now = time.monotonic()
    held.claimed([1], since=now)
    held.claimed([2], since=now - 61)  # its claim's lease is over: another worker may hold it
    assert (held.skips(1), held.skips(2), held.skips(3)) == (True, False, False)
    held.released([1])
    assert not held.skips(1)


def test_successes_are_remembered_and_the_oldest_forgotten() -> None:
    held = HeldJobs(lease_s=60, remembered=2)
    held.claimed([1, 2, 3], since=time.monotonic())
    held.succeeded([1, 2, 3])
    held.released([2, 3])  # a success is final: releasing it changes nothing
    assert [held.skips(job_id) for job_id in (1, 2, 3)] == [False, True, True]
