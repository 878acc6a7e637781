"""The transactional outbox on real Postgres and Redis: a message asked for in a transaction is
sent once it commits, dropped when it rolls back, and the sent rows are marked published; with
the broker down the commit still succeeds and the sweeper sends the row later."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis
from sqlalchemy import event, update
from sqlalchemy.orm import Session

from darkroom.identities import Operation
from darkroom.jobspec import JobSpec
from darkroom.queue import make_celery
from darkroom.settings import Settings
from db.models import Job, JobState, WebhookDelivery
from db.repositories import webhooks
from db.repositories.keys import IssuedKey, create_key
from db.session import session_factory, session_scope
from services import jobs as job_service
from services import outbox
from services.outbox import DeliveryMessage
from services.routing import Presence, WorkerPresence, model_key, model_queue
from tests.support import rows
from tests.support.broker import published_ids
from tests.support.system import free_port
from worker.sweeper import sweep_once


def queued_job(settings: Settings, key: IssuedKey) -> int:
    """A queued img2img job, stored without being published."""
    spec = JobSpec(
        operation=Operation.IMG2IMG,
        prompt="outbox",
        init_images=["http://127.0.0.1:9/x.png"],
        steps=2,
        guidance_scale=7.0,
        seed=1,
    )
    return rows.queued_job(settings, key.row.id, spec=spec)


def waiting(settings: Settings, queue: str) -> list[int]:
    """The ids waiting in `queue` of the broker."""
    return published_ids(settings.resolved_broker_url, queue)


def row(settings: Settings, job_id: int) -> Job:
    with session_scope(settings.resolved_database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def publish(session: Session, settings: Settings, job_id: int) -> outbox.Receipt:
    """Ask for job `job_id` to be run, as every publisher does (services.jobs.publish)."""
    broker = make_celery(settings)
    return job_service.publish(session, broker, settings, job_id, Operation.IMG2IMG, None)


def test_a_job_is_sent_only_once_its_transaction_commits_and_then_marked(
    settings: Settings, api_key: IssuedKey
) -> None:
    job_id = queued_job(settings, api_key)
    session = session_factory(settings.resolved_database_url)()
    try:
        session.get(Job, job_id)  # the transaction is open
        receipt = publish(session, settings, job_id)
        unsent = waiting(settings, settings.job_queue), receipt.sent
        session.commit()
    finally:
        session.close()

    assert unsent == ([], None)  # nothing before the commit
    assert waiting(settings, settings.job_queue) == [job_id]
    assert (receipt.sent, receipt.queue) == (True, settings.job_queue)
    job = row(settings, job_id)
    assert job.enqueued_at is not None  # the sweeper's "never published" rule sees it
    assert job.queue_name == settings.job_queue


def test_a_rollback_or_a_close_without_commit_sends_nothing(
    settings: Settings, api_key: IssuedKey
) -> None:
    rolled_back, closed = queued_job(settings, api_key), queued_job(settings, api_key)
    receipts: list[outbox.Receipt] = []

    def failing_request() -> None:
        with session_scope(settings.resolved_database_url) as session:
            receipts.append(publish(session, settings, rolled_back))
            raise RuntimeError("the request failed after asking")

    with pytest.raises(RuntimeError):
        failing_request()
    session = session_factory(settings.resolved_database_url)()
    publish(session, settings, closed)
    session.close()
    with session_scope(settings.resolved_database_url) as later:  # the next commit sends nothing
        later.get(Job, closed)

    assert waiting(settings, settings.job_queue) == []
    assert receipts[0].sent is None
    assert row(settings, rolled_back).enqueued_at is None
    assert row(settings, closed).enqueued_at is None


def test_a_group_of_jobs_is_marked_with_one_statement_per_queue(
    settings: Settings, api_key: IssuedKey
) -> None:
    job_ids = [queued_job(settings, api_key) for _ in range(3)]
    engine = session_factory(settings.resolved_database_url).kw["bind"]
    updates: list[str] = []

    def record(*args: Any) -> None:
        statement = args[2]
        if statement.lstrip().upper().startswith("UPDATE JOBS"):
            updates.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        with session_scope(settings.resolved_database_url) as session:
            receipts = [publish(session, settings, job_id) for job_id in job_ids]
    finally:
        event.remove(engine, "before_cursor_execute", record)

    assert sorted(waiting(settings, settings.job_queue)) == job_ids
    assert all(receipt.sent for receipt in receipts)
    assert len(updates) == 1
    assert all(row(settings, job_id).enqueued_at is not None for job_id in job_ids)


def test_a_delivery_asked_to_be_marked_is_stamped_once_sent(
    settings: Settings, api_key: IssuedKey
) -> None:
    job_id = queued_job(settings, api_key)
    with session_scope(settings.resolved_database_url) as session:
        delivery = webhooks.create_delivery(session, job_id=job_id, url="http://x/", payload="{}")
        delivery.enqueued_at = None  # as a retry falls due
        delivery_id = delivery.id
    with session_scope(settings.resolved_database_url) as session:
        message = DeliveryMessage(delivery_id, mark=True)
        receipt = outbox.deliver_webhook(session, make_celery(settings), settings, message)

    assert receipt.sent
    assert waiting(settings, settings.webhook_queue) == [delivery_id]
    with session_scope(settings.resolved_database_url) as session:
        stored = session.get(WebhookDelivery, delivery_id)
        assert stored is not None
        assert stored.enqueued_at is not None


@pytest.mark.parametrize("loop", [True, False])
def test_beside_the_delivery_loop_one_message_rings_for_a_transactions_deliveries(
    settings: Settings, api_key: IssuedKey, loop: bool
) -> None:
    """The loop claims every due row, so one message wakes it; a Celery dispatcher needs each."""
    settings = settings.model_copy(update={"webhook_loop": loop})
    assert settings.delivers_by_loop is loop
    job_ids = [queued_job(settings, api_key) for _ in range(3)]
    with session_scope(settings.resolved_database_url) as session:
        made = [
            webhooks.create_delivery(session, job_id=job_id, url="http://x/", payload="{}")
            for job_id in job_ids
        ]
        for delivery in made:
            delivery.enqueued_at = None
        ids = [delivery.id for delivery in made]
    broker = make_celery(settings)
    with session_scope(settings.resolved_database_url) as session:
        receipts = [
            outbox.deliver_webhook(session, broker, settings, DeliveryMessage(d, mark=True))
            for d in ids
        ]

    assert [receipt.sent for receipt in receipts] == [True] * 3
    assert sorted(waiting(settings, settings.webhook_queue)) == (ids[:1] if loop else ids)
    with session_scope(settings.resolved_database_url) as session:
        stamped = [session.get(WebhookDelivery, d) for d in ids]
        assert all(row is not None and row.enqueued_at is not None for row in stamped)


@pytest.fixture
def own_key(own_pg_url: str) -> IssuedKey:
    with session_scope(own_pg_url) as session:
        return create_key(session, "outbox")


@pytest.fixture
def own_settings(settings: Settings, own_pg_url: str) -> Settings:
    """Settings on a database of this test's own (the sweeper reads every row)."""
    return settings.model_copy(update={"database_url": own_pg_url, "outbox_grace_s": 0.0})


def test_with_the_broker_down_the_commit_succeeds_and_the_sweeper_sends_the_row_later(
    own_settings: Settings, own_key: IssuedKey, caplog: pytest.LogCaptureFixture
) -> None:
    settings = own_settings
    down = settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"})
    first, second = queued_job(settings, own_key), queued_job(settings, own_key)

    url = settings.resolved_database_url
    with caplog.at_level(logging.WARNING, logger="darkroom.queue"), session_scope(url) as session:
        receipts = [publish(session, down, first), publish(session, down, second)]  # no raise

    assert [receipt.sent for receipt in receipts] == [False, False]
    tried = [record for record in caplog.records if record.name == "darkroom.queue"]
    assert len(tried) == 1  # the first failed send skips the rest: one timeout, not one each
    assert row(settings, first).enqueued_at is None  # left for the sweeper
    report = sweep_once(settings, make_celery(settings))
    assert report.enqueued_jobs == 2
    assert sorted(waiting(settings, settings.job_queue)) == [first, second]
    assert row(settings, first).queue_name == settings.job_queue


def test_a_requeue_is_published_through_model_affinity_routing(
    settings: Settings, api_key: IssuedKey
) -> None:
    """The operator's requeue publishes as every publisher does: to the holder's model queue."""
    held = model_key(Operation.IMG2IMG.value, "tiny-a")
    Presence(settings, "w1@test").renew(WorkerPresence("w1@test", [held.name]))
    spec = JobSpec(
        operation=Operation.IMG2IMG,
        prompt="requeue",
        init_images=["http://127.0.0.1:9/x.png"],
        steps=2,
        guidance_scale=7.0,
        seed=1,
        model_id="tiny-a",
    )
    job_id = rows.queued_job(settings, api_key.row.id, spec=spec)
    with session_scope(settings.resolved_database_url) as session:
        session.execute(update(Job).where(Job.id == job_id).values(state=JobState.FAILED))

    with session_scope(settings.resolved_database_url) as session:
        _record, receipt = job_service.requeue(session, make_celery(settings), settings, job_id)

    queue = model_queue(settings, held)
    try:
        assert (receipt.sent, receipt.queue) == (True, queue)
        assert waiting(settings, queue) == [job_id]
        assert row(settings, job_id).queue_name == queue
    finally:
        Presence(settings, "w1@test").leave([held.name])
        redis.Redis.from_url(settings.resolved_broker_url).delete(queue)
