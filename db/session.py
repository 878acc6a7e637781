"""Engine and session factory. One place owns each transaction: the request or the task."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.orm import Session, sessionmaker

#: A pooled connection idle for longer than this is pinged before it is handed out (see
#: `_ping_when_idle`); one in steady use is not.
PING_IDLE_S = 1.0


@dataclass(frozen=True)
class PoolLimits:
    """A process's connection pool: `size` kept open, `overflow` more on demand, and how long a
    checkout waits for a free one before it raises (the API answers that with a 503)."""

    size: int = 10
    overflow: int = 30
    timeout_s: float = 2.0


#: The pool of every engine this process makes; the API sets its own from its settings.
_limits = PoolLimits()


def configure_pool(limits: PoolLimits) -> None:
    """Size the pools of the engines made from now on (engines made before are dropped)."""
    global _limits  # one process-wide sizing, like the engine cache itself
    if limits != _limits:
        _limits = limits
        session_factory.cache_clear()
        _read_factory.cache_clear()


def pool_limits() -> PoolLimits:
    """The current process-wide pool sizing."""
    return _limits


def _tune_sqlite(dbapi_connection: Any, _record: Any) -> None:
    """WAL and a busy timeout let the API, worker and dispatcher share one SQLite file."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str, limits: PoolLimits | None = None) -> Engine:
    """An engine for `url`, with SQLite set up for several processes."""
    limits = limits or _limits
    pool = {
        "pool_size": limits.size,
        "max_overflow": limits.overflow,
        "pool_timeout": limits.timeout_s,
    }
    if url.startswith("sqlite"):
        args = {"check_same_thread": False, "timeout": 30}
        in_memory = url in ("sqlite://", "sqlite:///:memory:")  # one connection: no pool
        engine = create_engine(url, connect_args=args, **({} if in_memory else pool))
        event.listen(engine, "connect", _tune_sqlite)
        return engine
    engine = create_engine(url, **pool)
    _ping_when_idle(engine)
    return engine


def _ping_when_idle(engine: Engine) -> None:
    """Ping a connection on checkout only when it sat in the pool for over PING_IDLE_S.

    `pool_pre_ping` costs a round trip on every checkout, which a poll that is itself one
    indexed read notices (docs/PERFORMANCE.md, issue 15). A connection that was just used is
    alive; one that waited may belong to a server that has restarted since, so it is pinged
    and, if dead, replaced before anyone sees it (a DisconnectionError makes the pool retry
    with a new connection). A connection that dies while in use raises once, and SQLAlchemy
    then invalidates the whole pool, so the next checkouts connect afresh either way.
    """

    def checked_in(_dbapi: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    def checkout(dbapi: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.pop("idle_since", None)
        if idle_since is None or time.monotonic() - idle_since <= PING_IDLE_S:
            return
        try:
            alive = engine.dialect.do_ping(dbapi)
        except Exception as error:
            raise exc.DisconnectionError("a pooled connection was dead") from error
        if not alive:
            raise exc.DisconnectionError("a pooled connection was dead")

    event.listen(engine, "checkin", checked_in)
    event.listen(engine, "checkout", checkout)


@lru_cache(maxsize=4)
def session_factory(url: str) -> sessionmaker[Session]:
    """The process-wide session factory for `url` (one engine per URL)."""
    return sessionmaker(make_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error: for tasks and CLI commands."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@lru_cache(maxsize=4)
def _read_factory(url: str) -> sessionmaker[Session]:
    """Sessions over the same pool as `session_factory(url)`'s, each statement autocommitted."""
    engine = session_factory(url).kw["bind"].execution_options(isolation_level="AUTOCOMMIT")
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def read_scope(url: str) -> Iterator[Session]:
    """A session for reads only, such as a poll: nothing is committed, and with each statement
    autocommitted there is no BEGIN and no COMMIT, two round trips of a three-trip read."""
    session = _read_factory(url)()
    try:
        yield session
    finally:
        session.close()
