"""Every query on jobs and their outputs. Functions flush; the caller owns the commit.

State changes are conditional UPDATEs (compare-and-set on `state` and `lease_until`), so two
workers that receive the same job id cannot both run it, and a job reaches a terminal state once.

Fencing: every claim, single or batch companion, increments `attempts`, and the value it wrote
is that run's token. Lease renewal and the worker's terminal update match it, so a run whose
claim was superseded (it stalled past its lease and another worker took the job) can neither
keep the job alive nor record a result. (An operator's requeue restarts `attempts` from 0, so a
stuck run's token may come round again: then either run may win, still exactly one, and their
files never collide because each run stores under names of its own.)
"""

from __future__ import annotations

import enum
import re
import secrets
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import (
    ARRAY,
    BigInteger,
    ColumnElement,
    String,
    and_,
    bindparam,
    case,
    cast,
    func,
    insert,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.orm import Session, lazyload, selectinload

from darkroom.identities import Operation
from db.clock import DbNow, db_now
from db.models import TERMINAL_STATES, Job, JobOutput, JobRequeue, JobState, utcnow


@dataclass(frozen=True)
class NewJob:
    """What the API tier stores for an accepted request."""

    api_key_id: int
    operation: Operation
    endpoint: str
    params: dict[str, Any]
    meta: dict[str, Any]
    track_id: str | None
    webhook_url: str | None
    batch_key: str | None = None
    # Chosen before the insert so that `meta` (which shows it) goes in with the same INSERT.
    file_prefix: str = field(default_factory=lambda: new_file_prefix())


@dataclass(frozen=True)
class OutputRecord:
    """One written output file, to be recorded with the job's success."""

    index: int
    filename: str
    width: int
    height: int
    seed: int
    nsfw: bool = False
    expires_at: datetime | None = None


class ClaimOutcome(enum.StrEnum):
    """Why a worker may or may not run a job it received."""

    CLAIMED = "claimed"
    BUSY = "busy"  # another worker holds a live lease on it
    TERMINAL = "terminal"  # already success or failed: a duplicate delivery
    EXHAUSTED = "exhausted"  # out of attempts: the caller fails it
    MISSING = "missing"


def new_file_prefix() -> str:
    """An unguessable prefix for a job's output file names (128 random bits)."""
    return secrets.token_hex(16)


def create_job(session: Session, new: NewJob) -> Job:
    """Insert a queued job."""
    return create_jobs(session, [new])[0]


def _job_row(new: NewJob) -> Job:
    """The row of a new queued job."""
    return Job(
        api_key_id=new.api_key_id,
        operation=new.operation,
        endpoint=new.endpoint,
        params=new.params,
        meta=new.meta,
        track_id=new.track_id,
        webhook_url=new.webhook_url,
        batch_key=new.batch_key,
        file_prefix=new.file_prefix,
    )


def get_job(session: Session, job_id: int) -> Job | None:
    """A job by id, whoever owns it (workers only)."""
    return session.get(Job, job_id)


#: Job ids are a 32-bit serial on Postgres; a larger id cannot exist (and would not bind).
MAX_JOB_ID = 2**31 - 1


def refresh_job(session: Session, job: Job) -> None:
    """Read `job` afresh: the conditional UPDATEs here leave the session's copy as it was."""
    session.refresh(job)


def fresh_jobs(session: Session, job_ids: Collection[int]) -> list[Job]:
    """The jobs read afresh with their outputs, in two statements (`refresh_job` for several,
    outputs included)."""
    if not job_ids:
        return []
    rows = session.scalars(
        select(Job)
        .where(Job.id.in_(job_ids))
        .options(selectinload(Job.outputs))
        .order_by(Job.id)
        .execution_options(populate_existing=True)
    )
    return list(rows)


def get_job_for_key(session: Session, job_id: int, api_key_id: int) -> Job | None:
    """A job by id if `api_key_id` owns it; another key's job looks exactly like a missing one."""
    if not 1 <= job_id <= MAX_JOB_ID:
        return None
    return session.scalar(select(Job).where(Job.id == job_id, Job.api_key_id == api_key_id))


def poll_job_for_key(session: Session, job_id: int, api_key_id: int) -> Job | None:
    """`get_job_for_key` for a poll: one indexed read. The outputs are loaded only when read
    (a finished job's answer), not by a second query for every queued or running job."""
    if not 1 <= job_id <= MAX_JOB_ID:
        return None
    query = select(Job).where(Job.id == job_id, Job.api_key_id == api_key_id)
    return session.scalar(query.options(lazyload(Job.outputs)))


class PolledJob(Protocol):
    """What a queued or running job's answer and its eta read from the job: a `Job`, or the
    `JobPoll` of a poll that read only these columns."""

    @property
    def id(self) -> int: ...
    @property
    def state(self) -> JobState: ...
    @property
    def operation(self) -> Operation: ...
    @property
    def endpoint(self) -> str: ...
    @property
    def progress(self) -> float | None: ...
    @property
    def params(self) -> dict[str, Any]: ...
    @property
    def meta(self) -> dict[str, Any]: ...
    @property
    def file_prefix(self) -> str: ...
    @property
    def started_at(self) -> datetime | None: ...


@dataclass(frozen=True, slots=True)
class JobPoll:
    """One row of `POLL_QUERY`: a job's `PolledJob` columns, without the ORM."""

    id: int
    state: JobState
    operation: Operation
    endpoint: str
    progress: float | None
    params: dict[str, Any]
    meta: dict[str, Any]
    file_prefix: str
    started_at: datetime | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> JobPoll:
        """From the row's values in `POLL_QUERY`'s column order (the enums are stored as their
        values, so the raw strings convert as they are)."""
        job_id, state, operation, endpoint, progress, params, meta, file_prefix, started = row
        return cls(
            job_id,
            JobState(state),
            Operation(operation),
            endpoint,
            progress,
            params,
            meta,
            file_prefix,
            started,
        )


#: A poll's read of one of a key's jobs, by the bound `job_id` and `api_key_id` (one indexed
#: read of the columns a queued or running job's answer needs): for drivers that run it
#: without the ORM (api/fast_poll.py). An id outside 1..MAX_JOB_ID must not be bound.
POLL_QUERY = select(
    Job.id,
    Job.state,
    Job.operation,
    Job.endpoint,
    Job.progress,
    Job.params,
    Job.meta,
    Job.file_prefix,
    Job.started_at,
).where(Job.id == bindparam("job_id"), Job.api_key_id == bindparam("api_key_id"))


def _claimed(now: datetime, lease_s: float) -> dict[Any, Any]:
    """What a claim writes: running, one more attempt, a fresh lease, no progress yet."""
    return {
        Job.state: JobState.PROCESSING,
        Job.attempts: Job.attempts + 1,
        Job.started_at: now,
        Job.lease_until: now + timedelta(seconds=lease_s),
        Job.progress: 0.0,
    }


@dataclass(frozen=True)
class JobClaim:
    """What a claim found: the outcome, the job, and whether it took over a dead run."""

    outcome: ClaimOutcome
    job: Job | None
    # The job was processing under an expired lease: the previous attempt's run died (or
    # stalled) and was never handed back by the sweeper; its unrecorded files are garbage.
    took_over: bool = False


def claim_job(
    session: Session, job_id: int, *, lease_s: float, max_attempts: int
) -> tuple[ClaimOutcome, Job | None]:
    """Take a job: queued, or processing with an expired lease, and with attempts left."""
    claim = take_job(session, job_id, lease_s=lease_s, max_attempts=max_attempts)
    return claim.outcome, claim.job


def take_job(session: Session, job_id: int, *, lease_s: float, max_attempts: int) -> JobClaim:
    """`claim_job`, saying whether the claim took over a run whose lease had expired. A queued
    job (the usual case) takes one UPDATE; a takeover is tried only when that one finds none."""
    now = db_now(session)  # leases are compared on the database's clock, not this host's
    expired = and_(Job.state == JobState.PROCESSING, Job.lease_until < now)
    fresh = _claim_if(session, job_id, Job.state == JobState.QUEUED, now, lease_s, max_attempts)
    lost_started_at = None
    if not fresh:  # the run being taken over, if any, for the job's history
        lost_started_at = session.scalar(select(Job.started_at).where(Job.id == job_id, expired))
    took_over = not fresh and _claim_if(session, job_id, expired, now, lease_s, max_attempts)
    job = session.get(Job, job_id, populate_existing=True)
    if took_over and job is not None:
        _record_lost_run(session, job_id, job.attempts - 1, lost_started_at)
    if job is None:
        return JobClaim(ClaimOutcome.MISSING, None)
    if fresh or took_over:
        return JobClaim(ClaimOutcome.CLAIMED, job, took_over)
    if job.state in TERMINAL_STATES:
        return JobClaim(ClaimOutcome.TERMINAL, job)
    if job.lease_until is not None and job.lease_until >= now and job.state == JobState.PROCESSING:
        return JobClaim(ClaimOutcome.BUSY, job)
    return JobClaim(ClaimOutcome.EXHAUSTED, job)


def _claim_if(
    session: Session,
    job_id: int,
    claimable: ColumnElement[bool],
    now: datetime,
    lease_s: float,
    max_attempts: int,
) -> bool:
    """Claim the job if it is `claimable` and has attempts left; whether it was."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, claimable, Job.attempts < max_attempts)
        .values(_claimed(now, lease_s))
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result) == 1


def claim_batch_companions(
    session: Session,
    *,
    leader_id: int,
    batch_key: str,
    limit: int,
    lease_s: float,
    max_attempts: int,
) -> list[Job]:
    """Take up to `limit` more queued jobs with `batch_key` to run beside job `leader_id`.

    One statement (issue 15: each round trip of a worker's claim waits for the interpreter lock
    again, and the claim is on the path to the next pipeline call): a materialized CTE selects
    the candidates with FOR UPDATE SKIP LOCKED on Postgres, so two workers collecting companions
    at once skip each other's rows instead of waiting, and a row that another worker is
    claiming right now (its own message arrived) is skipped too; the UPDATE takes those still
    queued and returns their rows. (Materialized: Postgres evaluates such a CTE once, whereas
    an UPDATE over a plain LIMIT subquery may rescan it and take more than `limit` rows.)
    SQLite ignores the lock clause; it has one writer at a time. Oldest jobs first.
    """
    if limit < 1:
        return []
    now = db_now(session)
    candidates = (
        select(Job.id)
        .where(
            Job.batch_key == batch_key,
            Job.state == JobState.QUEUED,
            Job.id != leader_id,
            Job.attempts < max_attempts,
            Job.cancel_requested_at.is_(None),
        )
        .order_by(Job.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("candidates")
        .prefix_with("MATERIALIZED", dialect="postgresql")
    )
    claimed = session.scalars(
        update(Job)
        .where(Job.id.in_(select(candidates.c.id)), Job.state == JobState.QUEUED)
        .values(_claimed(now, lease_s))
        .returning(Job),
        execution_options={"populate_existing": True, "synchronize_session": False},
    )
    return sorted(claimed, key=lambda job: job.id)


def _fenced(job_id: int, attempt: int | None) -> ColumnElement[bool]:
    """Job `job_id` is running under the claim that wrote `attempt` (None: under any claim,
    for callers that hold none: the sweeper, a cancel)."""
    running = and_(Job.id == job_id, Job.state == JobState.PROCESSING)
    return running if attempt is None else and_(running, Job.attempts == attempt)


def extend_leases(session: Session, claims: Mapping[int, int], lease_s: float) -> int:
    """Heartbeat for a batch: push the leases of the jobs still running under this run's claims
    (`claims` maps a job id to the attempt its claim wrote); how many were pushed."""
    if not claims:
        return 0
    result = session.execute(
        update(Job)
        .where(or_(*(_fenced(job_id, attempt) for job_id, attempt in claims.items())))
        .values(lease_until=db_now(session) + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result)


def extend_lease(session: Session, job_id: int, lease_s: float, *, attempt: int) -> bool:
    """Heartbeat: push the lease forward while the job still runs under the claim that wrote
    `attempt`. False if it ended or another claim took it."""
    result = session.execute(
        update(Job)
        .where(_fenced(job_id, attempt))
        .values(lease_until=db_now(session) + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result) == 1


def complete_job(
    session: Session,
    job_id: int,
    *,
    outputs: list[OutputRecord],
    meta: dict[str, Any],
    generation_time: float,
    attempt: int | None = None,
) -> bool:
    """Move a processing job to success with its outputs, recorded in the same transaction
    (so only the winning run's files are ever referenced). With `attempt`, only while the
    claim that wrote it holds the job. False if it was terminal or another claim holds it."""
    completion = Completion(job_id, attempt, outputs, meta, generation_time)
    return job_id in complete_jobs(session, [completion])


@dataclass(frozen=True)
class Completion:
    """One run's success to record: the job, its claim's `attempt` (None: any claim), what the
    run made."""

    job_id: int
    attempt: int | None
    outputs: list[OutputRecord]
    meta: dict[str, Any]
    generation_time: float


def complete_jobs(session: Session, completions: Sequence[Completion]) -> set[int]:
    """Move processing jobs to success with their outputs, in two statements whatever their
    number: one fenced UPDATE (each job matched with its own claim's attempt, its own meta and
    generation time) that returns the jobs it won, then one multi-row INSERT of those jobs'
    outputs. The ids of the jobs won; a job that was terminal or held by another claim is left
    as it was, its outputs not recorded."""
    if not completions:
        return set()
    meta_type, time_type = Job.meta.type, Job.generation_time.type

    def per_job(value: Callable[[Completion], object], type_: Any) -> ColumnElement[Any]:
        """CASE jobs.id WHEN <id> THEN <this job's value> ... (typed binds: JSON on Postgres)."""
        whens = [(Job.id == c.job_id, bindparam(None, value(c), type_=type_)) for c in completions]
        return case(*whens)

    result = session.execute(
        update(Job)
        .where(or_(*(_fenced(c.job_id, c.attempt) for c in completions)))
        .values(
            state=JobState.SUCCESS,
            meta=per_job(lambda c: dict(c.meta), meta_type),
            generation_time=per_job(lambda c: c.generation_time, time_type),
            finished_at=utcnow(),
            lease_until=None,
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    won = set(result.scalars())
    rows = [_output_row(c.job_id, out) for c in completions if c.job_id in won for out in c.outputs]
    if rows:
        session.execute(insert(JobOutput), rows)  # one multi-row INSERT (insertmanyvalues)
    return won


def _output_row(job_id: int, out: OutputRecord) -> dict[str, Any]:
    """The `job_outputs` row of one recorded output file."""
    return {
        "job_id": job_id,
        "index": out.index,
        "filename": out.filename,
        "width": out.width,
        "height": out.height,
        "seed": out.seed,
        "nsfw": out.nsfw,
        "expires_at": out.expires_at,
    }


def jobs_with_output(session: Session, filenames: Mapping[int, str]) -> set[int]:
    """Those of the jobs (id -> a file name one run stored) whose outputs include that file:
    the jobs that run won, also when the commit that recorded them lost its answer."""
    if not filenames:
        return set()
    rows = session.scalars(
        select(JobOutput.job_id).where(
            tuple_(JobOutput.job_id, JobOutput.filename).in_(list(filenames.items()))
        )
    )
    return set(rows)


def fail_job(session: Session, job_id: int, message: str, *, attempt: int | None = None) -> bool:
    """Move a non-terminal job to failed with a client-safe message; with `attempt`, only
    while the claim that wrote it holds the job. False if terminal or another claim holds it."""
    held: ColumnElement[bool] = Job.state.in_([JobState.QUEUED, JobState.PROCESSING])
    if attempt is not None:
        held = and_(Job.state == JobState.PROCESSING, Job.attempts == attempt)
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, held)
        .values(state=JobState.FAILED, error=message, finished_at=utcnow(), lease_until=None)
        .execution_options(synchronize_session=False)
    )
    return _rowcount(result) == 1


def never_published(session: Session, *, created_before: datetime, limit: int = 100) -> list[int]:
    """Queued jobs whose id never reached the broker (the API crashed after commit, or the
    broker was down), once past a grace period that lets the API publish them itself."""
    rows = session.scalars(
        select(Job.id)
        .where(
            Job.state == JobState.QUEUED,
            Job.enqueued_at.is_(None),
            Job.created_at < created_before,
        )
        .order_by(Job.id)
        .limit(limit)
    )
    return list(rows)


def long_queued(
    session: Session, *, published_before: datetime, limit: int = 100
) -> list[tuple[int, str | None]]:
    """(id, queue) of queued jobs published before `published_before`, oldest first: those
    whose message the broker may have lost (a Redis restart without persistence)."""
    rows = session.execute(
        select(Job.id, Job.queue_name)
        .where(Job.state == JobState.QUEUED, Job.enqueued_at < published_before)
        .order_by(Job.id)
        .limit(limit)
    )
    return [(job_id, queue) for job_id, queue in rows]


def published_queued_counts(session: Session, default_queue: str) -> dict[str, int]:
    """Queued jobs per queue their id was published to (unrecorded: `default_queue`)."""
    queue = func.coalesce(Job.queue_name, default_queue)
    rows = session.execute(
        select(queue, func.count(Job.id))
        .where(Job.state == JobState.QUEUED, Job.enqueued_at.is_not(None))
        .group_by(queue)
    )
    return {name: int(count) for name, count in rows}


def jobs_with_expired_lease(session: Session, *, limit: int = 100) -> list[Job]:
    """Processing jobs whose worker stopped renewing the lease (it crashed or vanished),
    locked until the caller's transaction ends (on Postgres).

    The lock closes a race: a stalled worker that wakes up may renew its lease or record its
    result between this read and the sweeper's update, and the sweeper would then fail (out
    of attempts) or requeue a live run and delete its files. Locked, the worker's write waits
    for the sweeper's commit and then finds the job no longer its own; a row a worker is
    writing right now is skipped (SKIP LOCKED) and looked at again at the next sweep."""
    rows = session.scalars(
        select(Job)
        .where(Job.state == JobState.PROCESSING, Job.lease_until < DbNow())
        .order_by(Job.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return list(rows)


def requeue_job(session: Session, job_id: int) -> bool:
    """Hand an orphaned processing job back to the queue (the sweeper re-sends its id), and
    record the lost run in its history (`JobRequeue`)."""
    lost = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.PROCESSING, Job.lease_until < DbNow())
        .values(state=JobState.QUEUED, enqueued_at=None, lease_until=None)
        .returning(Job.attempts, Job.started_at)
        .execution_options(synchronize_session=False)
    ).first()
    if lost is None:
        return False
    _record_lost_run(session, job_id, lost.attempts, lost.started_at)
    return True


#: The reason a job's history gives for a run that ended without an outcome.
LOST_RUN = "its run stopped renewing its lease (the worker died, hung or lost the database)"


def _record_lost_run(
    session: Session, job_id: int, attempts: int, started_at: datetime | None
) -> None:
    """A requeue row for the run of attempt `attempts` that a lapsed lease ended: the job's
    timeline (`darkroom jobs show`) shows it, where the next claim overwrites its columns."""
    session.add(
        JobRequeue(
            job_id=job_id,
            reason=LOST_RUN,
            previous_state=JobState.PROCESSING,
            previous_attempts=attempts,
            previous_started_at=started_at,
        )
    )
    session.flush()


@dataclass(frozen=True)
class KeyLoad:
    """A key's jobs as admission control sees them."""

    active: int  # queued and running
    recent: int  # created since the rate window began


def key_loads(
    session: Session, api_key_ids: Collection[int], since: datetime
) -> dict[int, KeyLoad]:
    """Active and recent jobs of each key, in one query (keys without any are left out)."""
    active = Job.state.in_([JobState.QUEUED, JobState.PROCESSING])
    recent = Job.created_at >= since
    rows = session.execute(
        select(Job.api_key_id, func.count(Job.id).filter(active), func.count(Job.id).filter(recent))
        .where(Job.api_key_id.in_(api_key_ids), or_(active, recent))
        .group_by(Job.api_key_id)
    )
    return {key_id: KeyLoad(int(n_active), int(n_recent)) for key_id, n_active, n_recent in rows}


def create_jobs(session: Session, new_jobs: Sequence[NewJob]) -> list[Job]:
    """Insert queued jobs together (one multi-row INSERT on Postgres), in the given order."""
    rows = [_job_row(new) for new in new_jobs]
    session.add_all(rows)
    session.flush()
    return rows


def queued_jobs(session: Session) -> int:
    """Jobs waiting for a worker, over all keys (the backpressure signal)."""
    count = session.scalar(select(func.count(Job.id)).where(Job.state == JobState.QUEUED))
    return int(count or 0)


#: The Postgres channel that announces a job's terminal transition; the payload is its id.
JOB_DONE_CHANNEL = "darkroom_job_done"
#: How many recent successful jobs of an operation give its typical duration.
RECENT_JOBS_PER_OPERATION = 20
#: The durations are read from the last successes among this many job ids (a bounded scan).
DURATION_LOOKBACK_IDS = 10_000


def notify_job_done(session: Session, job_id: int) -> None:
    """Announce that job `job_id` ended to listening API processes (sync waits).

    Postgres delivers the notification when the transaction commits, and never if it rolls
    back; SQLite has no notifications, and waiting requests poll instead.
    """
    notify_jobs_done(session, [job_id])


def notify_jobs_done(session: Session, job_ids: Sequence[int]) -> None:
    """`notify_job_done` for several jobs in one statement (one notification per job)."""
    if not job_ids or session.get_bind().dialect.name != "postgresql":
        return
    array = bindparam("ids", list(job_ids), type_=ARRAY(BigInteger))
    ids = func.unnest(array).table_valued("id").render_derived()
    session.execute(
        select(func.pg_notify(JOB_DONE_CHANNEL, cast(ids.c.id, String))).select_from(ids)
    )


@dataclass(frozen=True)
class Run:
    """A pipeline run under way (a job, or a batch's jobs): its progress, from 0 to 1, and
    since when it runs (its claim; None on rows from before claims recorded it)."""

    operation: Operation
    progress: float
    started_at: datetime | None


@dataclass(frozen=True)
class QueueSnapshot:
    """What a job's eta depends on: the work ahead of it and how long jobs take (the model that
    reads it is services/eta.py)."""

    queued_ahead: dict[Operation, int]
    running: list[Run]
    durations: dict[Operation, list[float]]


def queue_snapshot(session: Session, job: Job) -> QueueSnapshot:
    """The queued jobs before `job`, the running jobs with their progress, recent durations."""
    ahead = session.execute(
        select(Job.operation, func.count(Job.id))
        .where(Job.state == JobState.QUEUED, Job.id < job.id)
        .group_by(Job.operation)
    )
    return QueueSnapshot(
        queued_ahead={operation: int(count) for operation, count in ahead},
        running=running_runs(session),
        durations=recent_job_seconds(session, job.id),
    )


def running_runs(session: Session) -> list[Run]:
    """Each pipeline run under way: a batch's jobs are one run."""
    running = session.execute(
        select(Job.id, Job.operation, Job.progress, Job.started_at, Job.batch_key).where(
            Job.state == JobState.PROCESSING
        )
    )
    runs: dict[tuple[str, str], Run] = {}
    for job_id, operation, progress, started_at, batch_key in running:
        # Jobs of one batch run in one pipeline call: one run, one worker.
        run = ("batch", batch_key) if batch_key else ("job", str(job_id))
        runs[run] = Run(operation, progress or 0.0, started_at)
    return list(runs.values())


def recent_job_seconds(session: Session, anchor_id: int) -> dict[Operation, list[float]]:
    """Claim-to-finish seconds of recent successful jobs, newest first, per operation."""
    rows = session.execute(
        select(Job.operation, Job.started_at, Job.finished_at)
        .where(Job.state == JobState.SUCCESS, Job.id > anchor_id - DURATION_LOOKBACK_IDS)
        .order_by(Job.id.desc())
        .limit(RECENT_JOBS_PER_OPERATION * len(Operation))
    )
    durations: dict[Operation, list[float]] = {}
    for operation, started_at, finished_at in rows:
        seconds = durations.setdefault(operation, [])
        if started_at and finished_at and len(seconds) < RECENT_JOBS_PER_OPERATION:
            seconds.append(max((finished_at - started_at).total_seconds(), 0.0))
    return durations


@dataclass(frozen=True)
class QueueView:
    """The whole queue as one moment's reads saw it, from which any job's `QueueSnapshot`
    follows without another query (services.eta.snapshot_for): what polling answers share for a
    moment (api/routes/fetch)."""

    queued_ids: dict[Operation, list[int]]  # ascending
    running: list[Run]
    durations: dict[Operation, list[float]]


def queue_view(session: Session, anchor_id: int) -> QueueView:
    """The queued job ids, the running jobs' progress and the durations around `anchor_id`."""
    queued: dict[Operation, list[int]] = {}
    rows = session.execute(
        select(Job.operation, Job.id).where(Job.state == JobState.QUEUED).order_by(Job.id)
    )
    for operation, job_id in rows:
        queued.setdefault(operation, []).append(job_id)
    return QueueView(queued, running_runs(session), recent_job_seconds(session, anchor_id))


#: An output's public name, `{file_prefix}-{index}.png` (services.responses.output_filename):
#: what `future_links` and API links name; the file stored under it is the winning run's.
_PUBLIC_OUTPUT_NAME = re.compile(r"([0-9a-f]{32})-(\d{1,2})\.png")


def get_output(session: Session, filename: str) -> JobOutput | None:
    """An output by its stored file name, or by its public name (then the winning run's)."""
    found = session.scalar(select(JobOutput).where(JobOutput.filename == filename))
    public = _PUBLIC_OUTPUT_NAME.fullmatch(filename)
    if found is not None or public is None:
        return found
    return session.scalar(
        select(JobOutput)
        .join(Job, JobOutput.job_id == Job.id)
        .where(Job.file_prefix == public[1], JobOutput.index == int(public[2]))
    )


def expired_outputs(session: Session, *, limit: int = 200) -> list[JobOutput]:
    """Temporary outputs past their expiry whose file has not been deleted yet."""
    rows = session.scalars(
        select(JobOutput)
        .where(JobOutput.expires_at < utcnow(), JobOutput.deleted_at.is_(None))
        .order_by(JobOutput.expires_at)
        .limit(limit)
    )
    return list(rows)


def mark_outputs_deleted(session: Session, outputs: Sequence[JobOutput]) -> None:
    """Record that these outputs' files were deleted (their temporary life is over)."""
    deleted_at = utcnow()
    for output in outputs:
        output.deleted_at = deleted_at
    session.flush()


def _rowcount(result: Any) -> int:
    """Rows matched by an UPDATE (typed accessor: Result.rowcount is untyped in stubs)."""
    return int(result.rowcount)


def request_cancel(session: Session, job_id: int) -> None:
    """Ask a running job's worker to stop at its next denoising step."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.PROCESSING)
        .values(cancel_requested_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def cancel_requested(session: Session, job_id: int) -> bool:
    """Whether someone asked job `job_id` to stop."""
    value = session.scalar(select(Job.cancel_requested_at).where(Job.id == job_id))
    return value is not None


def record_progress(session: Session, job_ids: list[int], progress: float) -> None:
    """Store the denoising progress (0..1) of running jobs (several when they run as a batch)."""
    session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.state == JobState.PROCESSING)
        .values(progress=progress)
        .execution_options(synchronize_session=False)
    )


def any_cancel_requested(session: Session, job_ids: list[int]) -> list[int]:
    """Those of `job_ids` whose cancel was requested."""
    rows = session.scalars(
        select(Job.id).where(Job.id.in_(job_ids), Job.cancel_requested_at.is_not(None))
    )
    return list(rows)


def ended_among(session: Session, job_ids: Collection[int]) -> set[int]:
    """Those of `job_ids` that are no longer queued or running (one query for all the sync
    waits of an API process on SQLite, which has no notifications)."""
    rows = session.scalars(
        select(Job.id).where(Job.id.in_(job_ids), Job.state.in_(TERMINAL_STATES))
    )
    return set(rows)


def queued_position(session: Session, job_id: int) -> int:
    """A queued job's place in the queue: 1 when no queued job is older."""
    ahead = session.scalar(
        select(func.count(Job.id)).where(Job.state == JobState.QUEUED, Job.id < job_id)
    )
    return int(ahead or 0) + 1
