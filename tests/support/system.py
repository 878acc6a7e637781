"""Running the real system as a subprocess (`darkroom up`), as a user would."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from darkroom.settings import Settings


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def production_env(
    data_dir: Path, database_url: str, broker_url: str, queue_prefix: str
) -> dict[str, str]:
    """Variables for a production-profile system under test: the given database and broker,
    queue names no other run shares, the tiny models, loopback image and webhook URLs allowed."""
    suffix = uuid.uuid4().hex[:8]
    return {
        "DARKROOM_DATA_DIR": str(data_dir),
        "DARKROOM_DATABASE_URL": database_url,
        "DARKROOM_BROKER_URL": broker_url,
        "DARKROOM_JOB_QUEUE": f"{queue_prefix}.jobs.{suffix}",
        "DARKROOM_WEBHOOK_QUEUE": f"{queue_prefix}.webhooks.{suffix}",
        "DARKROOM_MODEL_PRESET": "tiny",
        "DARKROOM_URL_ALLOWLIST": "127.0.0.1/32",
    }


def settings_env(settings: Settings, data_dir: Path) -> dict[str, str]:
    """The environment of one tier process started on `settings`' database, broker and queues
    (the tiny models, loopback URLs allowed), with a data folder of its own."""
    return {
        **os.environ,
        "DARKROOM_DATA_DIR": str(data_dir),
        "DARKROOM_DATABASE_URL": settings.resolved_database_url,
        "DARKROOM_BROKER_URL": settings.resolved_broker_url,
        "DARKROOM_JOB_QUEUE": settings.job_queue,
        "DARKROOM_WEBHOOK_QUEUE": settings.webhook_queue,
        "DARKROOM_MODEL_PRESET": "tiny",
        "DARKROOM_URL_ALLOWLIST": "127.0.0.1/32",
    }


def darkroom(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    """Run one `darkroom` command to completion; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return done.stdout


@dataclass
class RunningSystem:
    """A `darkroom up` process and how to reach it."""

    process: subprocess.Popen[bytes]
    base_url: str
    env: dict[str, str]
    log_path: Path

    def create_key(self) -> dict[str, str]:
        """`darkroom keys create`: the JSON object on its last line."""
        out = darkroom(self.env, "keys", "create", "--name", "e2e")
        key: dict[str, str] = json.loads(out.strip().splitlines()[-1])
        return key

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = httpx.post(self.base_url + path, json=body, timeout=30)
        answer: dict[str, Any] = response.json()
        return answer

    def wait_for(self, fetch_path: str, key: str, timeout: float = 240) -> dict[str, Any]:
        """Poll a fetch URL until the job is no longer processing."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = self.post(fetch_path, {"key": key})
            if answer["status"] != "processing":
                return answer
            time.sleep(0.5)
        raise AssertionError(f"{fetch_path} still processing after {timeout}s\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        return log_tail(self.log_path, lines)


@contextmanager
def darkroom_up(env_overrides: dict[str, str], workdir: Path) -> Iterator[RunningSystem]:
    """`darkroom up` on a free port until the block ends; then SIGTERM and a clean exit."""
    port = free_port()
    env = {
        **os.environ,  # no DARKROOM_PUBLIC_URL: `up` points the links at its own port
        "PYTHONUNBUFFERED": "1",
        **env_overrides,
    }
    log_path = workdir / "darkroom-up.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "up", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    system = RunningSystem(process, f"http://127.0.0.1:{port}", env, log_path)
    try:
        wait_healthy(process, system.base_url, log_path, "darkroom up", timeout=60)
        yield system
    finally:
        if not terminate(process, timeout=90):
            raise AssertionError(f"darkroom up ignored SIGTERM for 90 s\n{system.log_tail()}")


def log_tail(log_path: Path, lines: int = 60) -> str:
    """The last `lines` lines of a subprocess's log, for a failure message."""
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])


def wait_healthy(
    process: subprocess.Popen[bytes], base_url: str, log_path: Path, what: str, timeout: float
) -> None:
    """Until `base_url`/health answers 200; fails at once if `process` exits first, and after
    `timeout` seconds, with the tail of its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited early\n{log_tail(log_path)}")
        try:
            if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{what} not healthy in {timeout}s\n{log_tail(log_path)}")


def terminate(process: subprocess.Popen[bytes], timeout: float) -> bool:
    """SIGTERM to a process the test started, then its exit; killed after `timeout` seconds.
    Whether it exited on its own (a process that had already exited counts)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
        return False
