"""The jobs this worker process holds or has recorded as success, so that their own messages
are acknowledged without a claim transaction (issue 15).

Every job has its own Celery message. A batch's companions and the batches claimed ahead
(worker.overlap) are claimed by this process before their messages arrive; each such message
then cost a claim transaction, refused as busy (or as terminal once the batch was recorded),
on the critical path between two pipeline calls. `run_job` asks `skips` first.

Why acknowledging such a message loses no job (each case is tested, tests/worker/test_held.py):

- A job this process recorded as success: success is final (a requeue refuses a succeeded
  job, services.jobs), so its claim would be refused as terminal anyway. A job this process
  failed is released instead, never remembered: an operator may requeue a failed job, and the
  requeue's message must run it.
- A job this process holds (claimed, its conclusion not over): this process ends it. If it
  cannot (the terminal write fails, or the process dies), its lease runs out once the
  heartbeat stops; the conclusion releases the job whatever happened, so the message the
  sweeper publishes after handing the job back to the queue runs it, here or elsewhere.
  If that message arrives while the conclusion still retries its write (the database was
  unreachable for longer than the lease), it is dropped; the conclusion's fenced write then
  finds the job queued and loses. The row is then queued, marked published, and held by no
  broker queue: the sweeper's lost-message scan (`darkroom.queue.held_ids`) sends its id
  again after `lost_message_grace_s`, and by then the job is released.
- An entry is trusted for one lease from the moment its claim was sent, never longer. While
  that claim's own lease has not run out, no other worker can have claimed the job (only an
  operator's forced requeue can take it, and then the lost-message scan above applies); past
  it, the message is claimed as usual. So a path that forgot to release costs at most one
  lease of delay, never a lost job.

Only this process's memory: it never makes another worker process skip anything.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable

#: Succeeded job ids remembered at most (oldest forgotten first: its message is then claimed
#: as before and refused as terminal, one transaction).
REMEMBERED_SUCCESSES = 4096


class HeldJobs:
    """Job ids held by this process (with when they were claimed) and recently succeeded."""

    def __init__(self, lease_s: float, remembered: int = REMEMBERED_SUCCESSES) -> None:
        self._lease_s = lease_s
        self._remembered = remembered
        self._held: dict[int, float] = {}
        self._succeeded: OrderedDict[int, None] = OrderedDict()
        self._lock = threading.Lock()  # the task, the prefetch and the conclusion threads

    def claimed(self, job_ids: Iterable[int], since: float) -> None:
        """This process claimed these jobs with a statement sent at `since` (time.monotonic(),
        read before sending it: so an entry never outlives the lease that claim wrote)."""
        with self._lock:
            self._held.update((job_id, since) for job_id in job_ids)

    def released(self, job_ids: Iterable[int]) -> None:
        """This process no longer holds these jobs (ended, lost, or left to their leases)."""
        with self._lock:
            for job_id in job_ids:
                self._held.pop(job_id, None)

    def succeeded(self, job_ids: Iterable[int]) -> None:
        """This process recorded these jobs' success: released, and remembered as final."""
        with self._lock:
            for job_id in job_ids:
                self._held.pop(job_id, None)
                self._succeeded[job_id] = None
                self._succeeded.move_to_end(job_id)
            while len(self._succeeded) > self._remembered:
                self._succeeded.popitem(last=False)

    def skips(self, job_id: int) -> bool:
        """Whether job `job_id`'s message can be acknowledged without touching the database:
        this process recorded its success, or holds it under a claim younger than the lease."""
        with self._lock:
            if job_id in self._succeeded:
                return True
            since = self._held.get(job_id)
        return since is not None and time.monotonic() - since < self._lease_s
