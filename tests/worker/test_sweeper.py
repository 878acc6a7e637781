"""The sweeper against Postgres and a real Redis broker: what it publishes, and what it marks."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import redis
from celery import Celery
from sqlalchemy import select, text, update
from sqlalchemy.exc import OperationalError

from darkroom.identities import FailureReason, Operation
from darkroom.queue import (
    DELIVER_WEBHOOK_TASK,
    RUN_JOB_TASK,
    HeldIds,
    held_ids,
    make_celery,
    send,
)
from darkroom.settings import Settings
from darkroom.storage import LocalStorage
from db.models import (
    DeliveryState,
    IdempotencyKey,
    Job,
    JobOutput,
    JobState,
    WebhookDelivery,
    utcnow,
)
from db.repositories import idempotency, jobs, webhooks
from db.repositories.jobs import ClaimOutcome
from db.repositories.keys import IssuedKey, create_key
from db.session import session_factory, session_scope
from services import outcomes
from services.outcomes import exhausted_message
from services.responses import run_output_filename
from tests.support.broker import published
from tests.support.rows import queued_job
from worker import sweeper
from worker.sweeper import PARTIAL_WRITE_MAX_AGE_S, SweepReport, remove_partial_writes, sweep_once

HOOK = "http://127.0.0.1:9/hook"
#: kombu's hash of messages consumers hold unacknowledged (Redis transport).
UNACKED = "unacked"


@pytest.fixture
def api_key(own_pg_url: str) -> IssuedKey:
    """A key in this test's own database (the sweeper must see no other test's rows)."""
    with session_scope(own_pg_url) as session:
        return create_key(session, "sweeper-test")


@pytest.fixture
def tuned(settings: Settings, own_pg_url: str) -> Settings:
    """Settings with a 30 s outbox grace and a 5 min republish interval (the defaults' scale)."""
    return settings.model_copy(
        update={"database_url": own_pg_url, "outbox_grace_s": 30.0, "republish_after_s": 300.0}
    )


@pytest.fixture
def broker(tuned: Settings) -> Iterator[Celery]:
    app = make_celery(tuned)
    yield app
    app.close()


@pytest.fixture
def rds(tuned: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(tuned.broker_url)
    yield client
    client.delete(tuned.job_queue, tuned.webhook_queue)
    client.close()


def _count(rds: redis.Redis, queue: str, task: str, record_id: int) -> int:
    return published(rds, queue).count((task, record_id))


def _ago(seconds: float) -> datetime:
    return utcnow() - timedelta(seconds=seconds)


def _job(
    settings: Settings, key: IssuedKey, webhook_url: str | None = None, **values: object
) -> int:
    return queued_job(
        settings,
        key.row.id,
        operation=Operation.IMG_MIXER,
        endpoint="enterprise",
        params={"track_id": 5},
        track_id="5",
        webhook=webhook_url,
        **values,
    )


def _orphan(
    settings: Settings, key: IssuedKey, attempts: int, webhook_url: str | None = None
) -> int:
    """A job a worker claimed `attempts` times and then vanished from (its lease ran out)."""
    job_id = _job(settings, key, webhook_url, created_at=_ago(3600), enqueued_at=_ago(3600))
    with session_scope(settings.resolved_database_url) as session:
        for _ in range(attempts):
            outcome, _ = jobs.claim_job(session, job_id, lease_s=60, max_attempts=attempts)
            assert outcome == ClaimOutcome.CLAIMED
            session.execute(update(Job).where(Job.id == job_id).values(lease_until=_ago(1)))
    return job_id


def _load(settings: Settings, job_id: int) -> Job:
    with session_scope(settings.resolved_database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def _sweep(settings: Settings, broker: Celery) -> list[SweepReport]:
    """Sweep until a pass has nothing left to publish (other tests' rows may share the DB)."""
    reports = [sweep_once(settings, broker)]
    while reports[-1].enqueued_jobs or reports[-1].sent_deliveries:
        assert len(reports) < 20
        reports.append(sweep_once(settings, broker))
    return reports


def test_outbox_publishes_a_lost_job_once(
    tuned: Settings, api_key: IssuedKey, broker: Celery, rds: redis.Redis
) -> None:
    lost = _job(tuned, api_key, created_at=_ago(60))
    fresh = _job(tuned, api_key)  # the API may still be publishing it itself

    reports = _sweep(tuned, broker)
    assert sum(r.enqueued_jobs for r in reports) >= 1
    assert _count(rds, tuned.job_queue, RUN_JOB_TASK, lost) == 1
    assert _count(rds, tuned.job_queue, RUN_JOB_TASK, fresh) == 0
    assert _load(tuned, lost).enqueued_at is not None
    assert _load(tuned, fresh).enqueued_at is None

    _sweep(tuned, broker)
    assert _count(rds, tuned.job_queue, RUN_JOB_TASK, lost) == 1
    assert all(task == RUN_JOB_TASK for task, _ in published(rds, tuned.job_queue))


def test_stale_queued_job_is_republished(
    tuned: Settings, api_key: IssuedKey, broker: Celery, rds: redis.Redis
) -> None:
    stale = _job(tuned, api_key, created_at=_ago(3600), enqueued_at=_ago(600))
    # Published a moment ago: the broker may not show its message yet (lost_message_grace_s).
    recent = _job(tuned, api_key, created_at=_ago(3600), enqueued_at=_ago(0.2))
    _sweep(tuned, broker)
    assert _count(rds, tuned.job_queue, RUN_JOB_TASK, stale) == 1
    assert _count(rds, tuned.job_queue, RUN_JOB_TASK, recent) == 0
    enqueued_at = _load(tuned, stale).enqueued_at
    assert enqueued_at is not None
    assert enqueued_at > _ago(60)


def test_expired_lease_is_requeued_and_republished(
    tuned: Settings, api_key: IssuedKey, broker: Celery, rds: redis.Redis
) -> None:
    orphan = _orphan(tuned, api_key, attempts=1)
    live = _job(tuned, api_key, created_at=_ago(3600), enqueued_at=_ago(3600))
    with session_scope(tuned.resolved_database_url) as session:
        assert jobs.claim_job(session, live, lease_s=60, max_attempts=3)[0] == ClaimOutcome.CLAIMED

    reports = _sweep(tuned, broker)
    assert reports[0].requeued_jobs >= 1
    job = _load(tuned, orphan)
    assert job.state == JobState.QUEUED
    assert job.attempts == 1
    assert job.lease_until is None
    assert job.enqueued_at is not None
    assert _count(rds, tuned.job_queue, RUN_JOB_TASK, orphan) == 1

    assert _load(tuned, live).state == JobState.PROCESSING
    assert _count(rds, tuned.job_queue, RUN_JOB_TASK, live) == 0

    with session_scope(tuned.resolved_database_url) as session:  # a worker takes it again
        outcome, _ = jobs.claim_job(session, orphan, lease_s=60, max_attempts=3)
    assert outcome == ClaimOutcome.CLAIMED
    assert _load(tuned, orphan).attempts == 2


def test_out_of_attempts_fails_and_queues_the_webhook(
    tuned: Settings, api_key: IssuedKey, broker: Celery, rds: redis.Redis
) -> None:
    attempts = tuned.job_max_attempts
    with_hook = _orphan(tuned, api_key, attempts=attempts, webhook_url=HOOK)
    without = _orphan(tuned, api_key, attempts=attempts)

    reports = _sweep(tuned, broker)
    assert reports[0].failed_jobs >= 2
    for job_id in (with_hook, without):
        job = _load(tuned, job_id)
        assert job.state == JobState.FAILED
        assert job.error == exhausted_message(attempts)
        assert job.attempts == attempts
        assert _count(rds, tuned.job_queue, RUN_JOB_TASK, job_id) == 0

    with session_scope(tuned.resolved_database_url) as session:
        delivery = webhooks.get_delivery_for_job(session, with_hook)
        assert delivery is not None
        assert webhooks.get_delivery_for_job(session, without) is None
        delivery_id = delivery.id
        assert delivery.url == HOOK
        assert delivery.state == DeliveryState.PENDING
        payload = json.loads(delivery.payload)
    assert payload["status"] == "failed"
    assert payload["id"] == with_hook
    assert payload["message"] == exhausted_message(attempts)
    assert payload["track_id"] == 5
    assert _count(rds, tuned.webhook_queue, DELIVER_WEBHOOK_TASK, delivery_id) == 1

    _sweep(tuned, broker)  # nothing happens twice
    assert _count(rds, tuned.webhook_queue, DELIVER_WEBHOOK_TASK, delivery_id) == 1
    assert _load(tuned, with_hook).error == exhausted_message(attempts)


def test_due_deliveries_are_published_once(
    tuned: Settings, api_key: IssuedKey, broker: Celery, rds: redis.Redis
) -> None:
    ids: dict[str, int] = {}
    for name in ("due", "later", "fresh"):
        job_id = _job(tuned, api_key, webhook_url=HOOK)
        with session_scope(tuned.resolved_database_url) as session:
            job = session.get(Job, job_id)
            assert job is not None
            delivery_id = outcomes.fail(session, tuned, job, "boom", reason=FailureReason.REJECTED)
            assert delivery_id is not None
            ids[name] = delivery_id
    with session_scope(tuned.resolved_database_url) as session:
        # "due": a retry fell due (schedule_retry clears enqueued_at); "later": not yet due;
        # "fresh": the worker published it when it was created (enqueued_at = now).
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == ids["due"])
            .values(enqueued_at=None, next_attempt_at=_ago(1))
        )
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == ids["later"])
            .values(enqueued_at=None, next_attempt_at=utcnow() + timedelta(seconds=60))
        )

    reports = _sweep(tuned, broker)
    assert sum(r.sent_deliveries for r in reports) >= 1
    assert _count(rds, tuned.webhook_queue, DELIVER_WEBHOOK_TASK, ids["due"]) == 1
    assert _count(rds, tuned.webhook_queue, DELIVER_WEBHOOK_TASK, ids["later"]) == 0
    assert _count(rds, tuned.webhook_queue, DELIVER_WEBHOOK_TASK, ids["fresh"]) == 0
    with session_scope(tuned.resolved_database_url) as session:
        row = session.get(WebhookDelivery, ids["due"])
        assert row is not None
        assert row.enqueued_at is not None
        later = session.get(WebhookDelivery, ids["later"])
        assert later is not None
        assert later.enqueued_at is None

    _sweep(tuned, broker)
    assert _count(rds, tuned.webhook_queue, DELIVER_WEBHOOK_TASK, ids["due"]) == 1
    assert all(task == DELIVER_WEBHOOK_TASK for task, _ in published(rds, tuned.webhook_queue))


def test_a_long_queued_job_is_sent_again_only_once_its_message_is_lost(
    tuned: Settings, api_key: IssuedKey, broker: Celery, rds: redis.Redis
) -> None:
    """Past lost_message_grace_s a job goes again only when the broker no longer holds its
    message: a long backlog must not be duplicated every interval."""
    quick = tuned.model_copy(update={"lost_message_grace_s": 0.3})
    job_id = _job(quick, api_key, created_at=_ago(60))
    _sweep(quick, broker)
    assert _count(rds, quick.job_queue, RUN_JOB_TASK, job_id) == 1
    time.sleep(0.4)
    assert sweep_once(quick, broker).enqueued_jobs == 0  # its message still waits
    assert _count(rds, quick.job_queue, RUN_JOB_TASK, job_id) == 1

    rds.delete(quick.job_queue)  # the broker loses it (a restart without persistence)
    _sweep(quick, broker)
    assert _count(rds, quick.job_queue, RUN_JOB_TASK, job_id) == 1  # sent again, once
    time.sleep(0.4)
    assert sweep_once(quick, broker).enqueued_jobs == 0


def test_partial_writes_of_a_killed_worker_are_removed_once_old(settings: Settings) -> None:
    storage = LocalStorage(settings.outputs_dir)
    storage.save("done-0.png", b"png")
    old_partial = settings.outputs_dir / ".tmp-killed.part"
    fresh_partial = settings.outputs_dir / ".tmp-writing.part"
    for partial in (old_partial, fresh_partial):
        partial.write_bytes(b"half")
    hour_and_more = time.time() - PARTIAL_WRITE_MAX_AGE_S - 60
    os.utime(old_partial, (hour_and_more, hour_and_more))

    assert remove_partial_writes(settings) == 1

    assert not old_partial.exists()
    assert fresh_partial.exists()  # may be a write in progress
    assert storage.read("done-0.png") == b"png"


def test_a_message_taken_and_not_acknowledged_waits_for_republish_after_s(
    tuned: Settings, api_key: IssuedKey, broker: Celery, rds: redis.Redis
) -> None:
    """A message in kombu's unacked hash is held by a consumer (running, or about to claim):
    not lost, unless it stays there longer than republish_after_s (its consumer died)."""
    job_id = _job(tuned, api_key, created_at=_ago(120), enqueued_at=_ago(60))
    assert send(broker, RUN_JOB_TASK, job_id, queue=tuned.job_queue)
    [raw] = rds.lrange(tuned.job_queue, 0, -1)
    rds.delete(tuned.job_queue)  # a worker took it: kombu moves it to the unacked hash
    tag = f"test-{uuid.uuid4()}"
    rds.hset(UNACKED, tag, json.dumps([json.loads(raw), "", tuned.job_queue]))
    try:
        assert sweep_once(tuned, broker).enqueued_jobs == 0  # held for 60 s of 300
        impatient = tuned.model_copy(update={"republish_after_s": 30.0})
        assert sweep_once(impatient, broker).enqueued_jobs == 1
        assert _count(rds, tuned.job_queue, RUN_JOB_TASK, job_id) == 1
    finally:
        rds.hdel(UNACKED, tag)


def test_idempotency_keys_are_forgotten_after_their_24_hours(
    tuned: Settings, api_key: IssuedKey, broker: Celery
) -> None:
    """The sweeper deletes expired Idempotency-Key records and keeps live ones."""
    fresh, old = _job(tuned, api_key), _job(tuned, api_key)
    with session_scope(tuned.resolved_database_url) as session:
        idempotency.remember(
            session,
            [
                idempotency.NewRecord(api_key.row.id, "fresh", "h1", fresh),
                idempotency.NewRecord(api_key.row.id, "old", "h2", old),
            ],
        )
        session.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.key == "old")
            .values(created_at=_ago(idempotency.IDEMPOTENCY_TTL.total_seconds() + 60))
        )
    assert sweep_once(tuned, broker).expired_idempotency_keys == 1
    with session_scope(tuned.resolved_database_url) as session:
        kept = session.scalars(select(IdempotencyKey.key)).all()
    assert kept == ["fresh"]


def test_the_files_a_dead_run_wrote_but_never_recorded_are_deleted(
    tuned: Settings, api_key: IssuedKey, broker: Celery, rds: redis.Redis
) -> None:
    """A run wrote its images, then died before recording them (its lease ran out): when the
    sweeper hands the job back, that run's files go; files of another claim's run, files a
    job_outputs row names, and other jobs' files stay."""
    orphan = _orphan(tuned, api_key, attempts=1)
    other = _job(tuned, api_key)
    storage = LocalStorage(tuned.outputs_dir)
    with session_scope(tuned.resolved_database_url) as session:
        job, neighbour = session.get_one(Job, orphan), session.get_one(Job, other)
        dead = [run_output_filename(job, index, "1-0badc0de") for index in (0, 1)]
        named = run_output_filename(job, 2, "1-0badc0de")
        later_claim = run_output_filename(job, 0, "2-5eedf00d")
        neighbours = run_output_filename(neighbour, 0, "1-0badc0de")
        session.add(JobOutput(job_id=orphan, index=2, filename=named, width=8, height=8, seed=1))
    for name in [*dead, named, later_claim, neighbours]:
        storage.save(name, b"png")

    assert _sweep(tuned, broker)[0].requeued_jobs >= 1
    assert _load(tuned, orphan).state == JobState.QUEUED
    for name in dead:
        assert not (tuned.outputs_dir / name).exists()
    for name in (named, later_claim, neighbours):
        assert (tuned.outputs_dir / name).exists()


def test_a_message_between_queue_and_unacked_hash_is_not_sent_again(
    tuned: Settings,
    api_key: IssuedKey,
    broker: Celery,
    rds: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """kombu's Redis transport pops a message from its queue (BRPOP) before it adds it to the
    unacked hash: a look at the broker in between sees it nowhere. The sweeper looks again
    before calling it lost. Here the worker's two steps straddle the sweeper's first look."""
    job_id = _job(tuned, api_key, created_at=_ago(120), enqueued_at=_ago(60))
    assert send(broker, RUN_JOB_TASK, job_id, queue=tuned.job_queue)
    raw = rds.lpop(tuned.job_queue)  # the worker's BRPOP: the message is in its hands
    assert isinstance(raw, bytes)
    tag = f"test-{uuid.uuid4()}"
    real_look = held_ids

    def look_then_append(*args: Any, **kwargs: Any) -> HeldIds:
        seen = real_look(*args, **kwargs)
        if not rds.hexists(UNACKED, tag):  # the worker's qos.append, after the first look
            rds.hset(UNACKED, tag, json.dumps([json.loads(raw), "", tuned.job_queue]))
        return seen

    monkeypatch.setattr(sweeper, "held_ids", look_then_append)
    try:
        assert sweep_once(tuned, broker).enqueued_jobs == 0
        assert _count(rds, tuned.job_queue, RUN_JOB_TASK, job_id) == 0
    finally:
        rds.hdel(UNACKED, tag)


def test_a_worker_cannot_renew_a_lease_the_sweeper_is_acting_on(
    tuned: Settings, api_key: IssuedKey
) -> None:
    """Between reading an expired lease and failing or requeueing the job, the sweeper holds the
    row: a stalled worker that wakes up cannot renew its lease (nor record its result) in
    between, so a live run is never failed or requeued under it. A row a worker is writing is
    skipped instead of waited for, and taken up at a later sweep."""
    attempt = tuned.job_max_attempts
    orphan = _orphan(tuned, api_key, attempts=attempt)
    factory = session_factory(tuned.resolved_database_url)
    with factory() as sweeper, factory() as worker:
        assert orphan in [job.id for job in jobs.jobs_with_expired_lease(sweeper)]
        worker.execute(text("SET LOCAL lock_timeout = '500ms'"))
        with pytest.raises(OperationalError, match="lock timeout"):
            jobs.extend_lease(worker, orphan, 60, attempt=attempt)
        worker.rollback()
        sweeper.rollback()

        assert jobs.extend_lease(worker, orphan, 60, attempt=attempt)  # not committed yet
        sweeper.execute(text("SET LOCAL lock_timeout = '500ms'"))
        assert orphan not in [job.id for job in jobs.jobs_with_expired_lease(sweeper)]
        sweeper.rollback()
        worker.rollback()
