"""The dispatcher's database-driven loop: batches of claims and records, same guarantees as
one attempt at a time (tests/worker/test_dispatcher.py), against a loopback receiver."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from standardwebhooks.webhooks import Webhook

from darkroom.identities import FailureReason, Operation
from darkroom.queue import make_celery
from darkroom.settings import Settings
from db.clock import db_now
from db.migrate import upgrade_to_head
from db.models import DeliveryState, JobState, WebhookAttempt, WebhookDelivery
from db.repositories import jobs, keys, webhooks
from db.repositories.keys import IssuedKey
from db.repositories.webhooks import AttemptOutcome, AttemptRecord
from db.session import session_scope
from services import outcomes
from tests.support.broker import published_ids
from tests.support.rows import job_row
from tests.support.servers import Received, WebhookReceiver
from worker.sweeper import sweep_once
from worker.webhooks.dispatcher import Ticket
from worker.webhooks.loop import DeliveryLoop, Doorbell


@pytest.fixture
def ours(settings: Settings, own_pg_url: str) -> Settings:
    """A database of this test's own: the loop claims every due delivery it holds."""
    return settings.model_copy(update={"database_url": own_pg_url, "webhook_poll_s": 0.05})


@pytest.fixture
def key(ours: Settings) -> IssuedKey:
    with session_scope(ours.resolved_database_url) as session:
        return keys.create_key(session, "loop")


def _deliveries(settings: Settings, key: IssuedKey, url: str, count: int) -> list[int]:
    """`count` failed jobs with `url` as their webhook: each one's pending delivery."""
    ids = []
    with session_scope(settings.resolved_database_url) as session:
        for n in range(count):
            new = jobs.NewJob(key.row.id, Operation.IMG2IMG, "v6", {}, {}, f"t-{n}", url)
            job = jobs.create_job(session, new)
            delivery_id = outcomes.fail(
                session,
                settings,
                job,
                "The init image was unreadable.",
                reason=FailureReason.REJECTED,
            )
            assert delivery_id is not None
            ids.append(delivery_id)
    return ids


@contextmanager
def dispatchers(settings: Settings, count: int) -> Iterator[None]:
    """`count` delivery loops side by side, as several dispatcher processes run."""
    stop = threading.Event()
    threads = []
    for _ in range(count):
        loop = DeliveryLoop(settings, Doorbell(settings))
        threads.append(threading.Thread(target=loop.run, args=(stop,), daemon=True))
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        assert not any(thread.is_alive() for thread in threads), "a loop did not stop"


def wait_for(what: str, done: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def states(settings: Settings, ids: list[int]) -> list[DeliveryState]:
    with session_scope(settings.resolved_database_url) as session:
        query = select(WebhookDelivery.state).where(WebhookDelivery.id.in_(ids))
        return list(session.scalars(query))


def test_two_loops_deliver_each_delivery_once_signed_with_one_attempt_row(
    ours: Settings, key: IssuedKey, receiver: WebhookReceiver
) -> None:
    ids = _deliveries(ours, key, receiver.url, 40)
    with dispatchers(ours, 2):
        wait_for("all delivered", lambda: states(ours, ids) == [DeliveryState.DELIVERED] * 40)

    received = receiver.snapshot()
    assert len(received) == 40  # no delivery was attempted twice
    with session_scope(ours.resolved_database_url) as session:
        rows = session.scalars(select(WebhookDelivery).where(WebhookDelivery.id.in_(ids))).all()
        assert sorted(r.message_id for r in rows) == sorted(
            r.headers["webhook-id"] for r in received
        )
        assert {(r.attempt_count, r.last_error, r.lease_until) for r in rows} == {(1, None, None)}
        assert all(r.finished_at is not None for r in rows)
        attempts = session.scalars(select(WebhookAttempt)).all()
        assert sorted(a.delivery_id for a in attempts) == sorted(ids)
        assert {(a.status_code, a.error) for a in attempts} == {(200, None)}
    for got in received:
        assert Webhook(key.row.webhook_secret).verify(got.body, got.headers)["status"] == "failed"


class CountingLoop(DeliveryLoop):
    """The real loop, counting its claim transactions."""

    claims = 0

    def _claim(self, room: int) -> list[Ticket]:
        self.claims += 1
        return super()._claim(room)


def test_once_nothing_more_is_due_the_loop_waits_for_news_not_for_each_return(
    ours: Settings, key: IssuedKey, receiver: WebhookReceiver
) -> None:
    """A trickle of deliveries costs a claim per wake-up, not an empty claim per returned
    attempt (that was most of the dispatcher's work in the saturation benchmark)."""
    ours = ours.model_copy(update={"webhook_poll_s": 2.0})
    ids = _deliveries(ours, key, receiver.url, 16)
    redis.Redis.from_url(ours.broker_url).delete(ours.webhook_queue)  # no doorbell rings
    loop = CountingLoop(ours, Doorbell(ours))
    stop = threading.Event()
    thread = threading.Thread(target=loop.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_for("all delivered", lambda: states(ours, ids) == [DeliveryState.DELIVERED] * 16)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not thread.is_alive()
    assert len(receiver.snapshot()) == 16
    # One claim took all 16; at most one more if the 2 s poll came round before the end.
    assert loop.claims <= 2


def test_a_failed_attempt_is_due_again_on_the_database_clock_and_410_gives_up(
    ours: Settings, key: IssuedKey, receiver: WebhookReceiver
) -> None:
    ours = ours.model_copy(update={"webhook_schedule_s": [0.0, 30.0]})
    [retried, gone] = _deliveries(ours, key, receiver.url, 2)

    with session_scope(ours.resolved_database_url) as session:
        gone_row = session.get(WebhookDelivery, gone)
        assert gone_row is not None
        gone_id = gone_row.message_id

    def respond(request: Received) -> tuple[int, dict[str, str]]:
        return (410, {}) if request.headers["webhook-id"] == gone_id else (503, {})

    receiver.respond = respond
    with dispatchers(ours, 1):
        wait_for("both attempted", lambda: len(receiver.snapshot()) == 2)
        wait_for("gone failed", lambda: states(ours, [gone]) == [DeliveryState.FAILED])
        time.sleep(0.5)  # the retried one is not due for 30 s: no second attempt

    assert len(receiver.snapshot()) == 2
    with session_scope(ours.resolved_database_url) as session:
        row = session.get(WebhookDelivery, retried)
        assert row is not None
        assert (row.state, row.attempt_count, row.last_error) == (
            DeliveryState.PENDING,
            1,
            "HTTP 503",
        )
        assert row.lease_until is None
        assert row.enqueued_at is None
        due_in = row.next_attempt_at - db_now(session)
        assert timedelta(seconds=28) < due_in <= timedelta(seconds=30)
        failed = session.get(WebhookDelivery, gone)
        assert failed is not None
        assert (failed.attempt_count, failed.last_error) == (1, "HTTP 410")
        count = select(func.count(WebhookAttempt.id))
        assert session.scalar(count) == 2


def test_a_live_lease_is_not_claimed_again(ours: Settings, key: IssuedKey) -> None:
    [held, free] = _deliveries(ours, key, "http://127.0.0.1:9/hook", 2)
    with session_scope(ours.resolved_database_url) as session:
        assert webhooks.claim_delivery(session, held, lease_s=60) is not None
    with session_scope(ours.resolved_database_url) as session:
        claimed = webhooks.claim_due_deliveries(session, limit=10, lease_s=60)
    assert [c.id for c in claimed] == [free]
    assert claimed[0].secrets == [key.row.webhook_secret]
    assert claimed[0].track_id == "t-1"
    with session_scope(ours.resolved_database_url) as session:
        assert webhooks.claim_due_deliveries(session, limit=10, lease_s=60) == []


def test_beside_the_loop_the_sweeper_sends_no_delivery_again(
    ours: Settings, key: IssuedKey
) -> None:
    """A delivery waiting past the grace, as in a backlog, looks lost to the sweeper (the loop
    drops the queue's messages): beside the loop it is left to the loop's claim."""
    ours = ours.model_copy(update={"lost_message_grace_s": 0.1})
    [waiting] = _deliveries(ours, key, "http://127.0.0.1:9/hook", 1)
    time.sleep(0.2)
    broker = make_celery(ours)
    try:
        assert sweep_once(ours, broker, deliveries=False).sent_deliveries == 0
        assert published_ids(ours.broker_url, ours.webhook_queue) == []
        assert sweep_once(ours, broker).sent_deliveries == 1  # a Celery dispatcher needs it
        assert published_ids(ours.broker_url, ours.webhook_queue) == [waiting]
    finally:
        redis.Redis.from_url(ours.broker_url).delete(ours.webhook_queue, ours.job_queue)
        broker.close()


@pytest.fixture(params=["postgres", "sqlite"])
def any_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Both databases: the loop records on Postgres, `deliver` (embedded mode) on SQLite too."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("own_pg_url")
        return url
    url = f"sqlite:///{tmp_path / 'records.sqlite3'}"
    upgrade_to_head(url)
    return url


def _rows(session: Session, ids: list[int]) -> dict[int, WebhookDelivery]:
    query = select(WebhookDelivery).where(WebhookDelivery.id.in_(ids))
    return {row.id: row for row in session.scalars(query)}


def test_one_batch_records_each_attempt_and_moves_each_delivery_on(any_database: str) -> None:
    hook = "http://127.0.0.1:9/hook"
    with session_scope(any_database) as session:
        key_id = keys.create_key(session, "records").row.id
        ids = []
        for _ in range(4):
            job = job_row(session, key_id, webhook=hook, state=JobState.FAILED)
            ids.append(webhooks.create_delivery(session, job_id=job.id, url=hook, payload="{}").id)
    [delivered, failed, retried, unreachable] = ids
    with session_scope(any_database) as session:
        for delivery_id in ids:  # each held by a lease, as a claim leaves them
            assert webhooks.claim_delivery(session, delivery_id, lease_s=60) is not None
        before = {d: (r.next_attempt_at, r.enqueued_at) for d, r in _rows(session, ids).items()}
    batch = [
        AttemptOutcome(delivered, AttemptRecord(200, 1.5, "ok", None), DeliveryState.DELIVERED),
        AttemptOutcome(failed, AttemptRecord(410, 2.5, "gone", None), DeliveryState.FAILED),
        AttemptOutcome(retried, AttemptRecord(503, 3.5, "busy", None), DeliveryState.PENDING, 30),
        AttemptOutcome(
            unreachable, AttemptRecord(None, 4.5, None, "timeout"), DeliveryState.PENDING, 60
        ),
    ]
    with session_scope(any_database) as session:
        webhooks.record_outcomes(session, batch)
        now = db_now(session)

    with session_scope(any_database) as session:
        rows = _rows(session, ids)
        assert {
            d: (r.state, r.attempt_count, r.last_error, r.lease_until) for d, r in rows.items()
        } == {
            delivered: (DeliveryState.DELIVERED, 1, None, None),
            failed: (DeliveryState.FAILED, 1, "HTTP 410", None),
            retried: (DeliveryState.PENDING, 1, "HTTP 503", None),
            unreachable: (DeliveryState.PENDING, 1, "timeout", None),
        }
        for ended in (delivered, failed):  # finished; due time and publish time left alone
            assert rows[ended].finished_at is not None
            assert (rows[ended].next_attempt_at, rows[ended].enqueued_at) == before[ended]
        for again, delay in ((retried, 30), (unreachable, 60)):  # due again, on the db's clock
            assert (rows[again].finished_at, rows[again].enqueued_at) == (None, None)
            due_in = (rows[again].next_attempt_at - now).total_seconds()
            assert delay - 2 < due_in <= delay
        attempts = session.scalars(select(WebhookAttempt).order_by(WebhookAttempt.delivery_id))
        assert [
            (a.delivery_id, a.status_code, a.latency_ms, a.response_excerpt, a.error)
            for a in attempts
        ] == [
            (delivered, 200, 1.5, "ok", None),
            (failed, 410, 2.5, "gone", None),
            (retried, 503, 3.5, "busy", None),
            (unreachable, None, 4.5, None, "timeout"),
        ]
