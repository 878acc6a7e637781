"""The database's clock: the one clock every due time, lease and age is compared with.

Each host's clock differs from the others by milliseconds or more; a delivery stamped due "now"
by a worker is not yet due for a dispatcher whose clock is 5 ms behind. So timestamps that
another process compares (leases, due times, publish times) are taken from the database, on
Postgres and on SQLite alike, never from `datetime.now()`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.functions import FunctionElement

from db.models import UTCDateTime

#: SQLite's now in the format SQLAlchemy stores datetimes in (microseconds: six digits), so that
#: comparisons between stored values and this one are plain string comparisons.
_SQLITE_NOW = "(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')"


class DbNow(FunctionElement[datetime]):
    """The database's current time as an SQL expression, for UPDATE ... SET and WHERE clauses.

    Postgres: `now()`, the start of the transaction, so every statement of one transaction
    sees the same instant. SQLite: the statement's time, to the millisecond.
    """

    type = UTCDateTime()
    inherit_cache = True
    name = "db_now"


@compiles(DbNow)
def _now_default(_element: DbNow, _compiler: Any, **_kw: Any) -> str:
    return "now()"


@compiles(DbNow, "sqlite")
def _now_sqlite(_element: DbNow, _compiler: Any, **_kw: Any) -> str:
    return _SQLITE_NOW


def db_now(session: Session) -> datetime:
    """The database's current time (timezone-aware UTC), read in `session`'s transaction."""
    value: datetime | None = session.scalar(select(DbNow()))
    assert value is not None
    return value
