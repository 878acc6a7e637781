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

from sqlalchemy.orm import Session

from darkroom.identities import Operation
from db.models import Job, JobState
from db.repositories import jobs
from db.repositories.jobs import PolledJob, QueueSnapshot, QueueView

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
    return QueueSnapshot(queued_ahead, view.running_progress, view.durations)


def eta_from(snapshot: QueueSnapshot, job: PolledJob, *, default_s: float = DEFAULT_ETA_S) -> float:
    """A running job: the rest of its typical duration. A queued one: the work ahead of it
    spread over the jobs running now (a proxy for live workers), then its own duration."""
    typical = _typical_seconds(snapshot.durations, default_s)
    own = typical(job.operation)
    if job.state == JobState.PROCESSING:
        return own * (1.0 - min(max(job.progress or 0.0, 0.0), 1.0))
    queued = sum(typical(operation) * count for operation, count in snapshot.queued_ahead.items())
    running = sum(typical(op) * (1.0 - min(p, 1.0)) for op, p in snapshot.running_progress)
    workers = max(len(snapshot.running_progress), 1)
    return (queued + running) / workers + own


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
