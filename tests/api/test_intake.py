"""Group commit of submissions: concurrent submissions share one transaction, each still gets
its own answer, and the limits hold as if they had come one by one."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from api.app import create_app
from api.intake import GroupCommit
from darkroom.settings import Settings
from db.repositories.keys import IssuedKey
from db.session import session_factory
from tests.api.test_submit import PIX2PIX, post, queued_job_ids
from tests.support.threads import call_at_once


class SlowDoubler:
    """A store function that doubles numbers, refuses negative ones and records its groups;
    its first call is slow, so that everything submitted meanwhile forms the second group."""

    def __init__(self) -> None:
        self.groups: list[list[int]] = []

    def __call__(self, items: Sequence[int]) -> list[int | BaseException]:
        self.groups.append(list(items))
        if len(self.groups) == 1:
            time.sleep(0.3)
        return [ValueError(f"negative: {n}") if n < 0 else n * 2 for n in items]


def submit_all(intake: GroupCommit[int, int], numbers: list[int]) -> list[Any]:
    """Submit every number from its own thread at once; each result or raised exception."""
    return call_at_once(intake.submit, numbers)


def test_submissions_waiting_for_a_group_are_stored_together_with_their_own_results() -> None:
    store = SlowDoubler()
    numbers = list(range(1, 13))
    results = submit_all(GroupCommit(store, max_storing=1), numbers)

    assert results == [n * 2 for n in numbers]
    assert sorted(n for group in store.groups for n in group) == numbers  # each stored once
    assert len(store.groups) == 2  # one alone, then all that waited meanwhile
    assert len(store.groups[1]) == len(numbers) - 1


def test_a_refused_item_fails_only_its_own_submitter() -> None:
    results = submit_all(GroupCommit(SlowDoubler()), [1, -2, 3, -4])

    assert (results[0], results[2]) == (2, 6)
    assert [str(results[i]) for i in (1, 3)] == ["negative: -2", "negative: -4"]


def test_a_store_that_fails_as_a_whole_fails_every_submitter_and_the_next_group_runs() -> None:
    calls = 0

    def flaky(items: Sequence[int]) -> list[int | BaseException]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("database down")
        return list(items)

    intake: GroupCommit[int, int] = GroupCommit(flaky)
    with pytest.raises(ConnectionError, match="database down"):
        intake.submit(1)
    assert intake.submit(2) == 2  # nothing is left stuck after a failure


def test_group_size_is_bounded() -> None:
    store = SlowDoubler()
    submit_all(GroupCommit(store, max_group=4, max_storing=1), list(range(1, 11)))

    assert max(len(group) for group in store.groups) == 4
    assert sorted(n for group in store.groups for n in group) == list(range(1, 11))


def test_two_groups_are_stored_at_once_and_no_more() -> None:
    second_group_started = threading.Event()
    running = 0
    most_running = 0
    guard = threading.Lock()

    def store(items: Sequence[int]) -> list[int | BaseException]:
        nonlocal running, most_running
        with guard:
            running += 1
            most_running = max(most_running, running)
            if running == 2:
                second_group_started.set()
        try:
            # The first group holds on until a second one is being stored beside it.
            assert second_group_started.wait(timeout=5), "no second group while one was stored"
            time.sleep(0.05)
            return list(items)
        finally:
            with guard:
                running -= 1

    results = submit_all(GroupCommit(store, max_storing=2), list(range(20)))

    assert results == list(range(20))
    assert most_running == 2


def test_concurrent_submissions_through_the_api_share_inserts_and_respect_the_limits(
    settings: Settings, api_key: IssuedKey
) -> None:
    limited = settings.model_copy(update={"max_active_jobs_per_key": 5})
    inserts = []

    def count_inserts(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO JOBS"):
            inserts.append(statement)

    engine = session_factory(settings.resolved_database_url).kw["bind"]
    event.listen(engine, "before_cursor_execute", count_inserts)
    try:
        with TestClient(create_app(limited)) as client, ThreadPoolExecutor(12) as pool:
            answers = list(
                pool.map(lambda _: post(client, "/api/v5/pix2pix", api_key, PIX2PIX), range(12))
            )
    finally:
        event.remove(engine, "before_cursor_execute", count_inserts)

    codes = sorted(answer.status_code for answer in answers)
    assert codes == [200] * 5 + [429] * 7  # judged one by one, even within a group
    accepted = {answer.json()["id"] for answer in answers if answer.status_code == 200}
    assert len(accepted) == 5
    assert accepted <= set(queued_job_ids(settings))  # every accepted id reached the broker
    assert 1 <= len(inserts) <= 5
    print(f"12 concurrent submissions: {len(inserts)} INSERT statement(s) for 5 accepted jobs")


def test_keys_are_checked_per_submission_within_a_group(
    settings: Settings, api_key: IssuedKey
) -> None:
    bodies = [{"key": api_key.plaintext if i % 2 else f"dk_wrong{i}", **PIX2PIX} for i in range(8)]
    with TestClient(create_app(settings)) as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: client.post("/api/v5/pix2pix", json=body), bodies))

    assert [a.status_code for a in answers] == [401, 200] * 4
    assert answers[0].json() == {"status": "error", "message": "Invalid Api Key"}
    assert len({a.json()["id"] for a in answers[1::2]}) == 4
