"""Sync wait: a request may wait up to N seconds for its job and answer the outcome directly.

The client opts in with `Prefer: wait=N` (RFC 7240) or a body field `wait`. The wait holds no
database session and no threadpool thread: it awaits an asyncio event that the process's one
listener sets when Postgres announces the job's end (`NOTIFY darkroom_job_done`, sent by
services.outcomes inside the terminal transaction, so it arrives after the commit). Each wake-up
re-reads the job, so a notification is only a hint; a re-check every `sync_wait_recheck_s`
covers one lost while the listener reconnects. SQLite has no notifications: one poll per
process asks which waited jobs have ended. At most `sync_wait_max_concurrent` waits at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from functools import partial
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from sqlalchemy.engine import make_url
from starlette.concurrency import run_in_threadpool

from api.errors import ApiError
from api.fields import to_float
from darkroom.settings import Settings
from db.repositories import job_done, jobs
from db.session import session_scope

log = logging.getLogger(__name__)

Answer = dict[str, Any]
#: Re-reads a job's answer with a fresh session (run in the threadpool).
ReadAnswer = Callable[[], Answer]


#: Which of these job ids have ended (run in the threadpool, one short session).
PollEnded = Callable[[list[int]], set[int]]


class JobWaiter:
    """Wakes the requests that wait for a job: one LISTEN connection per process, fanning each
    notification out to the waiters of that job id. Without a conninfo (SQLite) one poll per
    `poll_s` asks which of all the waited jobs have ended, in one query, and wakes those: the
    cost of waiting does not grow with the number of waits."""

    def __init__(
        self,
        conninfo: str | None,
        *,
        recheck_s: float,
        max_waits: int = 200,
        poll: PollEnded | None = None,
        poll_s: float = 0.5,
        reconnect_s: float = 1.0,
        health_check_s: float = 30.0,
    ) -> None:
        self.conninfo = conninfo
        self.recheck_s = recheck_s
        self.poll = poll
        self.poll_s = poll_s
        #: Sync waits this process holds at once at most (DARKROOM_SYNC_WAIT_MAX_CONCURRENT).
        self.max_waits = max_waits
        #: Sync waits in progress now.
        self.waits = 0
        self.reconnect_s = reconnect_s
        self.health_check_s = health_check_s
        #: How many times the listener has (re)established LISTEN; for tests and operators.
        self.connections = 0
        self._waiters: dict[int, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> JobWaiter:
        """A listener on the Postgres database of `settings`, or a poller on SQLite; neither
        when waiting is off (DARKROOM_SYNC_WAIT_MAX_S=0)."""
        waits = settings.sync_wait_max_s > 0
        url = settings.resolved_database_url
        conninfo = listen_conninfo(url) if waits else None
        return cls(
            conninfo,
            recheck_s=settings.sync_wait_recheck_s,
            max_waits=settings.sync_wait_max_concurrent,
            poll=partial(ended_jobs, url) if waits and conninfo is None else None,
            poll_s=settings.sync_wait_poll_s,
        )

    def start(self) -> None:
        """Start listening, or polling, on the running loop (again, if the loop changed or the
        task died)."""
        if self.conninfo is not None:
            watch = self._listen(self.conninfo)
        elif self.poll is not None:
            watch = self._poll_ended(self.poll)
        else:
            return
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(watch, name="job-waiter")
        else:
            watch.close()  # already watching: the coroutine is never awaited

    async def stop(self) -> None:
        """Stop listening and close the connection."""
        task, self._task = self._task, None
        if task is not None and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task

    @contextmanager
    def slot(self) -> Iterator[bool]:
        """Whether a request may wait now; its place is held until the block ends. Each wait
        re-reads its job now and then: unbounded, waits would crowd out every other request."""
        if self.waits >= self.max_waits:
            yield False
            return
        self.waits += 1  # only the event loop's thread counts: no lock needed
        try:
            yield True
        finally:
            self.waits -= 1

    @contextmanager
    def subscribe(self, job_id: int) -> Iterator[asyncio.Event]:
        """An event set when job `job_id` may have ended. Subscribe before reading the job, so
        that an end between the read and the wait is not missed."""
        self.start()
        event = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(job_id, set())
            waiters.discard(event)
            if not waiters:
                self._waiters.pop(job_id, None)

    def wake(self, job_id: int) -> None:
        """Wake the waiters of one job."""
        for event in self._waiters.get(job_id, ()):
            event.set()

    def wake_all(self) -> None:
        """Wake every waiter to re-read its job: notifications may have been missed."""
        for events in self._waiters.values():
            for event in events:
                event.set()

    async def _listen(self, conninfo: str) -> None:
        """Listen until cancelled, reconnecting after any failure."""
        while True:
            try:
                await self._listen_once(conninfo)
            except Exception as exc:  # never give up: waits fall back to re-checks meanwhile
                log.warning("job notification listener lost its connection: %s", exc)
            await asyncio.sleep(self.reconnect_s)

    async def _listen_once(self, conninfo: str) -> None:
        """One connection: LISTEN, then dispatch notifications and check the link now and then
        (psycopg keeps notifications that arrive during the check)."""
        conn = await psycopg.AsyncConnection.connect(
            conninfo,
            autocommit=True,
            application_name=LISTENER_NAME,
            # TCP keepalives: a connection to a vanished server fails instead of hanging.
            keepalives=1,
            keepalives_idle=30,
            keepalives_interval=10,
        )
        async with conn:
            await job_done.listen(conn)
            self.connections += 1
            self.wake_all()  # jobs may have ended while nothing listened
            while True:
                async for notify in conn.notifies(timeout=self.health_check_s):
                    self._dispatch(notify.payload)
                await asyncio.wait_for(job_done.ping(conn), self.health_check_s)

    async def _poll_ended(self, poll: PollEnded) -> None:
        """Until cancelled: every `poll_s`, wake the waiters of the jobs that have ended."""
        while True:
            await asyncio.sleep(self.poll_s)
            waited = list(self._waiters)
            if not waited:
                continue
            try:
                ended = await run_in_threadpool(poll, waited)
            except Exception as exc:  # never give up: each wait's own re-check still runs
                log.warning("polling the waited jobs failed: %s", exc)
                continue
            for job_id in ended:
                self.wake(job_id)

    def _dispatch(self, payload: str) -> None:
        try:
            job_id = int(payload)
        except ValueError:
            log.warning("ignored a job notification with payload %r", payload[:50])
            return
        self.wake(job_id)


#: How the listener's connection shows in pg_stat_activity.
LISTENER_NAME = "darkroom-api-listener"


def listen_conninfo(database_url: str) -> str | None:
    """A libpq URI for the SQLAlchemy URL of a Postgres database; None for other databases."""
    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        return None
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def ended_jobs(database_url: str, job_ids: list[int]) -> set[int]:
    """Those of `job_ids` that have ended, read in one short session."""
    with session_scope(database_url) as session:
        return jobs.ended_among(session, job_ids)


async def wait_for_outcome(
    waiter: JobWaiter, job_id: int, wait_s: float, read: ReadAnswer
) -> Answer:
    """The job's answer once it is no longer processing, or its processing answer after
    `wait_s` seconds."""
    deadline = time.monotonic() + wait_s
    with waiter.subscribe(job_id) as woken:
        while True:
            answer = await run_in_threadpool(read)
            remaining = deadline - time.monotonic()
            if answer.get("status") != "processing" or remaining <= 0:
                return answer
            with suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), min(remaining, waiter.recheck_s))
            woken.clear()


def requested_wait(request: Request, body: dict[str, Any], settings: Settings) -> float:
    """Seconds the client asks to wait, capped by DARKROOM_SYNC_WAIT_MAX_S; 0 for no wait.

    A bad `wait` in the body is refused like any field; a bad `Prefer` header is ignored, as
    RFC 7240 asks of preferences a server cannot honour.
    """
    wanted = max(body_wait(body), prefer_wait(request.headers.get("prefer", "")))
    return min(wanted, settings.sync_wait_max_s)


def body_wait(body: dict[str, Any]) -> float:
    """The body field `wait` in seconds (0 when absent); 422 when it is not a number >= 0."""
    value = body.get("wait")
    if value is None or value == "":
        return 0.0
    try:
        seconds = to_float(value)
    except ValueError as exc:
        raise ApiError(422, {"wait": [f"wait {exc}"]}) from None
    if seconds < 0:
        raise ApiError(422, {"wait": ["wait must be 0 or more seconds"]})
    return seconds


def prefer_wait(header: str) -> float:
    """The `wait` preference of a Prefer header, e.g. `respond-async, wait=10`."""
    for preference in header.split(","):
        name, _, value = preference.split(";", 1)[0].partition("=")
        if name.strip().lower() != "wait":
            continue
        try:
            seconds = float(value.strip().strip('"'))
        except ValueError:
            return 0.0
        return seconds if math.isfinite(seconds) and seconds >= 0 else 0.0
    return 0.0


def applied_preference(wait_s: float) -> str:
    """The Preference-Applied header value for a wait of `wait_s` seconds."""
    return f"wait={wait_s:g}"


@asynccontextmanager
async def listening(app: FastAPI) -> AsyncIterator[None]:
    """App lifespan: listen from startup (no first waiter pays the connect) to shutdown."""
    waiter: JobWaiter = app.state.waiter
    waiter.start()
    try:
        yield
    finally:
        await waiter.stop()


def get_waiter(request: Request) -> JobWaiter:
    """The app's waiter."""
    waiter: JobWaiter = request.app.state.waiter
    return waiter
