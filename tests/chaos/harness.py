"""Processes the chaos test owns: a private Redis and the Darkroom tiers, each killable by pid.

Everything listens on 127.0.0.1 only. The shared Redis on 6379 and the shared Postgres server
are never signalled: the test starts its own redis-server on a free port and restarts that one,
and only ever creates and drops a database of its own on the shared Postgres.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import redis

#: How long any process gets to become ready or to stop before the test gives up on it.
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0

_RECEIVED = re.compile(r"Task darkroom\.run_job\[([0-9a-f-]+)\] received")
_FINISHED = re.compile(r"Task darkroom\.run_job\[([0-9a-f-]+)\] (succeeded|failed|raised)")


def tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a log file, or a note that it does not exist."""
    if not path.exists():
        return f"({path.name} not written)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class OwnedProcess:
    """One long-running child this test started; restartable, its output appended to one log.

    Each start writes a marker line to the log, so the current incarnation's lines can be told
    from earlier ones. The child runs in a session of its own: a signal reaches only it.
    """

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _marker: str = ""
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        """Start a new incarnation (the previous one must have exited)."""
        assert self.process is None or self.process.poll() is not None, f"{self.name} is running"
        self.starts += 1
        self._marker = f"=== chaos: {self.name} start #{self.starts} ==="
        if self._log is not None:
            self._log.close()
        self._log = self.log_path.open("ab")
        self._log.write(f"{self._marker}\n".encode())
        self._log.flush()
        self.process = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def current_log(self) -> str:
        """What this incarnation has logged so far."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        start = text.rfind(self._marker)
        return text[start:] if start >= 0 else text

    def kill(self) -> None:
        """SIGKILL this incarnation and reap it."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=STOP_TIMEOUT_S)

    def terminate(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        """SIGTERM (a warm shutdown); SIGKILL if it has not exited in `timeout`. True if clean."""
        if not self.alive():
            return True
        os.kill(self.pid, signal.SIGTERM)
        assert self.process is not None
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return False
        return True

    def close(self) -> None:
        """Stop the child if it still runs (SIGTERM, then SIGKILL) and close its log."""
        self.terminate(timeout=15)
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, lines: int = 40) -> str:
        return f"--- {self.name} ({self.log_path.name}) ---\n{tail(self.log_path, lines)}"


def wait_until(
    what: str, ready: Callable[[], bool], timeout: float, logs: Callable[[], str]
) -> float:
    """Poll `ready` every 0.2 s until it holds; the seconds it took. Fails with the log tails."""
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        if ready():
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"{what}: not done after {timeout:.0f}s\n{logs()}")


class OwnedRedis(OwnedProcess):
    """A redis-server of this test's own on a loopback port; no persistence, so a restart loses
    every message, which is the point."""

    def __init__(self, port: int, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        argv = [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(workdir),
        ]
        super().__init__("redis", argv, dict(os.environ), workdir / "redis.log")
        self.port = port

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start_and_wait(self) -> None:
        self.start()
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise AssertionError(f"own redis on {self.port} not up\n{self.tail()}")


class Tier(OwnedProcess):
    """A `python -m cli.main <args>` process."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        argv = [sys.executable, "-m", "cli.main", *args]
        super().__init__(name, argv, env, logs / f"{name}.log")

    def celery_ready(self) -> bool:
        """True once this incarnation's Celery worker consumes (it logged `ready.`)."""
        return " ready." in self.current_log()

    def running_job(self) -> bool:
        """True while this worker incarnation is inside a run_job task (solo pool: one at a time).

        The worker logs `received` when a task starts and `succeeded` when it ends.
        """
        text = self.current_log()
        started = set(_RECEIVED.findall(text))
        finished = {task for task, _ in _FINISHED.findall(text)}
        return bool(started - finished)
