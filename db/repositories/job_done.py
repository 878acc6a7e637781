"""The listening side of a job's end: the API's one LISTEN connection per process (api/waiting.py).

The sending side is `db.repositories.jobs.notify_job_done`, inside the terminal transaction.
These take a raw psycopg connection in autocommit, not a session: a LISTEN must outlive every
transaction. Kept apart from the jobs queries so that only the API's listener imports psycopg.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from db.repositories.jobs import JOB_DONE_CHANNEL


async def listen(conn: psycopg.AsyncConnection[Any]) -> None:
    """Subscribe `conn` to the channel that `notify_job_done` announces ended jobs on."""
    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(JOB_DONE_CHANNEL)))


async def ping(conn: psycopg.AsyncConnection[Any]) -> None:
    """A round trip on `conn`: it fails if the server is gone (psycopg keeps the notifications
    that arrive meanwhile)."""
    await conn.execute("SELECT 1")
