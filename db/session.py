"""Engine and session factory. One place owns each transaction: the request or the task."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


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
    return create_engine(url, pool_pre_ping=True, **pool)


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
