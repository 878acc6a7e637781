"""Sending progress webhooks (`start`, `progress`): one attempt each, recorded, never retried.

A thread of the dispatcher process (`darkroom dispatcher` starts it beside the sweeper) claims
the due rows of progress_deliveries that GPU workers recorded, POSTs each once with the same
attempt as terminal webhooks (`dispatcher.attempt`: Standard Webhooks signature with the key's
secrets, the SSRF guard, the overall deadline) plus a `webhook-event` header, and records the
outcome. It has its own thread and rows: the terminal deliveries' loop and pool never wait for
it. A slow receiver only slows this job's (and others') progress news, which the sweeper gives
up once their job has ended.

A claim holds its delivery for a lease as long as a terminal delivery's (`lease_seconds`: longer
than any attempt), on the database's clock. A dispatcher that dies mid-attempt leaves its rows
`sending`; once the lease is over another claims them (one at a time) while their job still
runs, or the sweeper gives them up once it has ended. The per-job cap counts rows, not attempts:
taking an abandoned row over adds none, so the cap holds.
"""

from __future__ import annotations

import logging
import threading

from darkroom.settings import Settings
from db.repositories import progress
from db.repositories.progress import ClaimedProgress
from db.session import session_scope
from worker.webhooks.dispatcher import Ticket, attempt, lease_seconds

log = logging.getLogger(__name__)

#: Progress deliveries claimed at a time.
CLAIM_LIMIT = 20
#: With nothing due, how long before looking again.
POLL_S = 0.25


def send_due(settings: Settings) -> int:
    """Claim the due progress deliveries, attempt each once and record it; how many."""
    with session_scope(settings.resolved_database_url) as session:
        claimed = progress.claim_due(session, limit=CLAIM_LIMIT, lease_s=lease_seconds(settings))
    for delivery in claimed:
        _send(settings, delivery)
    return len(claimed)


def _send(settings: Settings, delivery: ClaimedProgress) -> None:
    """One signed attempt of one progress delivery, recorded."""
    ticket = Ticket(
        delivery.id,
        delivery.url,
        delivery.payload,
        delivery.message_id,
        delivery.secrets,
        delivery.job_id,
        delivery.track_id,
        event=delivery.event,
    )
    record = attempt(ticket, settings).record
    log.info(
        "progress webhook %s of job %s: %s",
        delivery.event,
        delivery.job_id,
        record.status_code or record.error,
    )
    with session_scope(settings.resolved_database_url) as session:
        recorded = progress.record_attempt(
            session,
            delivery,
            status_code=record.status_code,
            error=record.error,
            duration_ms=record.latency_ms,
        )
    if not recorded:
        log.warning(
            "progress webhook %s of job %s: its claim expired mid-attempt; another dispatcher's"
            " outcome is kept",
            delivery.event,
            delivery.job_id,
        )


def run_progress_sender(settings: Settings, stop: threading.Event) -> None:
    """Send progress webhooks until `stop` is set; a failing round is logged and retried."""
    while not stop.is_set():
        try:
            sent = send_due(settings)
        except Exception:
            log.exception("progress webhooks: a round failed; trying again")
            sent = 0
        if not sent:
            stop.wait(POLL_S)
