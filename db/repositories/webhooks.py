"""Every query on webhook deliveries and attempts. The retry schedule lives in these rows."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from db.clock import DbNow, db_now
from db.models import DeliveryState, WebhookAttempt, WebhookDelivery, utcnow


@dataclass(frozen=True)
class AttemptRecord:
    """What one POST produced."""

    status_code: int | None
    latency_ms: float
    response_excerpt: str | None
    error: str | None


def create_delivery(session: Session, *, job_id: int, url: str, payload: str) -> WebhookDelivery:
    """Queue the one delivery of a job, due now, with the `webhook-id` every attempt will carry.

    "Now" is the database's: a dispatcher whose clock is behind this process's must still find
    it due (the caller publishes it right after the commit, so it counts as published too).
    """
    now = db_now(session)
    delivery = WebhookDelivery(
        job_id=job_id,
        url=url,
        payload=payload,
        message_id="msg_" + secrets.token_hex(12),
        next_attempt_at=now,
        enqueued_at=now,
    )
    session.add(delivery)
    session.flush()
    return delivery


def claim_delivery(session: Session, delivery_id: int, *, lease_s: float) -> WebhookDelivery | None:
    """Take a due delivery for one attempt; None if it is not due, finished or held elsewhere.

    One attempt at a time: the conditional UPDATE refuses while another attempt's lease is live
    (`lease_s` must outlast a whole attempt), and "due" and "live" are read on the database's
    clock, so hosts whose clocks differ agree on both.
    """
    now = db_now(session)
    due = and_(
        WebhookDelivery.state == DeliveryState.PENDING,
        WebhookDelivery.next_attempt_at <= now,
        or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until < now),
    )
    result = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, due)
        .values(lease_until=now + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    if int(result.rowcount) != 1:  # type: ignore[attr-defined]
        return None
    return session.get(WebhookDelivery, delivery_id, populate_existing=True)


def record_attempt(session: Session, delivery: WebhookDelivery, attempt: AttemptRecord) -> None:
    """Save one attempt as a row and count it on the delivery."""
    session.add(
        WebhookAttempt(
            delivery_id=delivery.id,
            status_code=attempt.status_code,
            latency_ms=attempt.latency_ms,
            response_excerpt=attempt.response_excerpt,
            error=attempt.error,
        )
    )
    delivery.attempt_count += 1
    delivery.last_error = attempt.error or (
        None if attempt.status_code is None else f"HTTP {attempt.status_code}"
    )
    session.flush()


def mark_delivered(session: Session, delivery: WebhookDelivery) -> None:
    """The receiver answered 2xx: no more attempts."""
    delivery.state = DeliveryState.DELIVERED
    delivery.finished_at = utcnow()
    delivery.lease_until = None
    delivery.last_error = None
    session.flush()


def schedule_retry(session: Session, delivery: WebhookDelivery, at: datetime) -> None:
    """Make the delivery due again at `at` (the sweeper publishes it then)."""
    delivery.next_attempt_at = at
    delivery.enqueued_at = None
    delivery.lease_until = None
    session.flush()


def schedule_retry_in(session: Session, delivery: WebhookDelivery, delay_s: float) -> None:
    """Make the delivery due again `delay_s` seconds from now on the database's clock."""
    schedule_retry(session, delivery, db_now(session) + timedelta(seconds=delay_s))


def mark_failed(session: Session, delivery: WebhookDelivery) -> None:
    """Give up: the schedule is exhausted or the receiver said 410 Gone."""
    delivery.state = DeliveryState.FAILED
    delivery.finished_at = utcnow()
    delivery.lease_until = None
    session.flush()


def due_delivery_ids(
    session: Session, *, republish_before: datetime, limit: int = 200
) -> list[int]:
    """Ids of the `due_deliveries` (not published since `republish_before`)."""
    return [delivery_id for delivery_id, _ in due_deliveries(session, republish_before, limit)]


def due_deliveries(
    session: Session, published_before: datetime, limit: int = 200
) -> list[tuple[int, datetime | None]]:
    """(id, enqueued_at) of pending deliveries that are due and held by nobody (no live lease,
    on the database's clock), never published or published before `published_before`.

    A delivery is published when created (by the worker) and when a retry falls due (by the
    sweeper); the sweeper sends again those whose message the broker no longer holds.
    """
    now = DbNow()
    rows = session.execute(
        select(WebhookDelivery.id, WebhookDelivery.enqueued_at)
        .where(
            WebhookDelivery.state == DeliveryState.PENDING,
            WebhookDelivery.next_attempt_at <= now,
            or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until < now),
            or_(
                WebhookDelivery.enqueued_at.is_(None),
                WebhookDelivery.enqueued_at < published_before,
            ),
        )
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
    )
    return [(delivery_id, enqueued_at) for delivery_id, enqueued_at in rows]


def mark_published(session: Session, delivery_id: int) -> None:
    """Record that the delivery's id was handed to the broker."""
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id)
        .values(enqueued_at=DbNow())
        .execution_options(synchronize_session=False)
    )


def get_delivery_for_job(session: Session, job_id: int) -> WebhookDelivery | None:
    """The delivery of a job, if it has a webhook."""
    return session.scalar(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id))


def failed_deliveries(session: Session, *, limit: int = 100) -> list[WebhookDelivery]:
    """Deliveries that gave up (schedule exhausted or 410), newest first."""
    rows = session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.state == DeliveryState.FAILED)
        .order_by(WebhookDelivery.id.desc())
        .limit(limit)
    )
    return list(rows)


def replay(session: Session, delivery: WebhookDelivery) -> None:
    """Start a failed delivery's schedule again, due now, with the same webhook-id and body."""
    delivery.state = DeliveryState.PENDING
    delivery.attempt_count = 0
    delivery.next_attempt_at = db_now(session)
    delivery.enqueued_at = None
    delivery.lease_until = None
    delivery.finished_at = None
    session.flush()
