"""Delivering one webhook attempt: claim the row, POST signed, record, schedule what's next.

Runs in the dispatcher's own process, never on a GPU worker, so a slow receiver only ever holds
a dispatcher thread. The schedule lives in the delivery row, not in memory. `deliver` makes one
attempt of one delivery (a Celery task with the embedded broker, and the tests);
worker.webhooks.loop claims, attempts and records them in batches with the same pieces.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import httpx

from darkroom import metrics, outbound
from darkroom.logs import job_context
from darkroom.settings import Settings
from darkroom.urlguard import UnsafeURLError, check_url
from db.models import DeliveryState, utcnow
from db.repositories import keys, webhooks
from db.repositories.webhooks import AttemptOutcome, AttemptRecord, ClaimedDelivery
from db.session import session_scope
from worker.webhooks.signing import signed_headers

log = logging.getLogger(__name__)

EXCERPT_BYTES = 500
MAX_RETRY_AFTER_S = 6 * 3600.0
USER_AGENT = "Darkroom-Webhooks/0.1"


@dataclass(frozen=True)
class Ticket:
    """A claimed delivery: everything one attempt needs, read inside the claim's transaction."""

    delivery_id: int
    url: str
    payload: str
    message_id: str
    secrets: list[str]
    job_id: int | None = None
    track_id: str | None = None
    #: Attempts made before this one.
    attempt_count: int = 0
    #: A progress webhook's event (`start`, `progress`), sent as `webhook-event`; None: terminal.
    event: str | None = None

    @classmethod
    def of(cls, claimed: ClaimedDelivery) -> Ticket:
        """The ticket of a delivery claimed in a batch."""
        return cls(
            claimed.id,
            claimed.url,
            claimed.payload,
            claimed.message_id,
            claimed.secrets,
            claimed.job_id,
            claimed.track_id,
            claimed.attempt_count,
        )


@dataclass(frozen=True)
class AttemptResult:
    """What one attempt produced, and what the receiver asked of the schedule."""

    record: AttemptRecord
    retry_after_s: float | None = None

    @property
    def delivered(self) -> bool:
        code = self.record.status_code
        return code is not None and 200 <= code < 300

    @property
    def gone(self) -> bool:
        """410 Gone: the receiver wants no more attempts."""
        return self.record.status_code == 410


def deliver(delivery_id: int, settings: Settings) -> None:
    """Make one attempt of a due delivery; a delivery that is not due is left alone."""
    ticket = _claim(delivery_id, settings)
    if ticket is None:
        return
    outcome = attempt_logged(ticket, settings)
    with session_scope(settings.resolved_database_url) as session:
        webhooks.record_outcomes(session, [outcome])
    note_outcome(ticket, outcome)


def attempt_logged(ticket: Ticket, settings: Settings) -> AttemptOutcome:
    """`attempt`, counted and logged with the delivery's ids; what must follow it."""
    context = {"job_id": ticket.job_id, "track_id": ticket.track_id}
    with job_context(**context, delivery_id=ticket.delivery_id):
        result = attempt(ticket, settings)
        metrics.record_webhook_attempt(result.record)
        # A delivered attempt is logged at DEBUG: formatting a JSON line for each was ~4% of an
        # attempt's CPU, and its row, the attempt metrics and the delivery's state say it all.
        # Anything else (an error, a non-2xx answer) stays at INFO for the operators.
        level = logging.DEBUG if result.delivered else logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "webhook attempt: %s", result.record.status_code or result.record.error)
    return outcome_of(ticket, result, settings)


def lease_seconds(settings: Settings) -> float:
    """How long a claim holds a delivery: longer than any attempt can last, so no two overlap.

    An attempt is bounded by DARKROOM_WEBHOOK_TIMEOUT_S in total (see `attempt`) plus the
    guard's DNS lookup, which the system resolver bounds (30 s at most with glibc's defaults).
    """
    return settings.webhook_timeout_s * 2 + 30


def _claim(delivery_id: int, settings: Settings) -> Ticket | None:
    lease_s = lease_seconds(settings)
    with session_scope(settings.resolved_database_url) as session:
        delivery = webhooks.claim_delivery(session, delivery_id, lease_s=lease_s)
        if delivery is None:
            return None
        key = keys.get_key(session, delivery.api_key_id)
        assert key is not None, "a delivery always has its key"
        secrets = key.signing_secrets(utcnow())
        return Ticket(
            delivery.id,
            delivery.url,
            delivery.payload,
            delivery.message_id,
            secrets,
            delivery.job_id,
            delivery.job.track_id if delivery.job is not None else None,
            delivery.attempt_count,
        )


def attempt(ticket: Ticket, settings: Settings) -> AttemptResult:
    """POST the signed payload once; never raises for network trouble, it is recorded.

    DARKROOM_WEBHOOK_TIMEOUT_S bounds the whole exchange: connecting, TLS, sending, the answer's
    head and the excerpt of its body; every socket operation waits at most the time left, so a
    receiver dripping its headers is cut off too. The POST goes through this thread's kept
    transport for the receiver's host name (`outbound.thread_transport`: keep-alive without a
    pool lock shared between threads, and never a connection whose TLS was verified for another
    host name that resolved to the same address), without an httpx.Client (`outbound.send`).
    """
    started = time.perf_counter()
    try:
        with outbound.deadline(settings.webhook_timeout_s):
            target = check_url(ticket.url, settings.url_allowlist).pinned()
            headers = signed_headers(ticket.secrets, ticket.message_id, utcnow(), ticket.payload)
            headers |= {"content-type": "application/json", "user-agent": USER_AGENT}
            if ticket.event is not None:
                headers["webhook-event"] = ticket.event
            with outbound.send(
                "POST",
                target,
                timeout=settings.webhook_timeout_s,
                headers=headers,
                content=ticket.payload,
            ) as response:
                excerpt = _read_excerpt(response)
    except (httpx.HTTPError, UnsafeURLError, TimeoutError) as exc:
        return AttemptResult(AttemptRecord(None, _ms_since(started), None, _describe(exc)))
    record = AttemptRecord(response.status_code, _ms_since(started), excerpt, None)
    return AttemptResult(record, _retry_after(response))


def _read_excerpt(response: httpx.Response) -> str:
    """The start of the decoded body, never more than we keep, read under the deadline.

    A body in a coding we do not undo (or corrupt, or stacked too deep) does not change the
    attempt's outcome, which is the status code: the excerpt just says so. NUL characters are
    replaced: Postgres text cannot hold them, and one would make the attempt unrecordable.
    """
    try:
        body = outbound.read_body(response, EXCERPT_BYTES, truncate=True)
    except outbound.BadEncodingError as exc:
        return f"[{exc}]"
    return body.decode("utf-8", errors="replace").replace("\x00", "\ufffd")


def outcome_of(ticket: Ticket, result: AttemptResult, settings: Settings) -> AttemptOutcome:
    """Delivered on a 2xx; failed on 410 Gone or when the schedule is exhausted; otherwise due
    again after the schedule's next delay."""
    if result.delivered:
        return AttemptOutcome(ticket.delivery_id, result.record, DeliveryState.DELIVERED)
    delay = next_delay(ticket.attempt_count + 1, settings, result.retry_after_s)
    if result.gone or delay is None:
        return AttemptOutcome(ticket.delivery_id, result.record, DeliveryState.FAILED)
    return AttemptOutcome(ticket.delivery_id, result.record, DeliveryState.PENDING, delay)


def note_outcome(ticket: Ticket, outcome: AttemptOutcome) -> None:
    """Count and log a recorded outcome that ended the delivery."""
    if outcome.state == DeliveryState.PENDING:
        return
    metrics.record_delivery_end(outcome.state)
    if outcome.state == DeliveryState.FAILED:
        attempts = ticket.attempt_count + 1
        log.warning("webhook %s abandoned after %s attempts", ticket.message_id, attempts)


def next_delay(attempts_made: int, settings: Settings, retry_after_s: float | None) -> float | None:
    """Seconds until the next attempt, or None when the schedule is exhausted.

    `webhook_schedule_s[n]` is the wait before attempt n+1 (the first entry, for the first
    attempt, is normally 0). Jitter spreads retries; a receiver's Retry-After can only lengthen
    the wait, up to MAX_RETRY_AFTER_S.
    """
    schedule = settings.webhook_schedule_s
    if attempts_made >= len(schedule):
        return None
    base = schedule[attempts_made]
    delay = base * (1 + random.uniform(-settings.webhook_jitter, settings.webhook_jitter))
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, MAX_RETRY_AFTER_S))
    return delay


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After as seconds, in either of its forms (seconds or an HTTP date)."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max(0.0, (parsedate_to_datetime(value) - utcnow()).total_seconds())
    except (TypeError, ValueError):
        return None


def _describe(exc: Exception) -> str:
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return "timeout"
    if isinstance(exc, UnsafeURLError):
        return f"refused: {exc}"
    return f"connection error: {type(exc).__name__}"


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
