"""Accepting jobs: store them and commit; the outbox then publishes their ids.

Rows are committed before their ids reach the broker (`services.outbox` sends them once the
commit returns), so a worker never receives an id it cannot read. If publishing fails a row
keeps `enqueued_at` empty and the sweeper sends it later: an accepted job is never lost.
Submissions are stored in groups (`api.intake`): one admission read, one multi-row insert and
one commit serve every submission of a group, and their publish marks one statement per queue.
Each id goes to the queue model-affinity routing picks (`services.routing`), recorded in
`queue_name`.

One client's bad input never fails another's request: a group that cannot be stored because of
what one of its items holds is stored again in halves, down to the item at fault, which alone
gets the refusal. A submit with an `Idempotency-Key` stores the key with its job, in the same
transaction; a retry with the same key and body answers that job (`Replayed`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from celery import Celery
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session

from api.errors import INVALID_KEY, ApiError
from api.limits import Admission
from darkroom.jobspec import JobSpec, batch_key, describe
from darkroom.settings import Settings
from db.models import ApiKey, Job
from db.repositories import idempotency, jobs
from db.repositories.jobs import NewJob
from db.repositories.keys import active_keys_by_digest, hash_key
from db.session import session_factory
from services.eta import DEFAULT_ETA_S, group_etas
from services.jobs import publish
from services.progress_events import events_meta

log = logging.getLogger(__name__)

#: The answer to a submission the database refused for a value it holds (a field the API's
#: checks let through); the other submissions stored with it are not affected.
UNSTORABLE = "The request holds a value that cannot be stored; check its text fields."
#: The answer to an Idempotency-Key sent again with another body (422, as the IETF draft on
#: the Idempotency-Key header says; Stripe answers 400).
IDEMPOTENCY_MISMATCH = (
    "This Idempotency-Key was already used with a different request; use a new key for a new"
    " request."
)
#: The answer when a concurrent request with the same Idempotency-Key (at another API
#: replica) stored its job while this one was being stored: a retry answers that job.
IDEMPOTENCY_IN_FLIGHT = "A request with this Idempotency-Key is being stored; retry it."
#: Body fields that do not make a request a different one: the credentials and the wait.
_NOT_HASHED = frozenset({"key", "wait"})


class SubmitRequest(Protocol):
    """What every endpoint's request model offers (see api.schemas)."""

    @property
    def webhook(self) -> str | None: ...

    def to_spec(self) -> JobSpec: ...

    def warnings(self) -> list[str]: ...

    def model_errors(self, settings: Settings) -> dict[str, list[str]]: ...


@dataclass(frozen=True)
class Idempotency:
    """A submit's Idempotency-Key and the digest of what it asks for."""

    key: str
    request_hash: str


def request_digest(path: str, body: dict[str, Any]) -> str:
    """What makes two submissions the same request: the path and the body, less the
    credentials and the wait (the same request may be retried with the key in a header)."""
    asked = {name: value for name, value in body.items() if name not in _NOT_HASHED}
    canonical = json.dumps([path, asked], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class PreparedJob:
    """A validated request, ready to be stored once its key is known."""

    spec: JobSpec
    key_digest: str  # the presented key's digest: keys are checked a group at a time
    endpoint: str
    meta: dict[str, Any]
    webhook_url: str | None
    file_prefix: str
    idempotency: Idempotency | None = None

    def new_job(self, api_key_id: int) -> NewJob:
        """The row to insert for the key `api_key_id`."""
        spec = self.spec
        return NewJob(
            api_key_id=api_key_id,
            operation=spec.operation,
            endpoint=self.endpoint,
            params=spec.to_row(),
            meta=self.meta,
            track_id=None if spec.track_id is None else str(spec.track_id),
            webhook_url=self.webhook_url,
            batch_key=batch_key(spec),
            file_prefix=self.file_prefix,
        )


@dataclass(frozen=True)
class Accepted:
    """A stored job, the key that submitted it and the eta to quote."""

    job: Job
    key: ApiKey
    eta: float


@dataclass(frozen=True)
class Replayed:
    """A retry: the job an earlier request with the same Idempotency-Key and body created."""

    job_id: int
    key: ApiKey


Outcome = Accepted | Replayed | BaseException


class _NotStoredError(Exception):
    """The group's transaction failed before its commit: nothing of it was stored."""


def prepare_job(
    settings: Settings,
    presented_key: str,
    request: SubmitRequest,
    endpoint: str,
    idempotency: Idempotency | None = None,
) -> PreparedJob:
    """Check what the request names and build its row (no database access)."""
    errors = request.model_errors(settings)
    if errors:
        raise ApiError(422, errors)
    spec = request.to_spec()
    file_prefix = jobs.new_file_prefix()
    return PreparedJob(
        spec=spec,
        key_digest=hash_key(presented_key),
        endpoint=endpoint,
        meta=describe(spec, file_prefix, request.warnings()) | events_meta(request),
        webhook_url=request.webhook,
        file_prefix=file_prefix,
        idempotency=idempotency,
    )


def store_jobs(
    settings: Settings, broker: Celery, group: Sequence[PreparedJob], *, attempt: int = 1
) -> list[Outcome]:
    """Authenticate, admit, insert and commit a group of jobs, then publish them: one outcome
    per job, in order (the stored job, the earlier job of its Idempotency-Key, or the error
    that refused it). Never raises: a failure after the others were stored must not hide them."""
    try:
        return _store_group(settings, broker, group)
    except _NotStoredError as failure:
        cause = failure.__cause__ or failure
        return _isolate(settings, broker, group, cause, attempt)
    except Exception as exc:  # at or after the commit: the group may have been stored
        return [exc] * len(group)


def _isolate(
    settings: Settings,
    broker: Celery,
    group: Sequence[PreparedJob],
    cause: BaseException,
    attempt: int,
) -> list[Outcome]:
    """Nothing of `group` was stored because of `cause`: store its halves apart, down to the
    item at fault, so that one client's bad input never fails another's request (a group of
    64 with one such item costs about 12 more short transactions)."""
    if _database_down(cause):
        return [cause] * len(group)  # no item is at fault; splitting would only add load
    if len(group) == 1:
        if _idempotency_conflict(cause) and attempt == 1:
            # Another process stored the same Idempotency-Key meanwhile (its INSERT held ours
            # until it committed): stored again, this one answers that job.
            return store_jobs(settings, broker, group, attempt=2)
        return [_refusal(cause)]
    log.warning(
        "a group of %d submissions could not be stored (%s); storing its halves apart",
        len(group),
        type(cause).__name__,
    )
    middle = len(group) // 2
    return [
        *store_jobs(settings, broker, group[:middle]),
        *store_jobs(settings, broker, group[middle:]),
    ]


def _idempotency_conflict(error: BaseException) -> bool:
    """Whether the INSERT of an Idempotency-Key met the same key stored by another request."""
    reason = str(error.orig) if isinstance(error, IntegrityError) else ""
    # The constraint's name on Postgres; SQLite names the columns.
    return "uq_idempotency_keys" in reason or "failed: idempotency_keys." in reason


def _database_down(error: BaseException) -> bool:
    """Whether the database, not an item, failed: unreachable, lost, or its pool exhausted."""
    if isinstance(error, OperationalError | PoolTimeoutError):
        return True
    return isinstance(error, DBAPIError) and error.connection_invalidated


def _refusal(cause: BaseException) -> BaseException:
    """What a submission that could not be stored alone answers."""
    if _idempotency_conflict(cause):
        return ApiError(409, IDEMPOTENCY_IN_FLIGHT, retry_after=1)
    if isinstance(cause, UnicodeError | DataError | IntegrityError):
        log.warning("a submission was refused by the database: %s", _first_line(cause))
        return ApiError(422, UNSTORABLE)
    return cause  # unexpected: answered 500 "Internal server error." and logged (api.errors)


def _first_line(error: BaseException) -> str:
    """The database's reason, without the statement and the row (client data) that follow."""
    reason = str(getattr(error, "orig", None) or error)
    return f"{type(error).__name__}: {reason.splitlines()[0][:300] if reason else ''}"


def _store_group(settings: Settings, broker: Celery, group: Sequence[PreparedJob]) -> list[Outcome]:
    """One transaction for the whole group; _NotStoredError if it failed before its commit.

    Once the commit returns, every job of the group is answered as accepted whatever happens
    next (publishing, etas, closing the session): an error answer for a stored job is what
    makes a client that retries create a duplicate. So only a failing commit itself leaves the
    outcome unknown (docs/RELIABILITY.md)."""
    session = session_factory(settings.resolved_database_url)()
    try:
        decisions, admitted, rows = _insert_and_commit(session, settings, broker, group)
        etas = _estimate(session, rows)
    finally:
        _close(session)
    accepted = iter(
        [Accepted(job, key, eta) for job, (_, key), eta in zip(rows, admitted, etas, strict=True)]
    )
    return [next(accepted) if isinstance(d, ApiKey) else d for d in decisions]


def _insert_and_commit(
    session: Session, settings: Settings, broker: Celery, group: Sequence[PreparedJob]
) -> tuple[list[ApiKey | Replayed | ApiError], list[tuple[PreparedJob, ApiKey]], list[Job]]:
    """Decide, insert and commit: each submission's fate, the admitted ones and their rows.
    The rows' ids are published by the outbox once the commit returns (services.outbox)."""
    try:
        decisions = _decide_all(session, settings, group)
        admitted = [
            (prepared, decision)
            for prepared, decision in zip(group, decisions, strict=True)
            if isinstance(decision, ApiKey)
        ]
        rows = _insert(session, admitted)
        for (prepared, _key), job in zip(admitted, rows, strict=True):
            spec = prepared.spec
            publish(session, broker, settings, job.id, spec.operation, spec.model_id)
    except Exception as exc:
        _rollback(session)
        raise _NotStoredError from exc
    session.commit()
    return decisions, admitted, rows


def _rollback(session: Session) -> None:
    """Roll back; on a lost connection there is nothing to roll back, and no one to tell."""
    try:
        session.rollback()
    except Exception:
        log.warning("rollback failed (the connection is gone)", exc_info=True)


def _close(session: Session) -> None:
    """Close the session without raising: its jobs' fate is already decided."""
    try:
        session.close()
    except Exception:
        log.warning("closing a submission session failed", exc_info=True)


def _decide_all(
    session: Session, settings: Settings, group: Sequence[PreparedJob]
) -> list[ApiKey | Replayed | ApiError]:
    """Each submission's fate: its key (to store a new job), its earlier job, or a refusal."""
    keys = active_keys_by_digest(session, {prepared.key_digest for prepared in group})
    remembered = idempotency.find_live(session, _scopes(group, keys))
    admission = Admission(session, settings, {key.id for key in keys.values()})
    return [
        _decide(admission, remembered, prepared, keys.get(prepared.key_digest))
        for prepared in group
    ]


def _scopes(group: Sequence[PreparedJob], keys: dict[str, ApiKey]) -> set[idempotency.Scope]:
    """The (API key, Idempotency-Key) pairs the group's valid submissions carry."""
    scopes = set()
    for prepared in group:
        key = keys.get(prepared.key_digest)
        if key is not None and prepared.idempotency is not None:
            scopes.add((key.id, prepared.idempotency.key))
    return scopes


def _decide(
    admission: Admission,
    remembered: dict[idempotency.Scope, idempotency.Remembered],
    prepared: PreparedJob,
    key: ApiKey | None,
) -> ApiKey | Replayed | ApiError:
    """The key, once its job is counted; the job its Idempotency-Key already created; or why
    the job may not be queued now."""
    if key is None:
        return ApiError(401, INVALID_KEY)
    claim = prepared.idempotency
    earlier = None if claim is None else remembered.get((key.id, claim.key))
    if claim is not None and earlier is not None:
        if earlier.request_hash != claim.request_hash:
            return ApiError(422, IDEMPOTENCY_MISMATCH)
        return Replayed(earlier.job_id, key)  # counted when it was first stored
    try:
        admission.admit(key.id)
    except ApiError as refusal:
        return refusal
    return key


def _insert(session: Session, admitted: Sequence[tuple[PreparedJob, ApiKey]]) -> list[Job]:
    """Insert the admitted jobs and their Idempotency-Keys (two multi-row INSERTs at most).

    Two submissions of one group with the same key make the second INSERT fail on the unique
    constraint; stored apart (see _isolate), the second one then answers the first one's job.
    """
    rows = jobs.create_jobs(session, [prepared.new_job(key.id) for prepared, key in admitted])
    records = [
        idempotency.NewRecord(
            key.id, prepared.idempotency.key, prepared.idempotency.request_hash, job.id
        )
        for (prepared, key), job in zip(admitted, rows, strict=True)
        if prepared.idempotency is not None
    ]
    if records:
        idempotency.remember(session, records)
    return rows


def _estimate(session: Session, rows: Sequence[Job]) -> list[float]:
    """The committed jobs' etas; the default on any failure (the jobs are accepted whatever
    happens here, so the client still gets its processing answer)."""
    try:
        return _etas(session, rows)
    except Exception:
        _rollback(session)
        log.exception("jobs %s stored; their etas could not be read", [j.id for j in rows])
        return [DEFAULT_ETA_S] * len(rows)


def _etas(session: Session, rows: Sequence[Job]) -> list[float]:
    """Each new job's eta, from one look at the queue: a job of the group also waits for the
    ones stored before it."""
    if not rows:
        return []
    return group_etas(jobs.queue_snapshot(session, rows[0]), rows)
