"""Polls answered on the event loop (api/routes/fetch.py: PollReads) against the threaded path:
the same answers, the same isolation between keys, revocation within the key cache's delay,
and a fall back to the threaded path when the async connections die."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text, update
from sqlalchemy.orm import Session

from api.app import create_app
from api.routes.fetch import PollReads, QueueViews
from darkroom.settings import Settings
from db.models import Job
from db.repositories import jobs
from db.repositories.keys import IssuedKey, create_key, revoke_key
from db.session import session_scope
from tests.api.test_fetch import FETCH_PATHS, submit_pix2pix
from tests.conftest import key_row

BY_BODY = "/api/v1/enterprise/fetch"


@contextmanager
def serving(settings: Settings, **changes: Any) -> Iterator[TestClient]:
    """The app, with the queue view kept long enough that a slow machine's polls all share it
    (a stale view sends a poll down the threaded path, which the tests count)."""
    changed = settings.model_copy(update={"eta_cache_s": 10.0, **changes})
    with TestClient(create_app(changed)) as client:
        yield client


def reads_of(client: TestClient) -> PollReads:
    reads = client.app.state.poll_reads  # type: ignore[attr-defined]
    assert isinstance(reads, PollReads), "the tests' Postgres must get async poll reads"
    return reads


def poll(client: TestClient, key: IssuedKey, job_id: int, path: str) -> tuple[int, Any]:
    if path == BY_BODY:
        response = client.post(path, json={"key": key.plaintext, "request_id": job_id})
    else:
        response = client.post(path.format(id=job_id), json={"key": key.plaintext})
    return response.status_code, response.json()


def polled_both_ways(
    fast: TestClient, threaded: TestClient, key: IssuedKey, job_id: int, path: str
) -> tuple[Any, Any]:
    """The same poll on each app, the fast one's answered on the event loop (its first poll
    only fills the key cache), both within the shared queue view's second."""
    poll(fast, key, job_id, path)
    before = reads_of(fast).answered
    slow_answer = poll(threaded, key, job_id, path)
    fast_answer = poll(fast, key, job_id, path)
    assert reads_of(fast).answered == before + 1
    return fast_answer, slow_answer


def test_queued_and_running_polls_answer_as_the_threaded_path(
    settings: Settings, api_key: IssuedKey, db: Session
) -> None:
    with serving(settings) as fast, serving(settings, db_poll_pool_size=0) as threaded:
        assert threaded.app.state.poll_reads is None  # type: ignore[attr-defined]
        job_id = submit_pix2pix(fast, api_key)
        for path in [*FETCH_PATHS, BY_BODY]:
            fast_answer, slow_answer = polled_both_ways(fast, threaded, api_key, job_id, path)
            assert fast_answer == slow_answer
            assert fast_answer[0] == 200
            assert fast_answer[1]["status"] == "processing"

        outcome, _job = jobs.claim_job(db, job_id, lease_s=60, max_attempts=3)
        assert outcome == jobs.ClaimOutcome.CLAIMED
        db.execute(update(Job).where(Job.id == job_id).values(progress=0.4))
        db.commit()
        fast_answer, slow_answer = polled_both_ways(fast, threaded, api_key, job_id, FETCH_PATHS[1])
        # A running job's eta is its pace (seconds since its claim / progress): it moves between
        # the two polls, so only it may differ, and by no more than that.
        fast_eta, slow_eta = fast_answer[1].pop("eta"), slow_answer[1].pop("eta")
        assert fast_eta == pytest.approx(slow_eta, abs=0.5)
        assert fast_answer == slow_answer
        assert fast_answer[1]["progress"] == 0.4


def test_another_keys_job_and_a_finished_job_take_the_threaded_path(
    settings: Settings, api_key: IssuedKey, db: Session
) -> None:
    with session_scope(settings.resolved_database_url) as session:
        other = create_key(session, "fast-poll-other")
    with serving(settings) as fast:
        job_id = submit_pix2pix(fast, api_key)
        poll(fast, other, job_id, FETCH_PATHS[1])  # fills the cache with the other key
        before = reads_of(fast).answered
        status, answer = poll(fast, other, job_id, FETCH_PATHS[1])
        assert status == 404
        assert str(job_id) in answer["message"]
        assert reads_of(fast).answered == before

        db.execute(update(Job).where(Job.id == job_id).values(state="failed", error="nope"))
        db.commit()
        status, answer = poll(fast, api_key, job_id, FETCH_PATHS[1])
        assert (status, answer["status"], answer["message"]) == (200, "failed", "nope")
        assert reads_of(fast).answered == before


def test_a_revoked_key_stops_within_the_key_cache_delay(
    settings: Settings, api_key: IssuedKey, db: Session
) -> None:
    with serving(settings, api_key_cache_s=0.3) as fast:
        job_id = submit_pix2pix(fast, api_key)
        assert poll(fast, api_key, job_id, FETCH_PATHS[1])[0] == 200
        assert poll(fast, api_key, job_id, FETCH_PATHS[1])[0] == 200
        revoke_key(db, key_row(db, api_key))
        db.commit()
        time.sleep(0.4)
        status, _answer = poll(fast, api_key, job_id, FETCH_PATHS[1])
        assert status == 401


def test_dead_async_connections_fall_back_then_reconnect(
    settings: Settings, api_key: IssuedKey, db: Session
) -> None:
    with serving(settings) as fast:
        job_id = submit_pix2pix(fast, api_key)
        poll(fast, api_key, job_id, FETCH_PATHS[1])  # fills the key cache and the view
        before = reads_of(fast).answered
        fast_answer = poll(fast, api_key, job_id, FETCH_PATHS[1])
        assert reads_of(fast).answered == before + 1
        killed = db.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE pid <> pg_backend_pid() AND datname = current_database()"
                " AND query LIKE 'SELECT jobs.id, jobs.state, jobs.operation%'"
            )
        ).all()
        db.commit()
        assert killed, "the async read's connection should have been found"
        before = reads_of(fast).answered
        status, answer = poll(fast, api_key, job_id, FETCH_PATHS[1])
        assert status == 200
        assert answer["status"] == "processing"
        assert answer["id"] == fast_answer[1]["id"]
        assert reads_of(fast).answered == before  # the threaded path answered that one
        poll(fast, api_key, job_id, FETCH_PATHS[1])
        assert reads_of(fast).answered == before + 1  # and a new connection the next


def test_one_poll_re_reads_a_stale_queue_view_while_the_others_keep_the_last(
    settings: Settings, db: Session
) -> None:
    views = QueueViews()
    quick = settings.model_copy(update={"eta_cache_s": 0.2})
    assert views.for_event_loop(quick) is None  # no view yet: the threaded path reads one
    first = views.get(db, quick, 1)
    assert views.for_event_loop(quick) is first
    time.sleep(0.25)
    assert views.for_event_loop(quick) is None  # this poll re-reads it, on the threaded path
    assert views.for_event_loop(quick) is first  # the others meanwhile answer from the last
    second = views.get(db, quick, 1)
    assert second is not first
    assert views.for_event_loop(quick) is second
    time.sleep(0.45)  # the claim lapsed (its poll never re-read: a finished job, say)
    assert views.for_event_loop(quick) is None
