"""What a benchmark runs against: a fresh database, queues of its own, Darkroom's processes.

Everything is on 127.0.0.1 (override the services with DARKROOM_BENCH_PG and
DARKROOM_BENCH_REDIS); every process a benchmark starts is stopped by its pid when it ends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis

from darkroom.settings import Settings
from db.migrate import upgrade_to_head
from db.repositories.keys import IssuedKey, create_key
from db.session import session_factory, session_scope

PG_ADMIN = os.environ.get("DARKROOM_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("DARKROOM_BENCH_REDIS", "redis://127.0.0.1:6379/14")
#: Limits high enough that admission control never throttles a benchmark.
UNLIMITED = 10**9
STOP_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 40


@contextmanager
def fresh_database(prefix: str = "darkroom_bench") -> Iterator[str]:
    """A new migrated Postgres database (its SQLAlchemy URL), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    url = f"{base}/{name}"
    try:
        upgrade_to_head(url)
        yield url
    finally:
        session_factory(url).kw["bind"].dispose()
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def production_settings(**overrides: Any) -> Iterator[Settings]:
    """The production profile (Postgres, Redis) on a fresh database, a temporary data folder and
    queues no other run shares; the queues are emptied afterwards."""
    suffix = uuid.uuid4().hex[:8]
    with fresh_database() as url, tempfile.TemporaryDirectory(prefix="darkroom-bench-") as tmp:
        fields: dict[str, Any] = {
            "data_dir": Path(tmp),
            "database_url": url,
            "broker_url": REDIS_URL,
            "model_preset": "tiny",
            "url_allowlist": ["127.0.0.1/32"],
            "job_queue": f"bench.jobs.{suffix}",
            "webhook_queue": f"bench.webhooks.{suffix}",
            "max_active_jobs_per_key": UNLIMITED,
            "max_jobs_per_minute_per_key": UNLIMITED,
            "max_queue_depth": UNLIMITED,
        }
        settings = Settings(**(fields | overrides))
        try:
            yield settings
        finally:
            purge_queues(settings)


def purge_queues(settings: Settings) -> None:
    """Delete the run's keys from Redis: its queues, the per-model queues that model-affinity
    routing derives from them, and kombu's bindings of all of these."""
    client = redis.Redis.from_url(settings.resolved_broker_url)
    try:
        for queue in (settings.job_queue, settings.webhook_queue):
            for name in client.scan_iter(match=f"*{queue}*"):
                client.delete(name)
    finally:
        client.close()


def child_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that gives a child process `settings` (the fields set explicitly)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    for name, value in settings.model_dump(exclude_unset=True).items():
        # List settings are read as comma-separated values (see darkroom.settings).
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        env[f"DARKROOM_{name.upper()}"] = text
    return env


def new_key(settings: Settings, name: str = "bench") -> IssuedKey:
    """A fresh API key in the run's database."""
    with session_scope(settings.resolved_database_url) as session:
        return create_key(session, f"{name}-{uuid.uuid4().hex[:6]}")


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def log_folder() -> Iterator[Path]:
    """A temporary folder for the processes' logs; if the block fails, their tails go to stderr."""
    with tempfile.TemporaryDirectory(prefix="darkroom-bench-logs-") as folder:
        try:
            yield Path(folder)
        except BaseException:
            for log in sorted(Path(folder).glob("*.log")):
                tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
                print(f"--- {log.name} (last lines)", *tail, sep="\n", file=sys.stderr)
            raise


@contextmanager
def started(
    argv: list[str], env: dict[str, str], log_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `argv`, its output to `log_path`, until the block ends; then stop it by pid."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        stop(process)


def darkroom_argv(*args: str) -> list[str]:
    """The `darkroom` command line, run with this interpreter."""
    return [sys.executable, "-m", "cli.main", *args]


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop one process we started, by its pid: a warm SIGTERM, then SIGKILL after a timeout."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)


def wait_until(ready: Callable[[], bool], timeout: float, what: str, log_path: Path) -> None:
    """Poll `ready` until it holds; fail with the log's tail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.1)
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
    raise RuntimeError(f"{what} not ready in {timeout:.0f}s; log tail:\n{tail}")


def wait_healthy(base_url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    """Wait until the API at `base_url` answers /health (it must not exit meanwhile)."""

    def healthy() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"the API exited with {process.returncode}; see {log_path}")
        try:
            return httpx.get(base_url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, 60, "the API", log_path)


@contextmanager
def running_api(settings: Settings, log_dir: Path, workers: int = 1) -> Iterator[str]:
    """The API tier on a free port until the block ends; its base URL.

    One worker is `darkroom api`, exactly what deploy/ runs; more are uvicorn's own workers
    (separate processes, each with its own connection pool) on the same app factory.
    """
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = child_env(settings, DARKROOM_PUBLIC_URL=base_url)
    argv = darkroom_argv("api", "--host", "127.0.0.1", "--port", str(port))
    if workers > 1:
        argv = [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory"]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    log_path = log_dir / "api.log"
    with started(argv, env, log_path) as process:
        wait_healthy(base_url, process, log_path)
        yield base_url
