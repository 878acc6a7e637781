"""One thread renews the leases of every batch a worker holds (worker.job_leases): each held
claim is renewed while its block runs, never after, and the thread ends when nothing is held
and comes back with the next batch. Real Postgres; the lease is short so that renewals come
within the test (what is checked is whether they come, not how fast)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta

from darkroom.settings import Settings
from db.models import Job, JobState, utcnow
from db.repositories.keys import IssuedKey
from db.session import session_scope
from tests.support.rows import job_row
from worker.job_leases import JobLeases

#: Renewals every 0.1 s.
LEASE_S = 0.3
PATIENCE_S = 10.0


def running_job(settings: Settings, key: IssuedKey) -> int:
    """A job running under attempt 1, its lease already over (so any renewal shows)."""
    with session_scope(settings.resolved_database_url) as session:
        lease_over = utcnow() - timedelta(minutes=1)
        row = job_row(
            session, key.row.id, state=JobState.PROCESSING, attempts=1, lease_until=lease_over
        )
        return row.id


def lease_of(settings: Settings, job_id: int) -> datetime:
    with session_scope(settings.resolved_database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert job.lease_until is not None
        return job.lease_until


def eventually(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def renewed_after(settings: Settings, job_id: int) -> datetime:
    """Wait for the job's next renewal; its new lease."""
    seen = lease_of(settings, job_id)
    assert eventually(lambda: lease_of(settings, job_id) > seen), f"job {job_id} not renewed"
    return lease_of(settings, job_id)


def test_every_held_claim_is_renewed_while_held_and_never_after(
    settings: Settings, api_key: IssuedKey
) -> None:
    short = settings.model_copy(update={"job_lease_s": LEASE_S})
    leases = JobLeases(short)
    generating, concluding = running_job(short, api_key), running_job(short, api_key)
    stale = running_job(short, api_key)
    lease_over = lease_of(short, stale)

    with leases.renewing({generating: 1, stale: 0}):
        with leases.renewing({concluding: 1}):
            renewed_after(short, generating)
            renewed_after(short, concluding)
        # Two renewals after the release, a beat that read the table before it has ended.
        renewed_after(short, generating)
        renewed_after(short, generating)
        settled = lease_of(short, concluding)
        renewed_after(short, generating)
        assert lease_of(short, concluding) == settled, "renewed after its batch let it go"
    assert lease_of(short, stale) == lease_over  # another claim holds it: not ours to renew

    assert eventually(lambda: leases._thread is None), "the thread outlived the last claim"
    with leases.renewing({generating: 1}):  # the next batch brings the thread back
        renewed_after(short, generating)
