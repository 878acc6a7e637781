"""`darkroom up`: API, worker and dispatcher as child processes, stopped together.

SIGINT or SIGTERM to the supervisor becomes one SIGTERM to each child (a warm shutdown: the
worker finishes its job). A child that exits on its own is started again after a back-off, as
a process manager would: every tier keeps its state in the database, so a restart loses nothing.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from types import FrameType

log = logging.getLogger(__name__)

GRACE_S = 60.0
MAX_BACKOFF_S = 30.0


@dataclass
class Child:
    """One tier: how to start it, its current process, and when it may be restarted."""

    args: tuple[str, ...]
    process: subprocess.Popen[bytes] = field(init=False)
    backoff_s: float = 1.0
    restart_at: float | None = None

    def start(self) -> None:
        # A session of its own: a terminal's Ctrl-C reaches only the supervisor, which then
        # sends each child exactly one SIGTERM (a second would make Celery shut down cold).
        self.process = subprocess.Popen(
            [sys.executable, "-m", "darkroom.cli", *self.args], start_new_session=True
        )

    def watch(self, now: float) -> None:
        """Schedule a restart when the process has died; perform it when it is due."""
        if self.restart_at is None and self.process.poll() is not None:
            log.error(
                "%s exited with %s; restarting in %.0fs",
                self.args[0],
                self.process.returncode,
                self.backoff_s,
            )
            self.restart_at = now + self.backoff_s
            self.backoff_s = min(self.backoff_s * 2, MAX_BACKOFF_S)
        elif self.restart_at is not None and now >= self.restart_at:
            self.restart_at = None
            self.start()


def run_all(host: str, port: int) -> int:
    """Run the three tiers until SIGINT or SIGTERM."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping all tiers", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    children = [
        Child(("api", "--host", host, "--port", str(port))),
        Child(("worker",)),
        Child(("dispatcher",)),
    ]
    for child in children:
        child.start()
    while not stop.wait(0.5):
        for child in children:
            child.watch(time.monotonic())
    _stop([child.process for child in children])
    return 0


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            log.error("pid %s did not stop in %ss: killing it", process.pid, GRACE_S)
            process.kill()
            process.wait()
