"""Prometheus metrics against the real services, parsed with prometheus_client's own parser.

The API's scrape-time gauges run in process on real Postgres and Redis; the counters of the
worker and dispatcher come from the exporters of a whole `darkroom up`.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from api.app import create_app
from darkroom.identities import FailureReason, Operation
from darkroom.jobspec import JobSpec
from darkroom.metrics import GpuMemoryCollector
from darkroom.queue import make_celery
from darkroom.settings import Settings
from db.models import Job, utcnow
from db.repositories import jobs
from db.repositories.keys import IssuedKey, create_key
from db.session import session_scope
from services import jobs as job_service
from services import server
from tests.support import rows
from tests.support.servers import ImageServer, Received, WebhookReceiver
from tests.support.system import darkroom_up, free_port, production_env
from worker.sweeper import sweep_once

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(exposition: str) -> Samples:
    """Every sample of a scrape, keyed by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """One sample's value, or None when the scrape has no such series."""
    return samples.get((name, frozenset(labels.items())))


def scrape(url: str, **headers: str) -> Samples:
    response = httpx.get(url, headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return parse(response.text)


@pytest.fixture
def own_settings(settings: Settings, own_pg_url: str) -> Settings:
    """Production settings on a database of this test's own (the gauges count every row)."""
    return settings.model_copy(update={"database_url": own_pg_url})


@pytest.fixture
def own_key(own_pg_url: str) -> IssuedKey:
    with session_scope(own_pg_url) as session:
        return create_key(session, "metrics")


@pytest.fixture
def broker(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def pix2pix(key: str, image: str, **extra: Any) -> dict[str, Any]:
    """A small, fast pix2pix request."""
    return {"key": key, "init_image": image, "prompt": "make it blue", "steps": 4, **extra}


def failures(reason: FailureReason) -> float:
    """The img2img failures counted under `reason` so far in this process."""
    labels = {"operation": Operation.IMG2IMG.value, "reason": reason.value}
    return REGISTRY.get_sample_value("darkroom_job_failures_total", labels) or 0.0


def queued_job(settings: Settings, key: IssuedKey) -> int:
    """A queued img2img job of `key` (nothing runs it)."""
    spec = JobSpec(
        operation=Operation.IMG2IMG,
        prompt="count",
        init_images=["http://127.0.0.1:9/x.png"],
        steps=2,
        guidance_scale=7.0,
        seed=1,
    )
    return rows.queued_job(settings, key.row.id, spec=spec)


def claimed(settings: Settings, job_id: int) -> Job:
    """Job `job_id` as a worker holds it after claiming it."""
    with session_scope(settings.resolved_database_url) as session:
        outcome, job = jobs.claim_job(session, job_id, lease_s=60, max_attempts=3)
    assert outcome == jobs.ClaimOutcome.CLAIMED
    assert job is not None
    return job


def test_each_failure_path_records_its_reason(own_settings: Settings, own_key: IssuedKey) -> None:
    """Metrics count the reason each path gives, never one read off the message."""
    from worker.recording import conclude
    from worker.runtime import Ready, WorkerRuntime

    settings = own_settings
    broker = make_celery(settings)
    before = {reason: failures(reason) for reason in FailureReason}

    canceled = queued_job(settings, own_key)
    with session_scope(settings.resolved_database_url) as session:
        job_service.cancel(session, broker, settings, canceled)  # the API's and the CLI's
    queued_job(settings, own_key)
    with session_scope(settings.resolved_database_url) as session:  # its message is its own
        assert len(server.clear_queue(session, broker, settings, own_key.row.id).job_ids) == 1

    lost = claimed(settings, queued_job(settings, own_key)).id
    with session_scope(settings.resolved_database_url) as session:
        session.execute(
            update(Job)
            .where(Job.id == lost)
            .values(attempts=3, lease_until=utcnow() - timedelta(seconds=60))
        )
    assert sweep_once(settings, broker).failed_jobs == 1

    runtime = WorkerRuntime(settings, broker)
    for result, stop in (
        (ValueError("unreadable"), False),
        (RuntimeError("bug"), False),
        (None, True),
    ):
        job = claimed(settings, queued_job(settings, own_key))
        spec = JobSpec.model_validate(job.params)
        conclude(runtime, Ready(job, spec, None), result, canceled=stop)  # type: ignore[arg-type]

    counted = {reason: failures(reason) - before[reason] for reason in FailureReason}
    assert counted == {
        FailureReason.CANCELED: 3,
        FailureReason.WORKER_LOST: 1,
        FailureReason.REJECTED: 1,
        FailureReason.INTERNAL: 1,
        FailureReason.STORAGE: 0,  # tests/worker/test_storage_faults.py counts this one
    }


class _FakeCuda:
    """torch.cuda as a machine with two GPUs reports it (this machine has none)."""

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 2

    @staticmethod
    def memory_allocated(index: int) -> int:
        return 1000 + index

    @staticmethod
    def memory_reserved(index: int) -> int:
        return 2000 + index


def gpu_samples() -> Samples:
    return parse(generate_latest(GpuMemoryCollector()).decode())


def test_gpu_memory_is_reported_per_device_only_where_torch_sees_cuda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert gpu_samples() == {}  # never imports torch itself (the API must not)

    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=_FakeCuda()))
    samples = gpu_samples()
    assert value(samples, "darkroom_gpu_memory_allocated_bytes", device="1") == 1001
    assert value(samples, "darkroom_gpu_memory_reserved_bytes", device="0") == 2000


def test_api_metrics_show_queued_jobs_per_queue_and_count_a_cancel(
    own_settings: Settings, own_key: IssuedKey, broker: redis.Redis, image_server: ImageServer
) -> None:
    settings = own_settings
    model_queue = f"{settings.job_queue}.model.tiny-{uuid.uuid4().hex[:6]}"
    # Per-model queues are found by name; kombu keeps one list per priority step.
    broker.lpush(model_queue, "m1")
    broker.lpush(f"{model_queue}\x06\x163", "m2")
    try:
        with TestClient(create_app(settings)) as client:
            red = image_server.url("/red.png")
            ids = [
                client.post("/api/v5/pix2pix", json=pix2pix(own_key.plaintext, red)).json()["id"]
                for _ in range(2)
            ]
            before = parse(client.get("/metrics").text)
            canceled = client.post(f"/api/v1/jobs/{ids[0]}/cancel", json={"key": own_key.plaintext})
            assert canceled.status_code == 200, canceled.text
            after = parse(client.get("/metrics").text)
    finally:
        broker.delete(model_queue, f"{model_queue}\x06\x163", settings.job_queue)

    assert value(before, "darkroom_broker_up") == 1
    assert value(before, "darkroom_database_up") == 1
    assert value(before, "darkroom_queue_depth", queue=settings.job_queue) == 2
    assert value(before, "darkroom_queue_depth", queue=settings.webhook_queue) == 0
    assert value(before, "darkroom_queue_depth", queue=model_queue) == 2
    assert value(before, "darkroom_jobs", state="queued", operation="pix2pix") == 2
    assert value(before, "darkroom_jobs", state="processing", operation="pix2pix") == 0
    assert (value(before, "darkroom_oldest_queued_job_age_seconds") or 0) > 0
    assert value(before, "darkroom_webhook_deliveries", state="pending") == 0

    assert value(after, "darkroom_jobs", state="queued", operation="pix2pix") == 1

    # The cancel ran in this process, so this process's registry counted it.
    def grew(name: str, **labels: str) -> float:
        return (value(after, name, **labels) or 0) - (value(before, name, **labels) or 0)

    assert grew("darkroom_jobs_finished_total", operation="pix2pix", state="failed") == 1
    assert grew("darkroom_job_failures_total", operation="pix2pix", reason="canceled") == 1
    assert grew("darkroom_job_latency_seconds_count", operation="pix2pix", state="failed") == 1


def test_queue_depth_of_the_embedded_filesystem_broker(
    own_settings: Settings, own_key: IssuedKey, image_server: ImageServer
) -> None:
    settings = own_settings.model_copy(update={"broker_url": ""})
    with TestClient(create_app(settings)) as client:
        for _ in range(3):
            body = pix2pix(own_key.plaintext, image_server.url("/red.png"))
            assert client.post("/api/v5/pix2pix", json=body).status_code == 200
        samples = parse(client.get("/metrics").text)

    assert value(samples, "darkroom_broker_up") == 1
    assert value(samples, "darkroom_queue_depth", queue=settings.job_queue) == 3
    assert value(samples, "darkroom_queue_depth", queue=settings.webhook_queue) == 0


def test_metrics_answer_while_broker_and_database_are_down(settings: Settings) -> None:
    down = settings.model_copy(
        update={
            "broker_url": f"redis://127.0.0.1:{free_port()}/0",
            "database_url": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none",
        }
    )
    with TestClient(create_app(down)) as client:
        started = time.monotonic()
        response = client.get("/metrics")
        elapsed = time.monotonic() - started

    assert response.status_code == 200
    samples = parse(response.text)
    assert value(samples, "darkroom_broker_up") == 0
    assert value(samples, "darkroom_database_up") == 0
    assert not [key for key in samples if key[0] == "darkroom_queue_depth"]
    assert elapsed < 5, elapsed


def test_a_metrics_token_is_required_once_set(settings: Settings) -> None:
    guarded = settings.model_copy(update={"metrics_token": "t0k3n-for-the-scraper-only"})
    with TestClient(create_app(guarded)) as client:
        assert client.get("/metrics").status_code == 401
        wrong = {"authorization": "Bearer nope"}
        assert client.get("/metrics", headers=wrong).status_code == 401
        right = {"authorization": "Bearer t0k3n-for-the-scraper-only"}
        answer = client.get("/metrics", headers=right)
    assert answer.status_code == 200
    assert value(parse(answer.text), "darkroom_broker_up") == 1


def first_post_fails(received: list[str]) -> Callable[[Received], tuple[int, dict[str, str]]]:
    """A receiver answer: 500 to the first POST of each webhook-id, then 200."""

    def respond(hook: Received) -> tuple[int, dict[str, str]]:
        message_id = hook.headers["webhook-id"]
        seen = message_id in received
        received.append(message_id)
        return (200, {}) if seen else (500, {})

    return respond


def wait_until(
    what: str, check: Callable[[], bool], logs: Callable[[], str], timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what}: not after {timeout}s\n{logs()}")


@pytest.mark.slow
def test_worker_and_dispatcher_export_job_model_and_webhook_metrics(
    tmp_path: Path,
    own_pg_url: str,
    redis_url: str,
    image_server: ImageServer,
    receiver: WebhookReceiver,
) -> None:
    worker_port, dispatcher_port = free_port(), free_port()
    receiver.respond = first_post_fails([])
    env = {
        **production_env(tmp_path / "data", own_pg_url, redis_url, "metrics"),
        "DARKROOM_WEBHOOK_SCHEDULE_S": "0,0.2,0.2",
        "DARKROOM_WEBHOOK_JITTER": "0",
        "DARKROOM_WORKER_METRICS_PORT": str(worker_port),
        "DARKROOM_DISPATCHER_METRICS_PORT": str(dispatcher_port),
    }
    worker_url = f"http://127.0.0.1:{worker_port}/metrics"
    dispatcher_url = f"http://127.0.0.1:{dispatcher_port}/metrics"
    with darkroom_up(env, tmp_path) as system:
        key = system.create_key()["key"]
        red, text = image_server.url("/red.png"), image_server.url("/text.txt")
        # Two successes of one model (a load, then a cache hit) and one refused input.
        for image in (red, red, text):
            hook = {"webhook": receiver.url, "track_id": 7}
            answer = system.post("/api/v5/pix2pix", pix2pix(key, image, **hook))
            assert answer["status"] == "processing", answer
            system.wait_for(f"/api/v5/fetch/{answer['id']}", key)

        def delivered(count: int) -> Callable[[], bool]:
            name = "darkroom_webhook_deliveries_finished_total"
            return lambda: value(scrape(dispatcher_url), name, state="delivered") == count

        wait_until("3 webhooks delivered", delivered(3), system.log_tail)
        worker = scrape(worker_url)
        dispatcher = scrape(dispatcher_url)
        api = scrape(system.base_url + "/metrics")
    assert system.process.returncode == 0, system.log_tail()

    success = {"operation": "pix2pix", "state": "success"}
    failed = {"operation": "pix2pix", "state": "failed"}
    assert value(worker, "darkroom_jobs_finished_total", **success) == 2
    assert value(worker, "darkroom_jobs_finished_total", **failed) == 1
    assert value(worker, "darkroom_job_failures_total", operation="pix2pix", reason="rejected") == 1
    assert value(worker, "darkroom_job_latency_seconds_count", **success) == 2
    assert value(worker, "darkroom_job_generation_seconds_count", operation="pix2pix") == 2
    lookups = "darkroom_model_cache_lookups_total"
    assert value(worker, lookups, kind="pix2pix", result="miss") == 1
    assert value(worker, lookups, kind="pix2pix", result="hit") == 1
    assert value(worker, "darkroom_model_load_seconds_count", kind="pix2pix") == 1
    assert (value(worker, "darkroom_model_load_seconds_sum", kind="pix2pix") or 0) > 0

    attempts = "darkroom_webhook_attempts_total"
    assert value(dispatcher, attempts, outcome="rejected", status_class="5xx") == 3
    assert value(dispatcher, attempts, outcome="delivered", status_class="2xx") == 3
    assert value(dispatcher, "darkroom_webhook_attempt_seconds_count") == 6

    assert value(api, "darkroom_broker_up") == 1
    assert value(api, "darkroom_queue_depth", queue=env["DARKROOM_JOB_QUEUE"]) == 0
    assert value(api, "darkroom_queue_depth", queue=env["DARKROOM_WEBHOOK_QUEUE"]) == 0
    assert value(api, "darkroom_jobs", state="queued", operation="pix2pix") == 0
    assert value(api, "darkroom_webhook_deliveries", state="pending") == 0
    assert value(api, "darkroom_webhook_deliveries", state="failed") == 0
