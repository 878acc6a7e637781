"""Every query on webhook deliveries and attempts. The retry schedule lives in these rows."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import (
    ColumnElement,
    Integer,
    Interval,
    Table,
    Text,
    Update,
    and_,
    case,
    column,
    insert,
    literal,
    or_,
    select,
    update,
    values,
)
from sqlalchemy.orm import Session

from db.clock import DbNow, db_now
from db.models import (
    ApiKey,
    Base,
    DeliveryState,
    Job,
    UTCDateTime,
    WebhookAttempt,
    WebhookDelivery,
    utcnow,
)


@dataclass(frozen=True)
class AttemptRecord:
    """What one POST produced."""

    status_code: int | None
    latency_ms: float
    response_excerpt: str | None
    error: str | None


def create_delivery(
    session: Session,
    *,
    job_id: int | None = None,
    url: str,
    payload: str,
    api_key_id: int | None = None,
    model_install_id: int | None = None,
) -> WebhookDelivery:
    """Queue the one delivery of a job (or a model install's, given its key), due now, with the
    `webhook-id` every attempt will carry.

    "Now" is the database's: a dispatcher whose clock is behind this process's must still find
    it due (the caller publishes it right after the commit, so it counts as published too).
    """
    now = db_now(session)
    if api_key_id is None:  # a job's webhook is signed with the job's key
        api_key_id = session.scalar(select(Job.api_key_id).where(Job.id == job_id))
    delivery = WebhookDelivery(
        job_id=job_id,
        model_install_id=model_install_id,
        api_key_id=api_key_id,
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


@dataclass(frozen=True)
class ClaimedDelivery:
    """A delivery taken for one attempt, with everything signing and logging it needs."""

    id: int
    job_id: int | None
    url: str
    payload: str
    message_id: str
    attempt_count: int
    track_id: str | None
    secrets: list[str]


def _is_due(now: ColumnElement[datetime]) -> ColumnElement[bool]:
    """Pending, due, and held by no live lease, all on the database's clock `now`."""
    return and_(
        WebhookDelivery.state == DeliveryState.PENDING,
        WebhookDelivery.next_attempt_at <= now,
        or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until < now),
    )


def claim_due_deliveries(session: Session, *, limit: int, lease_s: float) -> list[ClaimedDelivery]:
    """Take up to `limit` due deliveries for one attempt each, oldest due first, in one
    statement that also returns what signing needs (the job's key secrets, its track id).

    The same rule as `claim_delivery`: a live lease refuses, on the database's clock. Rows
    another dispatcher is claiming right now are skipped (SKIP LOCKED), not waited for, so
    several dispatchers claim side by side. Postgres only (the dispatcher's loop runs there).
    """
    now = DbNow()
    due_ids = (
        select(WebhookDelivery.id)
        .where(_is_due(now))
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    rows = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id.in_(due_ids.scalar_subquery()),
            _is_due(now),
            WebhookDelivery.api_key_id == ApiKey.id,
        )
        .values(lease_until=now + literal(timedelta(seconds=lease_s), Interval()))
        .returning(
            WebhookDelivery.id,
            WebhookDelivery.job_id,
            WebhookDelivery.url,
            WebhookDelivery.payload,
            WebhookDelivery.message_id,
            WebhookDelivery.attempt_count,
            # A model install's delivery has no job, hence no track id.
            select(Job.track_id).where(Job.id == WebhookDelivery.job_id).scalar_subquery(),
            ApiKey.webhook_secret,
            ApiKey.previous_webhook_secret,
            ApiKey.previous_secret_until,
        )
        .execution_options(synchronize_session=False)
    ).all()
    signed_at = utcnow()
    return [
        ClaimedDelivery(
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            row[5],
            row[6],
            secrets=ApiKey(
                webhook_secret=row[7], previous_webhook_secret=row[8], previous_secret_until=row[9]
            ).signing_secrets(signed_at),
        )
        for row in rows
    ]


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


@dataclass(frozen=True)
class AttemptOutcome:
    """One finished attempt and what follows: DELIVERED, FAILED, or PENDING again after
    `retry_in_s` seconds (on the database's clock)."""

    delivery_id: int
    record: AttemptRecord
    state: DeliveryState
    retry_in_s: float = 0.0
    attempted_at: datetime = field(default_factory=utcnow)


#: Outcomes recorded per pair of statements: each attempt row is 6 parameters and each delivery
#: row 4, far under the parameter limits of Postgres (65,535) and SQLite (32,766).
RECORD_CHUNK = 1000


def record_outcomes(session: Session, outcomes: Sequence[AttemptOutcome]) -> None:
    """Save a batch of attempts, one row each, and move each delivery on: what `record_attempt`
    then `mark_delivered`, `mark_failed` or `schedule_retry_in` do for one delivery.

    Two statements per RECORD_CHUNK outcomes, whatever their mix: one multi-row INSERT of the
    attempts and one UPDATE of the deliveries joined with a VALUES list (an executemany ran
    one statement per row in the server). A retry's due time is the database's clock, read once
    when there is one. The caller holds each delivery's lease.
    """
    for start in range(0, len(outcomes), RECORD_CHUNK):
        chunk = outcomes[start : start + RECORD_CHUNK]
        session.execute(insert(_table(WebhookAttempt)).values([_attempt_row(o) for o in chunk]))
        session.execute(_move_on(session, chunk))


def _table(model: type[Base]) -> Table:
    table = model.__table__
    assert isinstance(table, Table)
    return table


def _move_on(session: Session, outcomes: Sequence[AttemptOutcome]) -> Update:
    """One UPDATE of `outcomes`' deliveries: the attempt counted, the lease released,
    `last_error` set; an ended one's state and `finished_at`; a retried one due again.

    Every row carries a due time, never NULL (an ended one's is ignored): a VALUES column of
    NULLs alone would be typed text by Postgres, and a cast would turn SQLite's datetimes into
    numbers.
    """
    deliveries = _table(WebhookDelivery)
    finished = utcnow()
    retried = any(o.state == DeliveryState.PENDING for o in outcomes)
    now = db_now(session) if retried else finished
    moved = values(
        column("id", Integer),
        column("state", deliveries.c.state.type),
        column("error", Text),
        column("due", UTCDateTime()),
        name="moved",
    ).data([_delivery_row(o, now) for o in outcomes])
    rows = moved.cte("moved")
    again = rows.c.state == DeliveryState.PENDING
    return (
        update(deliveries)
        .where(deliveries.c.id == rows.c.id)
        .values(
            attempt_count=deliveries.c.attempt_count + 1,
            last_error=rows.c.error,
            lease_until=None,
            state=rows.c.state,
            finished_at=case((again, deliveries.c.finished_at), else_=finished),
            next_attempt_at=case((again, rows.c.due), else_=deliveries.c.next_attempt_at),
            enqueued_at=case((again, None), else_=deliveries.c.enqueued_at),
        )
    )


def _attempt_row(outcome: AttemptOutcome) -> dict[str, object]:
    record = outcome.record
    return {
        "delivery_id": outcome.delivery_id,
        "attempted_at": outcome.attempted_at,
        "status_code": record.status_code,
        "latency_ms": record.latency_ms,
        "response_excerpt": record.response_excerpt,
        "error": record.error,
    }


def _delivery_row(outcome: AttemptOutcome, now: datetime) -> tuple[object, ...]:
    """(id, state, last_error, due) of a delivery: `last_error` as `record_attempt` and
    `mark_delivered` leave it; due `retry_in_s` after `now` (read only for a retry)."""
    record = outcome.record
    error = record.error or (None if record.status_code is None else f"HTTP {record.status_code}")
    if outcome.state == DeliveryState.DELIVERED:
        error = None
    due = now + timedelta(seconds=outcome.retry_in_s)
    return (outcome.delivery_id, outcome.state, error, due)


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


def mark_published(session: Session, delivery_ids: Sequence[int]) -> None:
    """Record that the deliveries' ids were handed to the broker, in one statement."""
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id.in_(delivery_ids))
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
