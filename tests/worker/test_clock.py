"""One clock, one attempt: due times and leases are read on the database's clock, so a process
whose clock is off (libfaketime) delays nothing, and one delivery is attempted once at a time."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import select, update

from darkroom.queue import DELIVER_WEBHOOK_TASK, make_celery, send
from darkroom.settings import Settings
from db.clock import DbNow, db_now
from db.migrate import upgrade_to_head
from db.models import DeliveryState, JobState, WebhookDelivery, utcnow
from db.repositories import webhooks
from db.repositories.keys import create_key
from db.session import session_factory, session_scope
from tests.chaos.harness import OwnedProcess
from tests.support.broker import published_ids
from tests.support.rows import job_row
from tests.support.servers import WebhookReceiver
from tests.support.system import settings_env
from worker.sweeper import sweep_once

#: libfaketime, from Debian's `faketime` package (scripts/system-deps.sh installs it).
FAKETIME_LIBS = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
#: The dispatcher's clock runs this many seconds behind the database's (and this process's).
SKEW_S = 5


@pytest.fixture(params=["postgres", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Both databases Darkroom runs on: the clock must read the same on each."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("own_pg_url")
        return url
    url = f"sqlite:///{tmp_path / 'clock.sqlite3'}"
    upgrade_to_head(url)
    return url


def _job_with_delivery(url: str, hook: str) -> int:
    """A failed job and its pending delivery, as a worker's outcome creates them."""
    with session_scope(url) as session:
        key_id = create_key(session, "clock").row.id
        job = job_row(session, key_id, webhook=hook, state=JobState.FAILED)
        return webhooks.create_delivery(session, job_id=job.id, url=hook, payload="{}").id


def test_the_database_clock_reads_alike_on_both_databases(database_url: str) -> None:
    with session_scope(database_url) as session:
        now = db_now(session)
        assert abs((now - utcnow()).total_seconds()) < 1.0
        assert now.tzinfo is not None
    delivery_id = _job_with_delivery(database_url, "http://127.0.0.1:9/hook")
    with session_scope(database_url) as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None
        assert row.next_attempt_at <= db_now(session)  # due at once, on the database's clock
        # A value written by the database compares with one written from Python.
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
            .values(lease_until=DbNow())
        )
    with session_scope(database_url) as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None
        assert row.lease_until is not None
        assert abs((row.lease_until - utcnow()).total_seconds()) < 1.0
        assert webhooks.due_delivery_ids(session, republish_before=utcnow()) == [delivery_id]


def test_one_attempt_at_a_time_under_concurrent_claims(database_url: str) -> None:
    """Eight dispatcher threads claim one due delivery at once: one attempt wins; no claim
    succeeds while its lease is live, and the sweeper does not republish it meanwhile."""
    delivery_id = _job_with_delivery(database_url, "http://127.0.0.1:9/hook")
    session_factory(database_url)  # one engine for all threads
    start = threading.Barrier(8)
    wins: list[int] = []

    def claim() -> None:
        start.wait()
        with session_scope(database_url) as session:
            if webhooks.claim_delivery(session, delivery_id, lease_s=60) is not None:
                wins.append(delivery_id)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wins == [delivery_id]

    with session_scope(database_url) as session:
        assert webhooks.claim_delivery(session, delivery_id, lease_s=60) is None
        assert webhooks.due_deliveries(session, utcnow()) == []  # leased: never republished
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
            .values(lease_until=utcnow() - timedelta(seconds=1))
        )
    with session_scope(database_url) as session:  # the lease ran out: a new attempt may start
        assert webhooks.claim_delivery(session, delivery_id, lease_s=60) is not None


def test_sweeper_sends_a_delivery_whose_message_was_lost_and_not_a_leased_one(
    settings: Settings, own_pg_url: str
) -> None:
    ours = settings.model_copy(update={"database_url": own_pg_url, "lost_message_grace_s": 0.2})
    broker = make_celery(ours)
    lost = _job_with_delivery(own_pg_url, "http://127.0.0.1:9/hook")
    leased = _job_with_delivery(own_pg_url, "http://127.0.0.1:9/hook")
    with session_scope(own_pg_url) as session:
        assert webhooks.claim_delivery(session, leased, lease_s=60) is not None
    time.sleep(0.3)  # both were published (stamped) by their creator; neither reached Redis
    try:
        sweep_once(ours, broker)
        assert published_ids(ours.broker_url, ours.webhook_queue) == [lost]
        sweep_once(ours, broker)  # its message waits now: not sent twice
        assert published_ids(ours.broker_url, ours.webhook_queue) == [lost]
    finally:
        redis.Redis.from_url(ours.broker_url).delete(ours.webhook_queue, ours.job_queue)
        broker.close()


@pytest.fixture
def skewed_dispatcher(
    settings: Settings, own_pg_url: str, tmp_path: Path
) -> Iterator[tuple[Settings, OwnedProcess]]:
    """A `darkroom dispatcher` (with its sweeper) whose clock is SKEW_S seconds behind."""
    if not FAKETIME_LIBS:
        pytest.fail("libfaketime is missing: run scripts/system-deps.sh (Debian's faketime)")
    ours = settings.model_copy(update={"database_url": own_pg_url})
    env = settings_env(ours, tmp_path / "data") | {
        "LD_PRELOAD": str(FAKETIME_LIBS[0]),
        "FAKETIME": f"-{SKEW_S}",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "DARKROOM_REPUBLISH_AFTER_S": "300",
    }
    clock = subprocess.run(
        [sys.executable, "-c", "import time; print(time.time())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert abs(time.time() - float(clock.stdout) - SKEW_S) < 1.0, "the skew did not apply"
    argv = [sys.executable, "-m", "cli.main", "dispatcher"]
    dispatcher = OwnedProcess("dispatcher", argv, env, tmp_path / "dispatcher.log")
    dispatcher.start()
    yield ours, dispatcher
    dispatcher.close()
    redis.Redis.from_url(ours.broker_url).delete(ours.webhook_queue, ours.job_queue)


@pytest.mark.slow
def test_a_dispatcher_whose_clock_is_behind_delays_no_webhook(
    skewed_dispatcher: tuple[Settings, OwnedProcess], receiver: WebhookReceiver
) -> None:
    """The worker (this process) stamps and publishes deliveries; a dispatcher 5 s behind finds
    them due (the database's clock) and delivers each at once, not after republish_after_s."""
    ours, dispatcher = skewed_dispatcher
    deadline = time.monotonic() + 120
    while " ready." not in dispatcher.current_log():
        assert time.monotonic() < deadline, dispatcher.tail()
        time.sleep(0.2)
    broker = make_celery(ours)
    ids = [_job_with_delivery(ours.resolved_database_url, receiver.url) for _ in range(5)]
    published = time.monotonic()
    for delivery_id in ids:
        assert send(broker, DELIVER_WEBHOOK_TASK, delivery_id)
    broker.close()
    while len(receiver.snapshot()) < len(ids):
        assert time.monotonic() - published < 10, f"webhooks late\n{dispatcher.tail()}"
        time.sleep(0.1)
    took = time.monotonic() - published
    print(f"\nskewed dispatcher (-{SKEW_S} s): {len(ids)} webhooks delivered in {took:.2f} s")
    while _states(ours, ids) != {DeliveryState.DELIVERED}:  # the attempts are being recorded
        assert time.monotonic() - published < 10, f"attempts not recorded\n{dispatcher.tail()}"
        time.sleep(0.1)
    assert len(receiver.snapshot()) == len(ids)
    assert os.environ.get("FAKETIME") is None  # only the dispatcher was skewed


def _states(settings: Settings, delivery_ids: list[int]) -> set[DeliveryState]:
    with session_scope(settings.resolved_database_url) as session:
        rows = session.scalars(
            select(WebhookDelivery.state).where(WebhookDelivery.id.in_(delivery_ids))
        )
        return set(rows)
