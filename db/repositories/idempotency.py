"""Idempotency keys: which job a client's `Idempotency-Key` created, for 24 hours.

A record is written in the same transaction as its job, so a key names a job exactly when that
job is stored. Functions flush; the caller owns the commit.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from db.models import IdempotencyKey, utcnow

#: How long a key answers its job; after that the key may name a new request. A window this
#: long tolerates any clock skew between API replicas, so the API's clock is good enough here.
IDEMPOTENCY_TTL = timedelta(hours=24)

#: (api_key_id, Idempotency-Key): keys are scoped per API key.
Scope = tuple[int, str]


@dataclass(frozen=True)
class Remembered:
    """The job an Idempotency-Key created, and a digest of the request that created it."""

    job_id: int
    request_hash: str


@dataclass(frozen=True)
class NewRecord:
    """A key to remember for a job being stored."""

    api_key_id: int
    key: str
    request_hash: str
    job_id: int


def find_live(session: Session, wanted: Collection[Scope]) -> dict[Scope, Remembered]:
    """The unexpired records among `wanted`, in one query; expired ones among them are deleted
    so that their keys can be used again in this transaction."""
    if not wanted:
        return {}
    rows = session.execute(
        select(IdempotencyKey).where(
            IdempotencyKey.api_key_id.in_({api_key_id for api_key_id, _ in wanted}),
            IdempotencyKey.key.in_({key for _, key in wanted}),
        )
    ).scalars()
    cutoff = expiry_cutoff()
    live: dict[Scope, Remembered] = {}
    expired: list[int] = []
    for row in rows:
        scope = (row.api_key_id, row.key)
        if scope not in wanted:
            continue  # another key's record with the same string: never seen
        if row.created_at <= cutoff:
            expired.append(row.id)
        else:
            live[scope] = Remembered(row.job_id, row.request_hash)
    if expired:
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.id.in_(expired)))
    return live


def remember(session: Session, records: Sequence[NewRecord]) -> None:
    """Insert the records of jobs stored in this transaction (one multi-row INSERT)."""
    session.add_all(
        IdempotencyKey(
            api_key_id=record.api_key_id,
            key=record.key,
            request_hash=record.request_hash,
            job_id=record.job_id,
        )
        for record in records
    )
    session.flush()


def delete_expired(session: Session, *, limit: int = 1000) -> int:
    """Delete up to `limit` expired records (for the sweeper); how many were deleted."""
    ids = list(
        session.scalars(
            select(IdempotencyKey.id)
            .where(IdempotencyKey.created_at <= expiry_cutoff())
            .order_by(IdempotencyKey.created_at)
            .limit(limit)
        )
    )
    if ids:
        session.execute(delete(IdempotencyKey).where(IdempotencyKey.id.in_(ids)))
    return len(ids)


def expiry_cutoff() -> datetime:
    """Records created at or before this time have expired."""
    return utcnow() - IDEMPOTENCY_TTL
