"""Progress webhooks never stay `sending`: a claim holds its row for a lease on the database's
clock; once a dispatcher that died mid-attempt has let it run out, the row is claimed again
(never while the lease is live), while its job runs; for an ended job the sweeper gives it up.

A dead dispatcher is what it leaves in the database: a row claimed in a committed transaction
whose attempt was never recorded (`claim_due`, then nothing). Its lease running out is the
database's clock passing `lease_until` (moved back here rather than waited for, so no timing is
involved). The sender that takes it over is the real one, POSTing to a loopback receiver.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Interval, literal, update

from darkroom.settings import Settings
from db.clock import DbNow
from db.models import Job, JobState, ProgressDelivery
from db.repositories import progress
from db.repositories.keys import IssuedKey, create_key
from db.session import session_scope
from tests.support.rows import job_row
from tests.support.servers import WebhookReceiver
from worker.sweeper import prune_progress
from worker.webhooks.progress import send_due

#: The lease the dead dispatcher's claim held (as a real one's, far longer than the test).
DEAD_LEASE_S = 3600.0


@pytest.fixture
def own(settings: Settings, own_pg_url: str) -> Settings:
    """Settings on a database of this test alone: the sender claims every due row."""
    return settings.model_copy(update={"database_url": own_pg_url})


@pytest.fixture
def key(own: Settings) -> IssuedKey:
    with session_scope(own.resolved_database_url) as session:
        return create_key(session, "progress-leases")


def _job_with_start_event(settings: Settings, key: IssuedKey, url: str) -> int:
    """A running job with a `start` delivery due, as a worker records it."""
    with session_scope(settings.resolved_database_url) as session:
        job = job_row(session, key.row.id, webhook=url, state=JobState.PROCESSING)
        progress.create_delivery(session, job.id, "start", url, '{"event":"start"}')
        return job.id


def _die_mid_attempt(settings: Settings) -> progress.ClaimedProgress:
    """Claim the due delivery as a dispatcher that then dies: committed, never recorded."""
    with session_scope(settings.resolved_database_url) as session:
        [claimed] = progress.claim_due(session, limit=10, lease_s=DEAD_LEASE_S)
    return claimed


def _lease_runs_out(settings: Settings, job_id: int) -> None:
    """The database's clock passes the claim's lease."""
    with session_scope(settings.resolved_database_url) as session:
        session.execute(
            update(ProgressDelivery)
            .where(ProgressDelivery.job_id == job_id)
            .values(lease_until=DbNow() - literal(timedelta(seconds=1), Interval()))
        )


def _row(settings: Settings, job_id: int) -> tuple[str, int | None]:
    with session_scope(settings.resolved_database_url) as session:
        [row] = progress.deliveries_for_job(session, job_id)
        return row.state, row.status_code


def test_an_abandoned_claim_is_sent_once_its_lease_is_over(
    own: Settings, key: IssuedKey, receiver: WebhookReceiver
) -> None:
    job_id = _job_with_start_event(own, key, receiver.url)
    dead = _die_mid_attempt(own)
    assert _row(own, job_id) == ("sending", None)
    assert send_due(own) == 0  # its lease is live: one claim at a time

    _lease_runs_out(own, job_id)
    assert send_due(own) == 1  # taken over, attempted, recorded
    assert send_due(own) == 0  # and never again
    assert [r.headers["webhook-event"] for r in receiver.snapshot()] == ["start"]
    assert _row(own, job_id) == ("delivered", 200)

    # The dead claimer, had it only stalled, cannot overwrite the outcome that was kept.
    with session_scope(own.resolved_database_url) as session:
        assert not progress.record_attempt(
            session, dead, status_code=None, error="late", duration_ms=1.0
        )
    assert _row(own, job_id) == ("delivered", 200)
    with session_scope(own.resolved_database_url) as session:
        # Taking a row over added none: the per-job cap counts the same one row.
        assert progress.count_deliveries(session, job_id, "start") == 1


def test_an_abandoned_claim_of_an_ended_job_is_given_up_not_sent(
    own: Settings, key: IssuedKey, receiver: WebhookReceiver
) -> None:
    job_id = _job_with_start_event(own, key, receiver.url)
    _die_mid_attempt(own)
    with session_scope(own.resolved_database_url) as session:
        session.get_one(Job, job_id).state = JobState.SUCCESS

    prune_progress(own)
    assert _row(own, job_id) == ("sending", None)  # a live claim is left to finish
    _lease_runs_out(own, job_id)
    assert send_due(own) == 0  # stale news: not repeated after the job ended
    prune_progress(own)
    assert _row(own, job_id) == ("failed", None)
    assert receiver.snapshot() == []
