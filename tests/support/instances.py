"""Servers a fault test owns: a Postgres cluster of its own, stopped and started at will.

The machine's shared Postgres (5432) is never signalled: this cluster is created with initdb as
the `postgres` user in a temporary folder, listens on a free loopback port, and is removed at
the end. Only the postmaster this helper started is ever signalled, by its pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

PG_BIN = Path("/usr/lib/postgresql/15/bin")
#: How long the cluster gets to accept connections, or to stop.
PG_TIMEOUT_S = 60.0
#: A throwaway cluster: trust on loopback, no fsync.
INITDB_OPTIONS = ("--auth=trust", "--no-sync", "-E", "UTF8")


class OwnedPostgres:
    """One Postgres cluster on 127.0.0.1:`port`; `stop` is a fast shutdown (clients are cut
    off, as in a restart), `start` brings the same data back."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.root = Path(tempfile.mkdtemp(prefix="darkroom-pg-"))
        shutil.chown(self.root, "postgres", "postgres")
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.process: subprocess.Popen[bytes] | None = None
        _as_postgres(
            [str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", *INITDB_OPTIONS]
        )

    def url(self, database: str = "postgres") -> str:
        """A SQLAlchemy URL of `database` on this cluster."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def conninfo(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> float:
        """Start the postmaster and wait until it accepts connections; the seconds it took."""
        assert self.process is None or self.process.poll() is not None, "already running"
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(PG_BIN / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    *self._flags(),
                ],
                user="postgres",
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        while time.monotonic() - started < PG_TIMEOUT_S:
            try:
                psycopg.connect(self.conninfo(), connect_timeout=1).close()
                return time.monotonic() - started
            except psycopg.OperationalError:
                time.sleep(0.05)
        raise AssertionError(f"own postgres on {self.port} not up\n{self.tail()}")

    def _flags(self) -> list[str]:
        """Its socket in its own folder, loopback only, no fsync (a throwaway cluster)."""
        return ["-k", str(self.root), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]

    def stop(self) -> None:
        """Fast shutdown (SIGINT): open sessions are cut off, as in a restart."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGINT)
            self.process.wait(timeout=PG_TIMEOUT_S)

    def create_database(self, name: str) -> str:
        """A new database on this cluster; its SQLAlchemy URL."""
        with psycopg.connect(self.conninfo(), autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no postgres log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def remove(self) -> None:
        """Stop the cluster and delete its files."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def owned_postgres(port: int) -> Iterator[OwnedPostgres]:
    """A started cluster of the test's own, removed afterwards."""
    cluster = OwnedPostgres(port)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


def _as_postgres(argv: list[str]) -> None:
    """Run a command as the `postgres` user (initdb refuses to run as root)."""
    subprocess.run(argv, user="postgres", check=True, capture_output=True, timeout=PG_TIMEOUT_S)
