"""A small pool of asyncio Postgres connections for reads that the event loop runs itself.

Why: a poll of a queued job is one indexed read, and a hop to the thread pool costs more than
the read. Worse, worker threads contend for the interpreter lock with the event loop, so that
every socket write and read of the loop waits for the lock behind them (docs/PERFORMANCE.md,
issue 15): a process answering polls through threads answers everything else more slowly too.

The same driver as the engine's (psycopg 3, which has an asyncio API), the same URL, and a
bounded number of connections (`DARKROOM_DB_POLL_POOL_SIZE` per API process, on top of the
engine's pool). Each statement is autocommitted, so a read is one round trip. Any failure
(connect, a dead connection after a server restart, the pool busy for longer than the wait)
answers None after discarding the connection: callers then take their ordinary, threaded path,
which has its own reconnection and 503 rules, so this pool never needs retries of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import psycopg
from sqlalchemy import ClauseElement

from db.session import session_factory

log = logging.getLogger(__name__)


class AsyncReadPool:
    """At most `size` autocommit connections to `url`'s Postgres, opened when first needed."""

    def __init__(self, url: str, size: int, wait_s: float) -> None:
        engine = session_factory(url).kw["bind"]
        self._dialect = engine.dialect
        args, params = engine.dialect.create_connect_args(engine.url)
        self._conninfo: str = args[0] if args else ""
        self._connect_params: dict[str, Any] = dict(params)
        self.size = size
        self.wait_s = wait_s
        self._idle: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()
        self._open = 0
        self._closed = False

    @staticmethod
    def usable_for(url: str) -> bool:
        """Whether `url` is a Postgres database this pool's driver can reach."""
        return url.startswith(("postgresql+psycopg://", "postgresql://"))

    def compile(self, statement: ClauseElement) -> str:
        """`statement` as this driver's SQL text (named `%(name)s` parameters): compile once,
        at startup, not per request."""
        return str(statement.compile(dialect=self._dialect))

    async def fetch_one(self, sql: str, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """The first row of `sql`, or None when there is none or the read failed (see the
        module's docstring): the caller cannot tell the two apart and must not need to."""
        conn = await self._checkout()
        if conn is None:
            return None
        healthy = False
        try:
            cursor = await conn.execute(sql, params)
            row = await cursor.fetchone()
            healthy = True
            return row
        except psycopg.Error as error:
            log.info("an async read failed (the request takes the threaded path): %s", error)
            return None
        finally:
            self._checkin(conn, healthy)

    async def close(self) -> None:
        """Close every idle connection; those in use are closed when they come back."""
        self._closed = True
        while not self._idle.empty():
            conn = self._idle.get_nowait()
            self._open -= 1
            await conn.close()

    async def _checkout(self) -> psycopg.AsyncConnection[Any] | None:
        """An idle connection, a new one while fewer than `size` are open, or one given back
        within `wait_s`; None when none comes or the server cannot be reached."""
        if self._closed:
            return None
        if not self._idle.empty():
            return self._idle.get_nowait()
        if self._open < self.size:
            self._open += 1  # before the await: concurrent checkouts must not pass `size`
            try:
                return await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, **self._connect_params
                )
            except (psycopg.Error, OSError) as error:
                self._open -= 1
                log.info("no async read connection (the threaded path serves): %s", error)
                return None
        try:
            return await asyncio.wait_for(self._idle.get(), self.wait_s)
        except TimeoutError:
            return None

    def _checkin(self, conn: psycopg.AsyncConnection[Any], healthy: bool) -> None:
        """Give `conn` back; close it when its read failed or was cut short (its state is then
        unknown: a cancelled query may still be running) or the pool is closed."""
        if healthy and not self._closed and not conn.closed:
            self._idle.put_nowait(conn)
            return
        self._open -= 1
        # A synchronous close: this may run while the task is being cancelled.
        conn.pgconn.finish()
