"""Every query on webhook deliveries and attempts. The retry schedule lives in these rows."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import (
    ColumnElement,
    Interval,
    Table,
    and_,
    bindparam,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from db.clock import DbNow, db_now
from db.models import (
    ApiKey,
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
        message_id=_new_message_id(),
        next_attempt_at=now,
        enqueued_at=now,
    )
    session.add(delivery)
    session.flush()
    return delivery


def _new_message_id() -> str:
    """The `webhook-id` every attempt of a new delivery carries."""
    return "msg_" + secrets.token_hex(12)


@dataclass(frozen=True)
class JobDelivery:
    """A job's webhook to queue: signed with the job's key, its body frozen as `payload`."""

    job_id: int
    api_key_id: int
    url: str
    payload: str


def create_job_deliveries(session: Session, deliveries: Sequence[JobDelivery]) -> dict[int, int]:
    """`create_delivery` for several jobs at once, in one multi-row INSERT: job id -> the id of
    its delivery, due now and counted as published (on the database's clock)."""
    if not deliveries:
        return {}
    now = db_now(session)
    rows = [
        {
            "job_id": new.job_id,
            "api_key_id": new.api_key_id,
            "url": new.url,
            "payload": new.payload,
            "message_id": _new_message_id(),
            "next_attempt_at": now,
            "enqueued_at": now,
        }
        for new in deliveries
    ]
    created = session.execute(
        insert(WebhookDelivery).returning(WebhookDelivery.job_id, WebhookDelivery.id), rows
    )
    return {job_id: delivery_id for job_id, delivery_id in created.tuples() if job_id is not None}


def deliveries_for_jobs(session: Session, job_ids: Sequence[int]) -> dict[int, int]:
    """The deliveries the jobs already have: job id -> delivery id (one per job at most)."""
    if not job_ids:
        return {}
    rows = session.execute(
        select(WebhookDelivery.job_id, WebhookDelivery.id).where(
            WebhookDelivery.job_id.in_(job_ids)
        )
    )
    return {job_id: delivery_id for job_id, delivery_id in rows.tuples() if job_id is not None}


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
    # A batch's deliveries mostly share a key: its secrets are worked out once per distinct key
    # (an ApiKey instance per row cost ~11 µs of CPU per delivery). The list is shared
    # between those deliveries' tickets, which only read it.
    key_secrets: dict[tuple[str, str | None, datetime | None], list[str]] = {}
    claimed = []
    for row in rows:
        key = (row[7], row[8], row[9])
        if key not in key_secrets:
            key_secrets[key] = ApiKey(
                webhook_secret=row[7], previous_webhook_secret=row[8], previous_secret_until=row[9]
            ).signing_secrets(signed_at)
        claimed.append(
            ClaimedDelivery(
                row[0], row[1], row[2], row[3], row[4], row[5], row[6], secrets=key_secrets[key]
            )
        )
    return claimed


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


#: Postgres: a batch's attempt rows, each column one array parameter, in one statement.
_INSERT_ATTEMPTS = text(
    "INSERT INTO webhook_attempts"
    " (delivery_id, attempted_at, status_code, latency_ms, response_excerpt, error)"
    " SELECT * FROM unnest(CAST(:delivery_id AS integer[]), CAST(:attempted_at AS timestamptz[]),"
    " CAST(:status_code AS integer[]), CAST(:latency_ms AS float8[]),"
    " CAST(:response_excerpt AS text[]), CAST(:error AS text[]))"
)
#: Postgres: every delivery of a batch moved on in one statement, as `_move_on` does one by one.
#: A retry is due `retry_in_s` after now(), the transaction's start on the database's clock.
_MOVE_ON = text(
    "UPDATE webhook_deliveries AS d SET attempt_count = d.attempt_count + 1,"
    " last_error = m.error, lease_until = NULL, state = m.state,"
    " finished_at = CASE WHEN m.state = :pending THEN d.finished_at ELSE :finished END,"
    " next_attempt_at = CASE WHEN m.state = :pending"
    " THEN now() + m.retry_in_s * interval '1 second' ELSE d.next_attempt_at END,"
    " enqueued_at = CASE WHEN m.state = :pending THEN NULL ELSE d.enqueued_at END"
    " FROM unnest(CAST(:id AS integer[]), CAST(:state AS text[]), CAST(:last_error AS text[]),"
    " CAST(:retry_in_s AS float8[])) AS m (id, state, error, retry_in_s)"
    " WHERE d.id = m.id"
).bindparams(bindparam("finished", type_=UTCDateTime()))


def record_outcomes(session: Session, outcomes: Sequence[AttemptOutcome]) -> None:
    """Save a batch of attempts, one row each, and move each delivery on: what `record_attempt`
    then `mark_delivered`, `mark_failed` or `schedule_retry_in` do for one delivery. The caller
    holds each delivery's lease.

    On Postgres (the loop's database) two statements whatever the batch's size and mix, each
    column of the batch one array parameter: an executemany ran one statement per row in the
    server, and a VALUES list built with SQLAlchemy cost more CPU to compile than that saved.
    Elsewhere (SQLite, one outcome at a time) an executemany per statement.
    """
    if not outcomes:
        return
    if session.get_bind().dialect.name != "postgresql":
        _record_row_by_row(session, outcomes)
        return
    attempts = [_attempt_row(outcome) for outcome in outcomes]
    session.execute(
        _INSERT_ATTEMPTS, {name: [row[name] for row in attempts] for name in attempts[0]}
    )
    moved = [_delivery_row(outcome) for outcome in outcomes]
    columns = {name: [row[name] for row in moved] for name in moved[0]}
    session.execute(
        _MOVE_ON, columns | {"pending": DeliveryState.PENDING.value, "finished": utcnow()}
    )


def _record_row_by_row(session: Session, outcomes: Sequence[AttemptOutcome]) -> None:
    """`record_outcomes` in at most three executemany statements (any database)."""
    session.execute(insert(WebhookAttempt), [_attempt_row(outcome) for outcome in outcomes])
    ended = [o for o in outcomes if o.state != DeliveryState.PENDING]
    if ended:
        finished = utcnow()
        values: dict[str, object] = {"state": bindparam("b_state"), "finished_at": finished}
        _move_on(session, values, [_bound(_delivery_row(o)) for o in ended])
    retried = [o for o in outcomes if o.state == DeliveryState.PENDING]
    if retried:
        now = db_now(session)
        values = {"next_attempt_at": bindparam("b_next"), "enqueued_at": None}
        rows = [_bound(_delivery_row(o)) for o in retried]
        for row, outcome in zip(rows, retried, strict=True):
            row["b_next"] = now + timedelta(seconds=outcome.retry_in_s)
        _move_on(session, values, rows)


def _move_on(session: Session, values: dict[str, object], rows: list[dict[str, object]]) -> None:
    """One UPDATE per row (executemany): the attempt counted, the lease released, `values`."""
    table = WebhookDelivery.__table__
    assert isinstance(table, Table)
    statement = (
        update(table)
        .where(table.c.id == bindparam("b_id"))
        .values(
            attempt_count=table.c.attempt_count + 1,
            last_error=bindparam("b_error"),
            lease_until=None,
            **values,
        )
    )
    session.execute(statement, rows)


def _bound(row: dict[str, object]) -> dict[str, object]:
    """A `_delivery_row` as `_move_on`'s parameters (named apart from the table's columns)."""
    return {"b_id": row["id"], "b_error": row["last_error"], "b_state": row["state"]}


def _attempt_row(outcome: AttemptOutcome) -> dict[str, object]:
    record = outcome.record
    return {
        "delivery_id": outcome.delivery_id,
        "attempted_at": outcome.attempted_at,
        "status_code": record.status_code,
        "latency_ms": float(record.latency_ms),
        "response_excerpt": record.response_excerpt,
        "error": record.error,
    }


def _delivery_row(outcome: AttemptOutcome) -> dict[str, object]:
    """The delivery's new state and `last_error` (as `record_attempt` and `mark_delivered`
    leave it), and the delay before a retry."""
    record = outcome.record
    error = record.error or (None if record.status_code is None else f"HTTP {record.status_code}")
    if outcome.state == DeliveryState.DELIVERED:
        error = None
    return {
        "id": outcome.delivery_id,
        "state": outcome.state.value,
        "last_error": error,
        "retry_in_s": float(outcome.retry_in_s),  # one array type: psycopg refuses int and float
    }


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
