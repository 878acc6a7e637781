"""The eta model: how many seconds a job should take to finish, from a look at the queue.

The reads are the repository's (db.repositories.jobs: `queue_snapshot`, `queue_view`,
`recent_job_seconds`); what they mean is decided here, once, for the submit answer
(api/submission.py), polls (api/routes/fetch.py) and progress events (services/job_events.py).
The formula is in docs/CLIENTS.md.
"""

from __future__ import annotations

import bisect
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime

from sqlalchemy.orm import Session

from darkroom.identities import Operation
from db.models import Job, JobState, utcnow
from db.repositories import jobs
from db.repositories.jobs import PolledJob, QueueSnapshot, QueueView, Run

#: The eta quoted before any job of an operation has finished, in seconds.
DEFAULT_ETA_S = 10.0


def estimated_eta(session: Session, job: Job, *, default_s: float = DEFAULT_ETA_S) -> float:
    """Seconds until `job` should finish, from a fresh look at the queue."""
    if job.state == JobState.PROCESSING:  # what waits in the queue is behind it
        snapshot = QueueSnapshot({}, [], jobs.recent_job_seconds(session, job.id))
    else:
        snapshot = jobs.queue_snapshot(session, job)
    return eta_from(snapshot, job, default_s=default_s)


def group_etas(
    snapshot: QueueSnapshot, rows: Sequence[Job], *, default_s: float = DEFAULT_ETA_S
) -> list[float]:
    """Each job of a group stored together, from one snapshot taken for the first: a job of the
    group also waits for the ones stored before it."""
    ahead: dict[Operation, int] = defaultdict(int, snapshot.queued_ahead)
    etas = []
    for job in rows:
        own_view = replace(snapshot, queued_ahead=dict(ahead))
        etas.append(eta_from(own_view, job, default_s=default_s))
        ahead[job.operation] += 1
    return etas


def snapshot_for(view: QueueView, job: PolledJob) -> QueueSnapshot:
    """What `queue_snapshot` reads for a queued `job`, or `estimated_eta` for a running one,
    taken from a shared view of the whole queue without another query."""
    if job.state == JobState.PROCESSING:
        return QueueSnapshot({}, [], view.durations)
    ahead = {op: bisect.bisect_left(ids, job.id) for op, ids in view.queued_ids.items()}
    queued_ahead = {operation: count for operation, count in ahead.items() if count}
    return QueueSnapshot(queued_ahead, view.running, view.durations)


def eta_from(
    snapshot: QueueSnapshot,
    job: PolledJob,
    *,
    default_s: float = DEFAULT_ETA_S,
    now: datetime | None = None,
) -> float:
    """A running job: the rest of it, at its own pace once it has one. A queued one: the work
    ahead of it (the runs under way, likewise) spread over the runs under way (a proxy for live
    workers), then its own typical duration."""
    typical = _typical_seconds(snapshot.durations, default_s)
    now = now or utcnow()
    if job.state == JobState.PROCESSING:
        run = Run(job.operation, job.progress or 0.0, job.started_at)
        return _remaining(run, typical(job.operation), now)
    queued = sum(typical(operation) * count for operation, count in snapshot.queued_ahead.items())
    running = sum(_remaining(run, typical(run.operation), now) for run in snapshot.running)
    workers = max(len(snapshot.running), 1)
    return (queued + running) / workers + typical(job.operation)


#: Progress from which a run's own pace (seconds so far / progress) predicts the rest of it
#: better than the typical duration of its operation: a 50-step job among 4-step ones, or a
#: 1024x1024 one among 512x512 ones, takes longer than the median. Before it, the model's
#: load and the first steps say too little.
OWN_PACE_FROM = 0.1


def _remaining(run: Run, typical_s: float, now: datetime) -> float:
    """Seconds left of `run`: the typical duration's rest, or, from OWN_PACE_FROM, its pace's."""
    progress = min(max(run.progress, 0.0), 1.0)
    if progress < OWN_PACE_FROM or run.started_at is None:
        return typical_s * (1.0 - progress)
    elapsed = max((now - run.started_at).total_seconds(), 0.0)
    return elapsed * (1.0 - progress) / progress


def _typical_seconds(
    durations: dict[Operation, list[float]], default_s: float
) -> Callable[[Operation], float]:
    """The median recent duration of an operation; of all operations when it has none yet; the
    default only when no job has ever finished. Medians, so one cold model load does not skew."""
    overall = [seconds for values in durations.values() for seconds in values]
    fallback = statistics.median(overall) if overall else default_s

    def typical(operation: Operation) -> float:
        values = durations.get(operation)
        return statistics.median(values) if values else fallback

    return typical
