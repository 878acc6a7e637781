"""The webhooks repository against Postgres: deliveries, claims with leases, what is due."""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session

from darkroom.identities import Operation
from db.models import DeliveryState, WebhookDelivery, utcnow
from db.repositories import jobs, webhooks
from db.repositories.jobs import NewJob
from db.repositories.keys import IssuedKey
from db.repositories.webhooks import AttemptRecord
from tests.conftest import count_rows

URL = "http://127.0.0.1:9/hook"


def _delivery(session: Session, key: IssuedKey) -> WebhookDelivery:
    job = jobs.create_job(
        session,
        NewJob(
            api_key_id=key.row.id,
            operation=Operation.PIX2PIX,
            endpoint="v5",
            params={},
            meta={},
            track_id=None,
            webhook_url=URL,
        ),
    )
    delivery = webhooks.create_delivery(session, job_id=job.id, url=URL, payload='{"id":1}')
    session.commit()
    return delivery


def _set(session: Session, delivery_id: int, **values: object) -> None:
    session.execute(
        update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(**values)
    )
    session.commit()


def _reload(session: Session, delivery_id: int) -> WebhookDelivery:
    session.expire_all()
    row = session.get(WebhookDelivery, delivery_id)
    assert row is not None
    return row


def _ago(seconds: float) -> datetime:
    return utcnow() - timedelta(seconds=seconds)


def _due(session: Session, republish_after_s: float = 300.0) -> set[int]:
    return set(
        webhooks.due_delivery_ids(session, republish_before=_ago(republish_after_s), limit=100_000)
    )


def test_create_delivery(db: Session, api_key: IssuedKey) -> None:
    first = _delivery(db, api_key)
    second = _delivery(db, api_key)
    row = _reload(db, first.id)
    assert re.fullmatch(r"msg_[0-9a-f]{24}", row.message_id)
    assert row.message_id != second.message_id
    assert row.state == DeliveryState.PENDING
    assert row.attempt_count == 0
    assert row.payload == '{"id":1}'
    assert row.url == URL
    assert row.next_attempt_at <= utcnow()
    assert row.job_id is not None  # a job's delivery (install deliveries have none)
    found = webhooks.get_delivery_for_job(db, row.job_id)
    assert found is not None
    assert found.id == first.id


def test_claim_once_while_leased(db: Session, api_key: IssuedKey) -> None:
    delivery = _delivery(db, api_key)
    claimed = webhooks.claim_delivery(db, delivery.id, lease_s=30)
    db.commit()
    assert claimed is not None
    assert claimed.id == delivery.id
    assert claimed.lease_until is not None
    assert claimed.lease_until > utcnow() + timedelta(seconds=25)
    assert webhooks.claim_delivery(db, delivery.id, lease_s=30) is None
    db.commit()

    _set(db, delivery.id, lease_until=_ago(1))  # the holder vanished
    assert webhooks.claim_delivery(db, delivery.id, lease_s=30) is not None
    db.commit()


def test_not_due_and_finished_are_not_claimable(db: Session, api_key: IssuedKey) -> None:
    later = _delivery(db, api_key)
    _set(db, later.id, next_attempt_at=utcnow() + timedelta(seconds=60))
    assert webhooks.claim_delivery(db, later.id, lease_s=30) is None
    assert _reload(db, later.id).lease_until is None

    for state in (DeliveryState.DELIVERED, DeliveryState.FAILED):
        done = _delivery(db, api_key)
        _set(db, done.id, state=state)
        assert webhooks.claim_delivery(db, done.id, lease_s=30) is None
    assert webhooks.claim_delivery(db, 2_000_000_000, lease_s=30) is None


def test_due_delivery_ids(db: Session, api_key: IssuedKey) -> None:
    just_published = _delivery(db, api_key)  # enqueued_at defaults to now: the worker sent it
    never_published = _delivery(db, api_key)
    _set(db, never_published.id, enqueued_at=None)
    long_ago = _delivery(db, api_key)
    _set(db, long_ago.id, enqueued_at=_ago(600))
    not_due = _delivery(db, api_key)
    _set(db, not_due.id, enqueued_at=None, next_attempt_at=utcnow() + timedelta(seconds=60))
    leased = _delivery(db, api_key)
    _set(db, leased.id, enqueued_at=None, lease_until=utcnow() + timedelta(seconds=60))
    lease_expired = _delivery(db, api_key)
    _set(db, lease_expired.id, enqueued_at=None, lease_until=_ago(1))
    delivered = _delivery(db, api_key)
    _set(db, delivered.id, enqueued_at=None, state=DeliveryState.DELIVERED)

    due = _due(db)
    assert {never_published.id, long_ago.id, lease_expired.id} <= due
    assert not due & {just_published.id, not_due.id, leased.id, delivered.id}

    webhooks.mark_published(db, [never_published.id])
    db.commit()
    assert never_published.id not in _due(db)
    assert _reload(db, never_published.id).enqueued_at is not None


def test_record_attempt_and_schedule(db: Session, api_key: IssuedKey) -> None:
    delivery = _delivery(db, api_key)
    row = webhooks.claim_delivery(db, delivery.id, lease_s=30)
    assert row is not None
    webhooks.record_attempt(db, row, AttemptRecord(503, 12.5, "busy", None))
    at = utcnow() + timedelta(seconds=60)
    webhooks.schedule_retry(db, row, at)
    db.commit()
    row = _reload(db, delivery.id)
    assert row.attempt_count == 1
    assert row.last_error == "HTTP 503"
    assert row.next_attempt_at == at
    assert row.enqueued_at is None
    assert row.lease_until is None
    assert row.state == DeliveryState.PENDING
    assert count_rows(db, "webhook_attempts", f"delivery_id = {delivery.id}") == 1

    webhooks.record_attempt(db, row, AttemptRecord(None, 2000.0, None, "timeout"))
    webhooks.mark_failed(db, row)
    db.commit()
    row = _reload(db, delivery.id)
    assert row.state == DeliveryState.FAILED
    assert row.last_error == "timeout"
    assert row.finished_at is not None
    assert [a.error for a in row.attempts] == [None, "timeout"]
    assert [a.status_code for a in row.attempts] == [503, None]
