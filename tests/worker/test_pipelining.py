"""The pipelined worker (worker.overlap): a batch is stored and recorded while the next batch's
pipeline call runs, and a crash between the call and the record still ends each job once.

The generator is the benchmark's fixed-time one (worker/bench_generator.py, 1 ms), so that the
tests observe the worker's ordering rather than diffusion; storage and the database are real.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update

from darkroom.queue import make_celery
from darkroom.settings import Settings
from darkroom.storage import Storage
from db.models import Job, JobOutput, JobState, utcnow
from db.repositories.keys import IssuedKey
from db.session import session_scope
from tests.support.rows import batchable_img2img_job
from tests.support.servers import ImageServer
from worker import jobs as worker_jobs
from worker.batching import BatchStepHook, Outcome
from worker.jobs import WorkerRuntime, run_job
from worker.overlap import Overlap
from worker.pipelines.request import GenerationRequest

#: How long one side of the handshake waits for the other: past it, the order is wrong.
HANDSHAKE_S = 5.0


class Crash(BaseException):
    """The worker process dying: nothing after it runs, nothing catches it."""


class Recorded:
    """Real storage whose writes are noted in a shared event list, with a callable run before
    each write (to hold it back, or to crash)."""

    def __init__(self, inner: Storage, events: list[tuple[str, Any]]) -> None:
        self.inner, self.events = inner, events
        self.before_save: Callable[[str], object] = lambda _filename: None

    def save(self, filename: str, data: bytes) -> None:
        """Run `before_save`, write, and note the write."""
        self.before_save(filename)
        self.inner.save(filename, data)
        self.events.append(("saved", filename))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def runtime(settings: Settings) -> Iterator[WorkerRuntime]:
    """A pipelined worker runtime with the fixed-time generator and batches of two."""
    fast = settings.model_copy(
        update={"max_batch": 2, "bench_fake_generator": True, "bench_fake_generator_ms": 1}
    )
    runtime = WorkerRuntime(settings=fast, broker=make_celery(fast), overlap=Overlap())
    yield runtime
    assert runtime.overlap is not None
    runtime.overlap.close()


def new_job(runtime: WorkerRuntime, key: IssuedKey, image_server: ImageServer) -> int:
    return batchable_img2img_job(
        runtime.settings, key.row.id, image_server.url("/blue.png"), prompt="pipelined"
    )


def states(runtime: WorkerRuntime, ids: list[int]) -> dict[int, tuple[JobState, int, int]]:
    """Each job's state, claim count and number of output rows."""
    with session_scope(runtime.settings.resolved_database_url) as session:
        outputs = dict(
            session.execute(
                select(JobOutput.job_id, func.count())
                .where(JobOutput.job_id.in_(ids))
                .group_by(JobOutput.job_id)
            ).all()
        )
        rows = session.execute(select(Job.id, Job.state, Job.attempts).where(Job.id.in_(ids)))
        return {
            job_id: (state, attempts, outputs.get(job_id, 0)) for job_id, state, attempts in rows
        }


def test_a_batch_is_stored_while_the_next_batch_generates(
    runtime: WorkerRuntime,
    api_key: IssuedKey,
    image_server: ImageServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events: list[tuple[str, Any]] = []
    storage = Recorded(runtime.storage, events)
    runtime.storage = storage
    second_generating = threading.Event()
    generate = worker_jobs._generate

    def observed(
        runtime: WorkerRuntime, requests: list[GenerationRequest], hook: BatchStepHook
    ) -> list[Outcome]:
        """The real generator, its start and end noted; the second batch's call lasts until
        a file has been written meanwhile (or the handshake gives up)."""
        batch = len([event for event in events if event[0] == "generate"]) + 1
        events.append(("generate", batch))
        if batch == 2:
            second_generating.set()
            written = len(events)
            deadline = time.monotonic() + HANDSHAKE_S
            while len(events) == written and time.monotonic() < deadline:
                time.sleep(0.01)
        outcomes = generate(runtime, requests, hook)
        events.append(("generated", batch))
        return outcomes

    # Until the second call has begun, writes wait for it: without pipelining they would wait
    # in vain (HANDSHAKE_S) and come before it.
    storage.before_save = lambda _filename: second_generating.wait(HANDSHAKE_S)
    monkeypatch.setattr(worker_jobs, "_generate", observed)
    first = [new_job(runtime, api_key, image_server) for _ in range(2)]
    second = [new_job(runtime, api_key, image_server) for _ in range(2)]

    run_job(first[0], runtime)  # batch 1: both first jobs; returns before they are stored
    run_job(second[0], runtime)  # batch 2
    assert runtime.overlap is not None
    runtime.overlap.drain()

    start, end = events.index(("generate", 2)), events.index(("generated", 2))
    assert events.index(("generated", 1)) < start
    assert any(event[0] == "saved" for event in events[start:end]), (
        f"no file of the first batch was stored during the second call: {events}"
    )
    assert not any(event[0] == "saved" for event in events[:start])
    done = states(runtime, first + second)
    assert done == {job_id: (JobState.SUCCESS, 1, 1) for job_id in first + second}


def test_a_crash_between_generating_and_recording_ends_each_job_once(
    runtime: WorkerRuntime,
    api_key: IssuedKey,
    image_server: ImageServer,
) -> None:
    ids = [new_job(runtime, api_key, image_server) for _ in range(2)]
    storage = Recorded(runtime.storage, [])
    runtime.storage = storage

    def crash(_filename: str) -> None:
        raise Crash

    storage.before_save = crash
    run_job(ids[0], runtime)  # generated; its conclusion dies in the background
    assert runtime.overlap is not None
    with pytest.raises(Crash):
        runtime.overlap.drain()
    assert states(runtime, ids) == {job_id: (JobState.PROCESSING, 1, 0) for job_id in ids}

    # The dead worker's leases run out; another worker (pipelined too) runs the jobs again.
    with session_scope(runtime.settings.resolved_database_url) as session:
        session.execute(
            update(Job).where(Job.id.in_(ids)).values(lease_until=utcnow() - timedelta(minutes=1))
        )
    survivor = WorkerRuntime(settings=runtime.settings, broker=runtime.broker, overlap=Overlap())
    try:
        for job_id in ids:
            run_job(job_id, survivor)
        assert survivor.overlap is not None
        survivor.overlap.drain()
        for job_id in ids:  # a message that arrives again changes nothing
            run_job(job_id, survivor)
        survivor.overlap.drain()
    finally:
        assert survivor.overlap is not None
        survivor.overlap.close()

    # Each job: success once, by the second claim, with its one output (none of the dead run's).
    assert states(runtime, ids) == {job_id: (JobState.SUCCESS, 2, 1) for job_id in ids}


def test_a_task_runs_the_batches_claimed_ahead_and_leaves_the_rest_queued(
    runtime: WorkerRuntime,
    api_key: IssuedKey,
    image_server: ImageServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_jobs, "MAX_BATCHES_PER_TASK", 2)
    ids = [new_job(runtime, api_key, image_server) for _ in range(6)]

    run_job(ids[0], runtime)  # batch [1, 2], then [3, 4] claimed ahead; [5, 6] not claimed
    assert runtime.overlap is not None
    runtime.overlap.drain()

    done = states(runtime, ids)
    assert [done[job_id] for job_id in ids[:4]] == [(JobState.SUCCESS, 1, 1)] * 4
    assert [done[job_id] for job_id in ids[4:]] == [(JobState.QUEUED, 0, 0)] * 2
    run_job(ids[4], runtime)  # their own messages run them
    runtime.overlap.drain()
    assert states(runtime, ids)[ids[5]] == (JobState.SUCCESS, 1, 1)
