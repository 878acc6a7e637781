"""The step hook writes off the pipeline's thread (worker.step_progress): a step never waits for
the database, the cancel requests the writer reads stop the call at a later step, and `flush`
waits for the write in flight.

The database is real; the write is held back by a row lock that another transaction keeps,
so "the hook returned while its write could not finish" involves no timing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select, update

from darkroom.settings import Settings
from db.models import Job, JobState, utcnow
from db.repositories.keys import IssuedKey
from db.session import session_scope
from tests.support.rows import job_row
from worker.step_progress import JobCanceledError, ProgressHook

#: How long a test waits for the writer before calling it stuck.
PATIENCE_S = 10.0


@pytest.fixture
def writer() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(1, thread_name_prefix="progress-writer")
    yield pool
    pool.shutdown(wait=True)


def running_jobs(settings: Settings, key: IssuedKey, count: int) -> list[int]:
    with session_scope(settings.resolved_database_url) as session:
        return [job_row(session, key.row.id, state=JobState.PROCESSING).id for _ in range(count)]


def progress_of(settings: Settings, job_ids: list[int]) -> list[float | None]:
    with session_scope(settings.resolved_database_url) as session:
        return list(session.scalars(select(Job.progress).where(Job.id.in_(job_ids))))


def test_a_step_returns_while_its_progress_write_waits_for_the_database(
    settings: Settings, api_key: IssuedKey, writer: ThreadPoolExecutor
) -> None:
    job_ids = running_jobs(settings, api_key, 2)
    hook = ProgressHook(job_ids, settings, set(), writer)
    locked, release = threading.Event(), threading.Event()

    def hold_the_rows() -> None:
        with session_scope(settings.resolved_database_url) as session:
            session.execute(select(Job.id).where(Job.id.in_(job_ids)).with_for_update()).all()
            locked.set()
            release.wait(PATIENCE_S)

    holder = threading.Thread(target=hold_the_rows)
    holder.start()
    try:
        assert locked.wait(PATIENCE_S)
        hook([0, 1], 1, 4)  # its UPDATE waits for the lock
        assert progress_of(settings, job_ids) == [None, None]  # not written yet
        hook([0, 1], 2, 4)  # due later, and the first write is still in flight: skipped
    finally:
        release.set()
        holder.join()
    hook.flush()
    assert progress_of(settings, job_ids) == [0.25, 0.25]


def test_cancel_requests_read_by_the_writer_stop_a_later_step(
    settings: Settings, api_key: IssuedKey, writer: ThreadPoolExecutor
) -> None:
    job_ids = running_jobs(settings, api_key, 2)
    canceled: set[int] = set()
    hook = ProgressHook(job_ids, settings, canceled, writer)
    with session_scope(settings.resolved_database_url) as session:
        session.execute(
            update(Job).where(Job.id == job_ids[0]).values(cancel_requested_at=utcnow())
        )

    hook([0, 1], 1, 2)  # the write reads the request
    hook.flush()
    assert canceled == {job_ids[0]}
    hook([0, 1], 2, 2)  # one of the call's jobs is still wanted: the call goes on
    with pytest.raises(JobCanceledError):
        hook([0], 2, 2)  # a call of only canceled jobs stops at once, without a write
