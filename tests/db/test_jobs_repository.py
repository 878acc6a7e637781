"""The jobs repository against Postgres: creation, claims and leases, terminal moves, the outbox."""

from __future__ import annotations

import re
import uuid
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from darkroom.identities import Operation
from db.models import Job, JobRequeue, JobState, utcnow
from db.repositories import jobs, routing
from db.repositories.jobs import ClaimOutcome, NewJob, OutputRecord
from db.repositories.keys import IssuedKey, create_key
from tests.conftest import count_rows

LEASE_S = 60.0


def _new(session: Session, key: IssuedKey, webhook_url: str | None = None) -> Job:
    job = jobs.create_job(
        session,
        NewJob(
            api_key_id=key.row.id,
            operation=Operation.IMG2IMG,
            endpoint="v6",
            params={"prompt": "a red fox", "samples": 1},
            meta={"seed": 7},
            track_id=None,
            webhook_url=webhook_url,
        ),
    )
    session.commit()
    return job


def _set(session: Session, job_id: int, **values: object) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(**values))
    session.commit()


def _expire_lease(session: Session, job_id: int) -> None:
    _set(session, job_id, lease_until=utcnow() - timedelta(seconds=1))


def _reload(session: Session, job_id: int) -> Job:
    session.expire_all()
    job = session.get(Job, job_id)
    assert job is not None
    return job


def _outputs(job: Job, n: int) -> list[OutputRecord]:
    return [
        OutputRecord(index=i, filename=f"{job.file_prefix}-{i}.png", width=64, height=48, seed=i)
        for i in range(n)
    ]


def _claim(session: Session, job_id: int, max_attempts: int = 3) -> ClaimOutcome:
    outcome, _job = jobs.claim_job(session, job_id, lease_s=LEASE_S, max_attempts=max_attempts)
    session.commit()
    return outcome


def _ago(seconds: float) -> datetime:
    return utcnow() - timedelta(seconds=seconds)


def test_create_job_is_queued_with_a_random_prefix(db: Session, api_key: IssuedKey) -> None:
    first = _new(db, api_key)
    second = _new(db, api_key)
    row = _reload(db, first.id)
    assert row.state == JobState.QUEUED
    assert row.attempts == 0
    assert row.enqueued_at is None
    assert row.lease_until is None
    assert row.params == {"prompt": "a red fox", "samples": 1}
    assert re.fullmatch(r"[0-9a-f]{32}", row.file_prefix)
    assert row.file_prefix != second.file_prefix


def test_claim_then_busy_while_leased(db: Session, api_key: IssuedKey) -> None:
    job = _new(db, api_key)
    before = utcnow()
    outcome, claimed = jobs.claim_job(db, job.id, lease_s=LEASE_S, max_attempts=3)
    db.commit()
    assert outcome == ClaimOutcome.CLAIMED
    assert claimed is not None
    assert claimed.state == JobState.PROCESSING
    assert claimed.attempts == 1
    assert claimed.lease_until is not None
    assert claimed.lease_until >= before + timedelta(seconds=LEASE_S - 1)

    assert _claim(db, job.id) == ClaimOutcome.BUSY
    assert _reload(db, job.id).attempts == 1


def test_expired_lease_can_be_claimed_again(db: Session, api_key: IssuedKey) -> None:
    job = _new(db, api_key)
    assert _claim(db, job.id) == ClaimOutcome.CLAIMED
    _expire_lease(db, job.id)
    assert _claim(db, job.id) == ClaimOutcome.CLAIMED
    row = _reload(db, job.id)
    assert row.attempts == 2
    assert row.state == JobState.PROCESSING
    assert row.lease_until is not None
    assert row.lease_until > utcnow()


def test_a_claim_says_whether_it_took_over_an_expired_run(db: Session, api_key: IssuedKey) -> None:
    job = _new(db, api_key)
    first = jobs.take_job(db, job.id, lease_s=LEASE_S, max_attempts=3)
    assert (first.outcome, first.took_over) == (ClaimOutcome.CLAIMED, False)
    assert first.job is not None
    first_started_at = first.job.started_at
    busy = jobs.take_job(db, job.id, lease_s=LEASE_S, max_attempts=3)
    assert (busy.outcome, busy.took_over) == (ClaimOutcome.BUSY, False)
    _expire_lease(db, job.id)
    second = jobs.take_job(db, job.id, lease_s=LEASE_S, max_attempts=3)
    assert (second.outcome, second.took_over) == (ClaimOutcome.CLAIMED, True)
    assert second.job is not None
    assert second.job.attempts == 2
    # The lost first run stays in the job's history, where the takeover overwrote its columns.
    [lost] = _lost_runs(db, job.id)
    assert (lost.previous_attempts, lost.previous_state) == (1, JobState.PROCESSING)
    assert lost.previous_started_at == first_started_at
    assert lost.reason == jobs.LOST_RUN


def _lost_runs(db: Session, job_id: int) -> list[JobRequeue]:
    return list(db.scalars(select(JobRequeue).where(JobRequeue.job_id == job_id)))


def test_out_of_attempts_is_exhausted(db: Session, api_key: IssuedKey) -> None:
    job = _new(db, api_key)
    assert _claim(db, job.id, max_attempts=2) == ClaimOutcome.CLAIMED
    _expire_lease(db, job.id)
    assert _claim(db, job.id, max_attempts=2) == ClaimOutcome.CLAIMED
    _expire_lease(db, job.id)
    assert _claim(db, job.id, max_attempts=2) == ClaimOutcome.EXHAUSTED
    assert _reload(db, job.id).attempts == 2

    queued = _new(db, api_key)
    _set(db, queued.id, attempts=3)
    assert _claim(db, queued.id, max_attempts=3) == ClaimOutcome.EXHAUSTED
    assert _reload(db, queued.id).state == JobState.QUEUED


def test_claim_terminal_and_missing(db: Session, api_key: IssuedKey) -> None:
    job = _new(db, api_key)
    assert jobs.fail_job(db, job.id, "nope")
    db.commit()
    assert _claim(db, job.id) == ClaimOutcome.TERMINAL
    assert _reload(db, job.id).attempts == 0
    assert jobs.claim_job(db, 2_000_000_000, lease_s=LEASE_S, max_attempts=3) == (
        ClaimOutcome.MISSING,
        None,
    )


def test_complete_job_once(db: Session, api_key: IssuedKey) -> None:
    job = _new(db, api_key)
    assert _claim(db, job.id) == ClaimOutcome.CLAIMED
    assert jobs.complete_job(
        db, job.id, outputs=_outputs(job, 2), meta={"seed": 1}, generation_time=1.5
    )
    db.commit()
    assert not jobs.complete_job(
        db, job.id, outputs=_outputs(job, 2), meta={"seed": 2}, generation_time=9.0
    )
    db.commit()
    row = _reload(db, job.id)
    assert row.state == JobState.SUCCESS
    assert row.meta == {"seed": 1}
    assert row.generation_time == 1.5
    assert row.lease_until is None
    assert row.finished_at is not None
    assert [o.index for o in row.outputs] == [0, 1]
    assert count_rows(db, "job_outputs", f"job_id = {job.id}") == 2
    assert not jobs.fail_job(db, job.id, "late failure")
    db.commit()
    row = _reload(db, job.id)
    assert row.state == JobState.SUCCESS
    assert row.error is None


def test_complete_needs_a_processing_job(db: Session, api_key: IssuedKey) -> None:
    job = _new(db, api_key)
    assert not jobs.complete_job(db, job.id, outputs=_outputs(job, 1), meta={}, generation_time=1)
    db.commit()
    assert _reload(db, job.id).state == JobState.QUEUED
    assert count_rows(db, "job_outputs", f"job_id = {job.id}") == 0


def test_fail_job_once(db: Session, api_key: IssuedKey) -> None:
    job = _new(db, api_key)
    assert _claim(db, job.id) == ClaimOutcome.CLAIMED
    assert jobs.fail_job(db, job.id, "first reason")
    db.commit()
    assert not jobs.fail_job(db, job.id, "second reason")
    db.commit()
    row = _reload(db, job.id)
    assert row.state == JobState.FAILED
    assert row.error == "first reason"
    assert row.lease_until is None


def test_get_job_for_key_hides_other_keys(db: Session, api_key: IssuedKey) -> None:
    job = _new(db, api_key)
    other = create_key(db, f"other-{uuid.uuid4().hex[:6]}")
    db.commit()
    found = jobs.get_job_for_key(db, job.id, api_key.row.id)
    assert found is not None
    assert found.id == job.id
    assert jobs.get_job_for_key(db, job.id, other.row.id) is None
    assert jobs.get_job_for_key(db, 2_000_000_000, api_key.row.id) is None
    assert jobs.get_job(db, job.id) is not None


def test_never_published_and_long_queued_jobs(db: Session, api_key: IssuedKey) -> None:
    never_old = _new(db, api_key)
    _set(db, never_old.id, created_at=_ago(60))
    fresh = _new(db, api_key)
    stale = _new(db, api_key)
    _set(db, stale.id, created_at=_ago(3600), enqueued_at=_ago(600))
    recent = _new(db, api_key)
    _set(db, recent.id, created_at=_ago(3600), enqueued_at=_ago(10))
    running = _new(db, api_key)
    _set(
        db,
        running.id,
        created_at=_ago(3600),
        state=JobState.PROCESSING,
        lease_until=utcnow() + timedelta(seconds=60),
    )
    done = _new(db, api_key)
    _set(db, done.id, created_at=_ago(3600), state=JobState.FAILED)

    def picked() -> set[int]:
        never = jobs.never_published(db, created_before=_ago(5), limit=100_000)
        long = jobs.long_queued(db, published_before=_ago(300), limit=100_000)
        return {*never, *(job_id for job_id, _queue in long)}

    assert never_old.id in picked()
    assert stale.id in picked()
    assert not picked() & {fresh.id, recent.id, running.id, done.id}

    routing.mark_published(db, [never_old.id], "jobs")
    db.commit()
    assert never_old.id not in picked()
    assert _reload(db, never_old.id).enqueued_at is not None


def test_requeue_only_expired_processing_jobs(db: Session, api_key: IssuedKey) -> None:
    queued = _new(db, api_key)
    assert not jobs.requeue_job(db, queued.id)

    live = _new(db, api_key)
    assert _claim(db, live.id) == ClaimOutcome.CLAIMED
    assert not jobs.requeue_job(db, live.id)
    db.commit()
    assert _reload(db, live.id).state == JobState.PROCESSING
    assert live.id not in {j.id for j in jobs.jobs_with_expired_lease(db, limit=100_000)}

    orphan = _new(db, api_key)
    assert _claim(db, orphan.id) == ClaimOutcome.CLAIMED
    routing.mark_published(db, [orphan.id], "jobs")
    _expire_lease(db, orphan.id)
    assert orphan.id in {j.id for j in jobs.jobs_with_expired_lease(db, limit=100_000)}
    assert jobs.requeue_job(db, orphan.id)
    db.commit()
    row = _reload(db, orphan.id)
    assert row.state == JobState.QUEUED
    assert row.enqueued_at is None
    assert row.lease_until is None
    assert row.attempts == 1
    [lost] = _lost_runs(db, orphan.id)  # the requeue keeps the dead run in the job's history
    assert (lost.previous_attempts, lost.previous_started_at) == (1, row.started_at)
    assert not jobs.requeue_job(db, orphan.id)
    assert len(_lost_runs(db, orphan.id)) == 1
    assert _lost_runs(db, live.id) == []

    finished = _new(db, api_key)
    assert _claim(db, finished.id) == ClaimOutcome.CLAIMED
    assert jobs.fail_job(db, finished.id, "x")
    _set(db, finished.id, lease_until=_ago(5))
    assert not jobs.requeue_job(db, finished.id)


def test_extend_lease(db: Session, api_key: IssuedKey) -> None:
    job = _new(db, api_key)
    assert not jobs.extend_lease(db, job.id, LEASE_S, attempt=0)
    assert _claim(db, job.id) == ClaimOutcome.CLAIMED
    _expire_lease(db, job.id)
    assert not jobs.extend_lease(db, job.id, LEASE_S, attempt=0)  # not this claim's token
    assert jobs.extend_lease(db, job.id, LEASE_S, attempt=1)
    db.commit()
    lease = _reload(db, job.id).lease_until
    assert lease is not None
    assert lease > utcnow() + timedelta(seconds=LEASE_S - 5)


@pytest.mark.parametrize("state", [JobState.SUCCESS, JobState.FAILED])
def test_fail_job_refuses_terminal(db: Session, api_key: IssuedKey, state: JobState) -> None:
    job = _new(db, api_key)
    _set(db, job.id, state=state, error="kept")
    assert not jobs.fail_job(db, job.id, "overwritten?")
    db.commit()
    row = _reload(db, job.id)
    assert row.state == state
    assert row.error == "kept"
