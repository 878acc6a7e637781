"""`darkroom up`: API, worker and dispatcher as child processes, stopped together.

SIGINT or SIGTERM to the supervisor becomes one SIGTERM to each child (a warm shutdown: the
worker finishes its job). A child that exits on its own is started again after a back-off, as
a process manager would: every tier keeps its state in the database, so a restart loses nothing.

On a laptop it is also the way in: it refuses to start without the worker's dependencies (a
worker that cannot import them would be restarted forever), and once the API answers it prints
where everything is, with the dashboard's token in the URL fragment, as Jupyter does
(`startup_lines`).
"""

from __future__ import annotations

import importlib.util
import logging
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

import httpx

from darkroom.settings import Settings

log = logging.getLogger(__name__)

#: What the worker tier imports to run diffusion (the `worker` extra).
WORKER_MODULES = ("torch", "diffusers")

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
            [sys.executable, "-m", "cli.main", *self.args], start_new_session=True
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


def missing_worker_modules() -> list[str]:
    """The worker's modules this Python cannot import (found, not imported: torch is slow)."""
    missing = []
    for name in WORKER_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package missing, or an import blocked
            found = False
        if not found:
            missing.append(name)
    return missing


def missing_modules_line(missing: list[str]) -> str:
    """The one line `darkroom up` answers when the worker could not start."""
    return (
        f"darkroom up: the worker needs {' and '.join(missing)}, which this Python cannot"
        " import. Install the worker extra (pip install torch==2.13.0 'darkroom[worker]'),"
        " or run the API alone with `darkroom api`."
    )


def laptop_admin_token(settings: Settings) -> str:
    """The dashboard's token for this run: the configured one; in the embedded profile (no
    DATABASE_URL: one person's machine) a fresh one when none is configured; otherwise none,
    so that a production dashboard stays off until an operator sets DARKROOM_ADMIN_TOKEN."""
    if settings.admin_token or settings.database_url:
        return settings.admin_token
    return secrets.token_hex(32)  # hex holds none of the words the settings refuse


def startup_lines(settings: Settings, host: str, port: int, admin_token: str) -> list[str]:
    """Where the API, its docs, its metrics and the dashboard are. The token is printed (in
    the URL's fragment, which browsers never send) only in the embedded profile."""
    base = local_url(host, port)
    if not admin_token:
        dashboard = "off (set DARKROOM_ADMIN_TOKEN to turn it on)"
    elif settings.database_url:
        dashboard = f"{base}/dashboard (sign in with DARKROOM_ADMIN_TOKEN)"
    else:
        dashboard = f"{base}/dashboard#token={admin_token}"
    return [
        f"Darkroom is up. API:       {base}/",
        f"               Docs:      {base}/docs",
        f"               Metrics:   {base}/metrics",
        f"               Dashboard: {dashboard}",
    ]


def default_public_url(settings: Settings, host: str, port: int) -> str | None:
    """Where the links in the answers should point when DARKROOM_PUBLIC_URL is not set: where
    this API listens (the settings' default names port 8000 whatever `--port` says)."""
    return None if "public_url" in settings.model_fields_set else local_url(host, port)


def local_url(host: str, port: int) -> str:
    """The API's address as a browser or client on this machine opens it."""
    return f"http://{_display_host(host)}:{port}"


def _display_host(host: str) -> str:
    """A host a browser on this machine can open (a wildcard bind is not one)."""
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _answers(host: str, port: int) -> bool:
    """Whether the API answers its health check yet."""
    try:
        url = f"http://{_display_host(host)}:{port}/health"
        return httpx.get(url, timeout=0.5).status_code == 200
    except httpx.HTTPError:
        return False


def run_all(host: str, port: int, on_ready: Callable[[], None] | None = None) -> int:
    """Run the three tiers until SIGINT or SIGTERM; `on_ready` once the API first answers."""
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
        Child(("installer",)),  # model downloads: never on a GPU worker
    ]
    for child in children:
        child.start()
    while not stop.wait(0.5):
        for child in children:
            child.watch(time.monotonic())
        if on_ready is not None and _answers(host, port):
            on_ready()
            on_ready = None
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
