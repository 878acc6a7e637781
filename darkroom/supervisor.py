"""`darkroom up`: API, worker and dispatcher as child processes, stopped together.

SIGINT or SIGTERM to the supervisor becomes one SIGTERM to each child (a warm shutdown: the
worker finishes its job). If any child exits on its own, the others are stopped too.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
from types import FrameType

log = logging.getLogger(__name__)

GRACE_S = 60.0


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    # A session of its own: a terminal's Ctrl-C reaches only the supervisor, which then sends
    # each child exactly one SIGTERM (a second signal would make Celery shut down cold).
    return subprocess.Popen([sys.executable, "-m", "darkroom.cli", *args], start_new_session=True)


def run_all(host: str, port: int) -> int:
    """Run the three tiers until a signal arrives or one of them exits."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: stopping all tiers", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    children = [
        _spawn("api", "--host", host, "--port", str(port)),
        _spawn("worker"),
        _spawn("dispatcher"),
    ]
    while not stop.wait(0.5):
        if any(child.poll() is not None for child in children):
            log.error("a tier exited on its own: stopping the others")
            break
    return _stop(children, clean=stop.is_set())


def _stop(children: list[subprocess.Popen[bytes]], *, clean: bool) -> int:
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            log.error("pid %s did not stop in %ss: killing it", child.pid, GRACE_S)
            child.kill()
            child.wait()
    return 0 if clean else 1
