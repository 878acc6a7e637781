"""The pool's liveness check (a ping only after idling) and the autocommitted read sessions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from db import session as db_session
from db.session import make_engine, read_scope


@pytest.fixture
def engine(own_pg_url: str) -> Iterator[Engine]:
    """A pool of one connection, so that every checkout gets the same one back."""
    engine = make_engine(own_pg_url, db_session.PoolLimits(size=1, overflow=0))
    yield engine
    engine.dispose()


def _backend_pid(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.scalar(text("SELECT pg_backend_pid()")) or 0)


def test_a_connection_in_steady_use_is_not_pinged(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkouts in quick succession cost no round trip beyond the caller's own statement."""
    _backend_pid(engine)
    raw: list[str] = []
    original = engine.dialect.do_ping

    def counted(dbapi: Any) -> bool:
        raw.append("ping")
        return original(dbapi)

    monkeypatch.setattr(engine.dialect, "do_ping", counted)
    for _ in range(5):
        _backend_pid(engine)
    assert raw == []


def test_a_connection_killed_while_idle_is_replaced_before_use(
    engine: Engine, own_pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heal-after-restart behaviour `pool_pre_ping` gave: a pooled connection whose server
    side is gone is found dead on checkout and replaced; the caller never sees an error."""
    monkeypatch.setattr(db_session, "PING_IDLE_S", 0.0)
    first = _backend_pid(engine)
    with make_engine(own_pg_url).connect() as admin:
        admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
        admin.commit()
    second = _backend_pid(engine)
    assert second not in (0, first)


def test_read_scope_runs_each_statement_outside_a_transaction(pg_url: str) -> None:
    """No BEGIN or COMMIT: each statement is its own transaction (a read sees no snapshot
    held from the previous one), and the session commits nothing on its way out."""
    with read_scope(pg_url) as session:
        assert isinstance(session, Session)
        first = session.scalar(text("SELECT txid_current()"))
        second = session.scalar(text("SELECT txid_current()"))
    assert first is not None
    assert second is not None
    assert first != second
