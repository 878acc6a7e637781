"""One client's bad input never fails another's request: when the database refuses one row of a
group commit, the other submissions of the same group are stored and answered.

The groups are real: submissions from concurrent threads wait behind a first one that a table
lock holds at its INSERT, so they all form the next group (checked with `pending`). The refusals
are real too: values the API's checks may let through but the database cannot store.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from api.app import create_app
from api.errors import ApiError
from api.intake import GroupCommit
from api.schemas import Pix2PixRequest
from api.submission import (
    UNSTORABLE,
    Accepted,
    Outcome,
    PreparedJob,
    Replayed,
    prepare_job,
    store_jobs,
)
from api.waiting import listen_conninfo
from darkroom.queue import make_celery
from darkroom.settings import Settings
from db.models import Job
from db.repositories.keys import IssuedKey, create_key
from db.session import session_scope
from tests.api.test_submit import PIX2PIX, queued_job_ids
from tests.conftest import count_rows
from tests.support.threads import call_at_once

GROUP = 24


@contextmanager
def jobs_locked(database_url: str) -> Iterator[Callable[[], int]]:
    """Hold a lock that blocks every INSERT into jobs (reads go on) until the block ends; yields
    a count of the transactions waiting for it."""
    conninfo = listen_conninfo(database_url)
    assert conninfo is not None
    with psycopg.connect(conninfo) as conn:
        conn.execute("LOCK TABLE jobs IN EXCLUSIVE MODE")

        def blocked() -> int:
            row = conn.execute(
                "SELECT count(*) FROM pg_locks WHERE relation = 'jobs'::regclass AND NOT granted"
            ).fetchone()
            return int(row[0]) if row else 0

        try:
            yield blocked
        finally:
            conn.rollback()


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


class Recorder:
    """The real store function, recording the groups GroupCommit hands it."""

    def __init__(self, store: Callable[[Sequence[PreparedJob]], list[Outcome]]) -> None:
        self.store = store
        self.groups: list[int] = []

    def __call__(self, group: Sequence[PreparedJob]) -> list[Outcome]:
        self.groups.append(len(group))
        return self.store(group)


def in_one_group(
    database_url: str, intake: GroupCommit[Any, Any], first: Callable[[], Any], rest: list[Any]
) -> tuple[Any, list[Any]]:
    """Run `first`, hold it at its INSERT, run every callable of `rest` from its own thread;
    once they all wait behind it, let the INSERT go. The results (or raised exceptions)."""

    def call(function: Callable[[], Any]) -> Any:
        try:
            return function()
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(len(rest) + 1) as pool:
        with jobs_locked(database_url) as blocked:
            head: Future[Any] = pool.submit(call, first)
            wait_until(lambda: blocked() == 1)  # the first group is held at its INSERT
            futures = [pool.submit(call, function) for function in rest]
            wait_until(lambda: intake.pending() == len(rest))
        return head.result(timeout=30), [future.result(timeout=30) for future in futures]


def prepared(settings: Settings, key: IssuedKey, n: int) -> PreparedJob:
    """A valid pix2pix submission of `key`, told apart by its track_id."""
    request = Pix2PixRequest.model_validate({**PIX2PIX, "track_id": f"t{n}"})
    return prepare_job(settings, key.plaintext, request, "v5")


def with_track_id(job: PreparedJob, track_id: str) -> PreparedJob:
    """`job` with a track_id set after the API's checks."""
    return replace(job, spec=job.spec.model_copy(update={"track_id": track_id}))


def stored_prefixes(database_url: str) -> set[str]:
    with session_scope(database_url) as session:
        return set(session.scalars(select(Job.file_prefix)))


@pytest.mark.parametrize(
    "poison",
    [
        pytest.param(lambda job: with_track_id(job, "x" * 300), id="track_id-too-long"),
        pytest.param(lambda job: with_track_id(job, "a\ud800b"), id="track_id-surrogate"),
        pytest.param(
            lambda job: replace(job, webhook_url="http://127.0.0.1/\udfff"),
            id="webhook-surrogate",
        ),
    ],
)
def test_the_rest_of_a_group_is_stored_when_the_database_refuses_one_row(
    settings: Settings, api_key: IssuedKey, poison: Callable[[PreparedJob], PreparedJob]
) -> None:
    url = settings.resolved_database_url
    recorder = Recorder(partial(store_jobs, settings, make_celery(settings)))
    intake: GroupCommit[PreparedJob, Accepted | Replayed] = GroupCommit(recorder)
    items = [prepared(settings, api_key, n) for n in range(GROUP)]
    bad = GROUP // 3
    items[bad] = poison(items[bad])

    _, results = in_one_group(
        url,
        intake,
        partial(intake.submit, prepared(settings, api_key, -1)),
        [partial(intake.submit, item) for item in items],
    )

    assert recorder.groups == [1, GROUP]  # the refused row shared its group with all others
    refusal = results[bad]
    assert isinstance(refusal, ApiError)
    assert (refusal.status_code, refusal.message) == (422, UNSTORABLE)
    accepted = [result for n, result in enumerate(results) if n != bad]
    assert all(isinstance(result, Accepted) for result in accepted), accepted
    ids = {result.job.id for result in accepted}
    assert len(ids) == GROUP - 1
    prefixes = stored_prefixes(url)
    assert {item.file_prefix for n, item in enumerate(items) if n != bad} <= prefixes
    assert items[bad].file_prefix not in prefixes  # nothing of the refused one is stored
    assert ids <= set(queued_job_ids(settings))  # and every stored one was published


def test_through_the_api_only_the_client_whose_row_is_refused_gets_an_error(
    own_pg_url: str, settings: Settings
) -> None:
    """A real constraint refuses one row that passes every check of the API."""
    with session_scope(own_pg_url) as session:
        key = create_key(session, "isolation")
    conninfo = listen_conninfo(own_pg_url)
    assert conninfo is not None
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("ALTER TABLE jobs ADD CONSTRAINT no_poison CHECK (track_id <> 'poison')")
    own = settings.model_copy(update={"database_url": own_pg_url})
    bodies = [{**PIX2PIX, "key": key.plaintext, "track_id": f"t{n}"} for n in range(GROUP)]
    bodies[5]["track_id"] = "poison"

    with TestClient(create_app(own)) as client:
        intake = client.app.state.intake  # type: ignore[attr-defined]
        _, answers = in_one_group(
            own_pg_url,
            intake,
            partial(client.post, "/api/v5/pix2pix", json={**PIX2PIX, "key": key.plaintext}),
            [partial(client.post, "/api/v5/pix2pix", json=body) for body in bodies],
        )

    codes = [answer.status_code for answer in answers]
    assert codes == [200] * 5 + [422] + [200] * (GROUP - 6)
    assert answers[5].json() == {"status": "error", "message": UNSTORABLE}
    with session_scope(own_pg_url) as session:
        assert count_rows(session, "jobs", "track_id = 'poison'") == 0
        assert count_rows(session, "jobs") == GROUP  # the others and the first
    assert all(
        answer.json()["status"] == "processing" for n, answer in enumerate(answers) if n != 5
    )


def test_with_the_database_down_every_submission_gets_the_outage_not_a_refusal(
    settings: Settings, api_key: IssuedKey
) -> None:
    """No item is at fault: nothing is split or retried, each answer is the outage (503)."""
    down = settings.model_copy(
        update={"database_url": "postgresql+psycopg://postgres@127.0.0.1:1/none"}
    )
    attempts = []

    def store(group: Sequence[PreparedJob]) -> list[Outcome]:
        attempts.append(len(group))
        return store_jobs(down, make_celery(down), group)

    outcomes = store([prepared(settings, api_key, n) for n in range(4)])

    assert attempts == [4]
    assert all(isinstance(outcome, OperationalError) for outcome in outcomes)


def test_refused_and_valid_submissions_in_many_concurrent_groups(
    settings: Settings, api_key: IssuedKey
) -> None:
    """Under a burst with several bad rows, every valid submission is stored exactly once."""
    limited = settings.model_copy(update={"max_active_jobs_per_key": 1000})
    intake: GroupCommit[PreparedJob, Accepted | Replayed] = GroupCommit(
        partial(store_jobs, limited, make_celery(limited)), max_group=16
    )
    items = [prepared(settings, api_key, n) for n in range(48)]
    bad = {3, 17, 18, 40}
    for n in bad:
        items[n] = with_track_id(items[n], "y" * 201)
    results = call_at_once(intake.submit, items)

    refused = {n for n, result in enumerate(results) if isinstance(result, ApiError)}
    assert refused == bad
    prefixes = stored_prefixes(settings.resolved_database_url)
    for n, item in enumerate(items):
        assert (item.file_prefix in prefixes) == (n not in bad)
