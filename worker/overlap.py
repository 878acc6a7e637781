"""Pipelining: a batch's CPU work overlaps the next batch's pipeline call (issue 15).

The worker consumes one Celery message at a time (solo pool). Without pipelining, one task
claims a batch, fetches its init images, runs the pipeline call, then encodes, stores and
records every job before the next message is taken: the generator idles for all of that.

With `worker_pipeline` (the default in `darkroom worker`), a task returns as soon as its
pipeline call has ended, handing the batch's conclusion (cancel check, PNG encoding, storage
writes, the success or failure transactions, webhook publishing) to `Overlap`'s background
threads; the next message is then claimed, its images fetched (in a small thread pool) and its
pipeline call run while the previous batch is stored. And while a batch's call runs, the next
batch is claimed ahead (`Overlap.ahead`: up to `max_batch` queued jobs with the same batch key,
`jobs.claim_batch_companions`) and its init images fetched and decoded; when the call ends the
same task runs that batch at once, up to `MAX_BATCHES_PER_TASK` batches (so that other models'
queues get their turn). The messages of jobs claimed ahead, like a batch's companions', are
acknowledged later without a claim while this process holds the job or once it recorded its
success (worker.held). So:

- at most two batches are being concluded in the background, and only one of them stores
  images: before handing over batch N, the task waits until batch N-1's images are stored
  and batch N-2's conclusion has ended, so that N-1's recording transaction overlaps N's
  storing rather than the pipeline call waiting for both; at most one batch is claimed
  ahead. Memory holds four batches at most: one ahead (its init images), one generating,
  one being stored, one being recorded (whose images are already written);
- each job is still recorded as success only after its files are stored (the conclusion runs
  the same `worker.recording.conclude_batch`), fenced by its claim's attempt token, with the
  same retries;
- the background conclusion renews its jobs' leases while it runs; a process that dies with
  a conclusion pending leaves those jobs processing with leases that run out, so the sweeper
  queues them again and exactly one run records each (as for a batch's companions, whose own
  messages were acknowledged without running them: the message that started the batch is
  acknowledged when the task returns, which no longer means its jobs are recorded);
- jobs claimed ahead hold leases like any claimed job: a crash leaves them to the sweeper;
- a stopping worker claims nothing more ahead (`stopping`) and drains the pending conclusions
  (`Overlap.drain`, on `worker_shutdown`, once the running task has returned).

Each job's PNG encoding and storing runs in a thread pool (the encoders and fsync release the
GIL, so one job's write overlaps another's encoding); init image fetches run in another.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Threads that fetch and decode init images; as many encode and store each job's PNGs.
POOL_THREADS = 4
#: Conclusions running at once: one storing its batch's images while the one before records.
CONCLUSIONS_AT_ONCE = 2


@dataclass(frozen=True)
class _Conclusion:
    done: Future[None]
    stored: threading.Event  # set once its images are stored (or it ended without)


class Overlap:
    """Background conclusions (two at most, one storing images), and two small pools: one
    fetches the next batch's images, one encodes and stores the last batch's. Two, so that the
    next batch's fetches never queue behind a conclusion's encodes: the fetches are on the
    critical path (the next call waits for them), the encodes are not."""

    def __init__(self, threads: int = POOL_THREADS) -> None:
        self._fetch_pool = ThreadPoolExecutor(threads, thread_name_prefix="overlap-fetch")
        self._store_pool = ThreadPoolExecutor(threads, thread_name_prefix="overlap-store")
        self._behind = ThreadPoolExecutor(
            max_workers=CONCLUSIONS_AT_ONCE, thread_name_prefix="overlap-conclude"
        )
        self._ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="overlap-prefetch")
        #: Set when the worker begins to stop: no further batch is claimed ahead.
        self.stopping = threading.Event()
        self._pending: list[_Conclusion] = []
        self._lock = threading.Lock()

    def fetch_map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """`fn` over `items` in the fetching pool, results in order (an exception is raised
        here)."""
        return list(self._fetch_pool.map(fn, items))

    def store_map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """`fn` over `items` in the storing pool, results in order (an exception is raised
        here)."""
        return list(self._store_pool.map(fn, items))

    def ahead(self, prefetch: Callable[[], T]) -> Future[T]:
        """Start claiming and preparing the next batch while the current one generates."""
        return self._ahead.submit(prefetch)

    def behind(self, conclude: Callable[[Callable[[], None]], None]) -> None:
        """Run `conclude` in the background once the previous conclusion has stored its images
        and the one before that has ended. `conclude` is given the function to call once its
        own images are stored: a batch's recording (its transaction, a database retry) then
        overlaps the next batch's storing instead of delaying the next pipeline call."""
        with self._lock:
            while len(self._pending) >= CONCLUSIONS_AT_ONCE:
                self._pending.pop(0).done.result()
            if self._pending:
                self._pending[-1].stored.wait()
            stored = threading.Event()
            done = self._behind.submit(self._guarded, conclude, stored)
            self._pending.append(_Conclusion(done, stored))

    def drain(self) -> None:
        """Wait for the pending conclusions, if any (the first error is raised here)."""
        with self._lock:
            pending, self._pending = self._pending, []
            for conclusion in pending:
                conclusion.done.result()

    def close(self) -> None:
        """Drain, then stop the threads."""
        self.drain()
        self._behind.shutdown(wait=True)
        self._ahead.shutdown(wait=True)
        self._fetch_pool.shutdown(wait=True)
        self._store_pool.shutdown(wait=True)

    @staticmethod
    def _guarded(conclude: Callable[[Callable[[], None]], None], stored: threading.Event) -> None:
        """A conclusion's own errors are logged: the jobs it left are the sweeper's."""
        try:
            conclude(stored.set)
        except Exception:
            log.exception("a batch could not be concluded; its jobs are left to their leases")
        finally:
            stored.set()
