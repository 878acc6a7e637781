"""One thread renews the leases of every batch this worker process runs or concludes.

A lease tells the sweeper that the job's worker is alive; a batch that runs (or is being stored
and recorded) for longer than the lease must have it renewed. Each batch used to start a
heartbeat thread of its own and join it when done (worker.leases.renewing): two thread switches
on the pipeline's thread per batch, about 3 ms each while the pool threads hold the interpreter
lock (the saturation benchmark, issue 15). Here a batch only adds its claims to a table; one
thread renews every claim of the table in one UPDATE each `job_lease_s / 3`, so a claim held
for longer than that is renewed at least that often, as before. The thread ends when the table
is empty at its turn and starts again with the next batch.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from darkroom.settings import Settings
from db.repositories import jobs
from db.session import session_scope

log = logging.getLogger(__name__)


class JobLeases:
    """The claims (job id -> the attempt its claim wrote) of this process's running batches."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._every_s = settings.job_lease_s / 3
        self._held: dict[int, dict[int, int]] = {}
        self._tokens = itertools.count()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @contextmanager
    def renewing(self, claims: dict[int, int]) -> Iterator[None]:
        """Keep these claims' leases renewed while the block runs. A job that has ended, or
        that another claim took (this run stalled past its lease), is skipped by the update."""
        token = next(self._tokens)
        with self._lock:
            self._held[token] = claims
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, name="job-leases", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                del self._held[token]

    def _beat(self) -> None:
        while True:
            time.sleep(self._every_s)
            with self._lock:
                if not self._held:
                    self._thread = None
                    return
                claims = self._merged()
            try:
                self._renew(claims)
            except Exception:
                log.warning(
                    "leases of jobs %s not renewed; will retry", list(claims), exc_info=True
                )

    def _merged(self) -> dict[int, int]:
        """Every held claim; a job held twice (a stale run beside its new claim) by its newest."""
        merged: dict[int, int] = {}
        for claims in self._held.values():
            for job_id, attempt in claims.items():
                merged[job_id] = max(attempt, merged.get(job_id, attempt))
        return merged

    def _renew(self, claims: dict[int, int]) -> None:
        with session_scope(self._settings.resolved_database_url) as session:
            renewed = jobs.extend_leases(session, claims, self._settings.job_lease_s)
        if renewed < len(claims):
            log.debug("jobs %s: %d leases are no longer ours", list(claims), len(claims) - renewed)
