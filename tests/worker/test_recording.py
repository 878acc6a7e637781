"""Recording a batch's successes in one transaction (worker.recording, outcomes.succeed_many):
each job fenced by its own claim, the jobs another run holds left as they are and this run's
files for them deleted, a retry after a lost commit still knowing what it won, and one job whose
row refuses the write not holding back its batch mates. Real Postgres, storage and broker.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from sqlalchemy import event, func, select, update
from sqlalchemy.orm import Session

from darkroom.queue import make_celery
from darkroom.settings import Settings
from db.models import Job, JobOutput, JobState, WebhookDelivery
from db.repositories import jobs
from db.repositories.keys import IssuedKey
from db.session import session_scope
from services import outcomes
from services.outcomes import RunSuccess
from tests.support.rows import queued_job
from worker.recording import record_successes
from worker.runtime import WorkerRuntime

HOOK = "http://127.0.0.1:9/hook"  # never called here: the deliveries are only created


@pytest.fixture
def runtime(settings: Settings) -> WorkerRuntime:
    return WorkerRuntime(settings=settings, broker=make_celery(settings))


def claimed_run(runtime: WorkerRuntime, key: IssuedKey, *, outputs: int = 1) -> RunSuccess:
    """A job claimed by this run, with `outputs` files written under this run's names."""
    settings = runtime.settings
    job_id = queued_job(settings, key.row.id, webhook=HOOK)
    with session_scope(settings.resolved_database_url) as session:
        outcome, job = jobs.claim_job(session, job_id, lease_s=60, max_attempts=3)
    assert outcome == jobs.ClaimOutcome.CLAIMED
    assert job is not None
    records = []
    for index in range(outputs):
        name = f"{job.file_prefix}-{index}-{job.attempts}-test.png"
        runtime.storage.save(name, b"png")
        records.append(jobs.OutputRecord(index, name, 64, 64, seed=index))
    return RunSuccess(job, records, {"W": 64}, 0.5, attempt=job.attempts)


def rows(runtime: WorkerRuntime, runs: list[RunSuccess]) -> dict[int, tuple[JobState, int, int]]:
    """Each job's state, its output rows and its deliveries."""
    ids = [run.job.id for run in runs]
    with session_scope(runtime.settings.resolved_database_url) as session:
        found = {}
        for job in session.scalars(select(Job).where(Job.id.in_(ids))):
            outputs = session.scalar(select(func.count()).where(JobOutput.job_id == job.id))
            hooks = session.scalar(select(func.count()).where(WebhookDelivery.job_id == job.id))
            found[job.id] = (job.state, outputs or 0, hooks or 0)
        return found


@pytest.fixture
def commits() -> Iterator[list[Session]]:
    """Every transaction committed meanwhile, by any session of this process."""
    seen: list[Session] = []

    def note(session: Session) -> None:
        seen.append(session)

    event.listen(Session, "after_commit", note)
    yield seen
    event.remove(Session, "after_commit", note)


def test_a_batch_is_recorded_in_one_transaction(
    runtime: WorkerRuntime, api_key: IssuedKey, commits: list[Session]
) -> None:
    runs = [claimed_run(runtime, api_key, outputs=2) for _ in range(3)]
    commits.clear()

    record_successes(runtime, runs)

    assert len(commits) == 1
    assert rows(runtime, runs) == {run.job.id: (JobState.SUCCESS, 2, 1) for run in runs}
    assert all(runtime.held.skips(run.job.id) for run in runs)  # success is final
    with session_scope(runtime.settings.resolved_database_url) as session:
        for run in runs:  # each job its own meta, time, outputs and frozen webhook body
            job = session.get(Job, run.job.id)
            assert job is not None
            assert (job.meta["W"], job.generation_time) == (64, 0.5)
            delivery = session.scalar(
                select(WebhookDelivery).where(WebhookDelivery.job_id == run.job.id)
            )
            assert delivery is not None
            assert delivery.api_key_id == api_key.row.id
            body = json.loads(delivery.payload)  # v5 pix2pix: `output` is the first link
            assert (body["status"], body["id"]) == ("success", job.id)
            assert body["output"].endswith(f"/{job.file_prefix}-0.png")


def test_a_job_another_run_holds_is_left_alone_and_this_runs_files_deleted(
    runtime: WorkerRuntime, api_key: IssuedKey
) -> None:
    runs = [claimed_run(runtime, api_key) for _ in range(3)]
    lost = runs[1]
    with session_scope(runtime.settings.resolved_database_url) as session:  # another claim
        session.execute(update(Job).where(Job.id == lost.job.id).values(attempts=Job.attempts + 1))

    record_successes(runtime, runs)

    found = rows(runtime, runs)
    assert found.pop(lost.job.id) == (JobState.PROCESSING, 0, 0)
    assert found == {run.job.id: (JobState.SUCCESS, 1, 1) for run in (runs[0], runs[2])}
    outputs = runtime.settings.outputs_dir
    assert not (outputs / lost.outputs[0].filename).exists()
    assert (outputs / runs[0].outputs[0].filename).exists()


def test_a_retry_after_a_lost_commit_still_knows_what_it_won(
    runtime: WorkerRuntime, api_key: IssuedKey
) -> None:
    runs = [claimed_run(runtime, api_key) for _ in range(2)]
    settings = runtime.settings
    with session_scope(settings.resolved_database_url) as session:
        first = outcomes.succeed_many(session, settings, runs)
    with session_scope(settings.resolved_database_url) as session:  # the same write again
        again = outcomes.succeed_many(session, settings, runs)

    assert first.won == again.won == {run.job.id for run in runs}
    assert again.deliveries == first.deliveries  # the first commit's, not new ones
    assert rows(runtime, runs) == {run.job.id: (JobState.SUCCESS, 1, 1) for run in runs}


def test_a_job_whose_row_refuses_the_write_does_not_hold_back_its_mates(
    runtime: WorkerRuntime, api_key: IssuedKey
) -> None:
    done = claimed_run(runtime, api_key)
    record_successes(runtime, [done])
    runs = [claimed_run(runtime, api_key) for _ in range(3)]
    bad = runs[0]
    clash = RunSuccess(bad.job, done.outputs, bad.meta, 0.5, attempt=bad.attempt)
    runs[0] = clash  # names a recorded file of another job: the unique filename refuses it

    record_successes(runtime, runs)

    found = rows(runtime, runs)
    assert found.pop(bad.job.id) == (JobState.PROCESSING, 0, 0)  # left to its lease
    assert found == {run.job.id: (JobState.SUCCESS, 1, 1) for run in runs[1:]}
    assert (runtime.settings.outputs_dir / done.outputs[0].filename).exists()  # not its file
