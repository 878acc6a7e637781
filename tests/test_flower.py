"""Flower against our Celery app: it sees a live dispatcher, the tasks it runs and its queue.

Flower loads `worker.dispatcher_app` (the torch-free app; both apps share one broker and the
same queue names) and talks to the test Redis, as docs/OBSERVABILITY.md tells operators to.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from darkroom.queue import DELIVER_WEBHOOK_TASK, make_celery, send
from darkroom.settings import Settings
from tests.support.system import free_port

pytestmark = pytest.mark.slow

AUTH = ("ops", "flower-test-password")
MISSING_DELIVERY = 2_000_000_000  # the dispatcher finds no such row and does nothing


@contextmanager
def running(argv: list[str], env: dict[str, str], log_path: Path) -> Iterator[Path]:
    """A child process logging to `log_path`, SIGTERMed when the block ends."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield log_path
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for(what: str, probe: Callable[[], Any], logs: list[Path], timeout: float = 90) -> Any:
    """`probe()`'s first truthy answer; HTTP errors count as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            answer = probe()
        except httpx.HTTPError:
            answer = None
        if answer:
            return answer
        time.sleep(0.5)
    tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in logs)
    raise AssertionError(f"{what}: not after {timeout}s\n{tails}")


def test_flower_sees_the_worker_its_tasks_and_its_queue(
    tmp_path: Path, settings: Settings, own_pg_url: str
) -> None:
    settings = settings.model_copy(update={"database_url": own_pg_url})  # the sweeper runs
    node = f"flower-{uuid.uuid4().hex[:8]}"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "DARKROOM_DATA_DIR": str(tmp_path / "data"),
        "DARKROOM_DATABASE_URL": own_pg_url,
        "DARKROOM_BROKER_URL": settings.resolved_broker_url,
        "DARKROOM_JOB_QUEUE": settings.job_queue,
        "DARKROOM_WEBHOOK_QUEUE": settings.webhook_queue,
        # Flower sees Celery workers: the dispatcher's Celery mode, not its database loop.
        "DARKROOM_WEBHOOK_LOOP": "false",
    }
    dispatcher_argv = [sys.executable, "-m", "cli.main", "dispatcher", "--name", f"{node}@%h"]
    flower_argv = [
        *(sys.executable, "-m", "celery", "-A", "worker.dispatcher_app", "flower"),
        *(f"--port={port}", "--address=127.0.0.1", f"--basic-auth={':'.join(AUTH)}"),
    ]
    broker = make_celery(settings)

    def get(path: str) -> httpx.Response:
        return httpx.get(base + path, auth=AUTH, timeout=10)

    def our_worker() -> str | None:
        workers = get("/api/workers?refresh=1").json()
        return next((name for name in workers if name.startswith(f"{node}@")), None)

    def our_task() -> dict[str, Any] | None:
        send(broker, DELIVER_WEBHOOK_TASK, MISSING_DELIVERY)  # again, until events are on
        tasks = get(f"/api/tasks?taskname={DELIVER_WEBHOOK_TASK}&workername={hostname}").json()
        done = [task for task in tasks.values() if task["state"] == "SUCCESS"]
        return done[0] if done else None

    logs = [tmp_path / "dispatcher.log", tmp_path / "flower.log"]
    with running(dispatcher_argv, env, logs[0]), running(flower_argv, env, logs[1]):
        hostname = wait_for("Flower sees the dispatcher", our_worker, logs)
        task = wait_for("Flower sees a finished task", our_task, logs)
        queues = get("/api/queues/length").json()["active_queues"]
        unauthenticated = httpx.get(base + "/api/workers", timeout=10).status_code
        metrics = get("/metrics").text
    redis.Redis.from_url(settings.resolved_broker_url).delete(settings.webhook_queue)

    assert task["args"] == f"[{MISSING_DELIVERY}]"
    assert task["worker"] == hostname
    assert settings.webhook_queue in {queue["name"] for queue in queues}
    assert unauthenticated == 401
    online = {
        sample.labels["worker"]: sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "flower_worker_online"
    }
    assert online.get(hostname) == 1
