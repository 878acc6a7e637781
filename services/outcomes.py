"""A job's terminal transition and its webhook, in one transaction: the one home of finishing.

Used by the GPU worker when a job ends, by the sweeper when a job runs out of attempts and by
a cancel (`services.jobs.cancel`), so every path creates the delivery row the same way
(`services.webhooks.schedule`) and only the caller that won the transition does; the caller
publishes the delivery through the outbox (`services.webhooks.publish`). A failure carries its
`FailureReason`, which metrics count. The worker passes its claim's `attempt`
(the fencing token, see db.repositories.jobs): a run whose claim was superseded wins nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from darkroom.identities import FailureReason
from darkroom.settings import Settings
from db.models import Job
from db.repositories import jobs
from services import metrics, webhooks

CANCELED_MESSAGE = "The job was canceled."


def storage_failed_message(reason: str) -> str:
    """Why a job whose images were generated failed: they could not be stored. `reason` is
    StorageError.reason (client-safe)."""
    return f"The images were generated but could not be stored: {reason}."


def exhausted_message(attempts: int) -> str:
    """Why a poison job failed: every attempt ended with its worker gone."""
    return (
        f"The job failed after {attempts} attempts: the worker stopped while running it each time."
    )


@dataclass(frozen=True)
class RunSuccess:
    """One job's successful run, to record: the job as claimed, what the run made, and its
    claim's `attempt` (None: whichever claim holds the job)."""

    job: Job
    outputs: list[jobs.OutputRecord]
    meta: dict[str, object]
    generation_time: float
    attempt: int | None = None


@dataclass(frozen=True)
class Recorded:
    """What `succeed_many` recorded: the jobs these runs won, and their webhooks' deliveries
    (job id -> delivery id) for the caller to publish."""

    won: set[int]
    deliveries: dict[int, int]


def succeed(
    session: Session,
    settings: Settings,
    job: Job,
    *,
    outputs: list[jobs.OutputRecord],
    meta: dict[str, object],
    generation_time: float,
    attempt: int | None = None,
) -> int | None:
    """Record success and queue its webhook; the delivery id, or None (no webhook, or lost race).
    With `attempt`, only while the claim that wrote it holds the job."""
    run = RunSuccess(job, outputs, meta, generation_time, attempt)
    return succeed_many(session, settings, [run]).deliveries.get(job.id)


def succeed_many(session: Session, settings: Settings, runs: Sequence[RunSuccess]) -> Recorded:
    """Record several runs' successes with their outputs and queue their webhooks, in the
    caller's one transaction and a fixed number of statements: each job only while its run's
    claim holds it (a job another run won or ended is left as it is, its outputs unrecorded).

    A run counts as won also when its job already ended with this run's first output file: the
    retry of a commit whose answer was lost (its deliveries are the ones that commit made)."""
    won_now = jobs.complete_jobs(
        session,
        [
            jobs.Completion(
                run.job.id, run.attempt, run.outputs, dict(run.meta), run.generation_time
            )
            for run in runs
        ],
    )
    for run in runs:
        if run.job.id in won_now:
            metrics.record_job_end(session, run.job, generation_time=run.generation_time)
    jobs.notify_jobs_done(session, sorted(won_now))  # wakes sync waits once this commits
    earlier = {
        run.job.id: run.outputs[0].filename
        for run in runs
        if run.job.id not in won_now and run.outputs
    }
    won = won_now | jobs.jobs_with_output(session, earlier)
    deliveries = webhooks.schedule_many(session, settings, [r.job for r in runs if r.job.id in won])
    return Recorded(won, deliveries)


def fail(
    session: Session,
    settings: Settings,
    job: Job,
    message: str,
    *,
    reason: FailureReason,
    attempt: int | None = None,
) -> int | None:
    """Record failure with a client-safe message and queue its webhook; metrics count it under
    `reason`. With `attempt`, only while the claim that wrote it holds the job."""
    won = jobs.fail_job(session, job.id, message, attempt=attempt)
    if won:
        metrics.record_job_end(session, job, failure=reason)
        jobs.notify_job_done(session, job.id)
    return webhooks.schedule(session, settings, job) if won else None
