"""Model-affinity routing against a real Redis and Postgres: keys, presence, the queue a job is
published to at submit and by the sweeper, and the rescue of jobs stranded in model queues."""

from __future__ import annotations

import argparse
import json
import socket
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import redis
from celery import Celery
from fastapi.testclient import TestClient

from api.app import create_app
from cli.main import cmd_workers
from darkroom.identities import Operation
from darkroom.queue import RUN_JOB_TASK, make_celery, send
from darkroom.settings import Settings
from db.models import Job, utcnow
from db.repositories.keys import IssuedKey, create_key
from db.session import session_scope
from services.routing import (
    ModelKey,
    Presence,
    WorkerPresence,
    choose_queue,
    live_workers,
    model_key,
    model_queue,
    parse_model_key,
)
from tests.support.broker import published_ids
from tests.support.rows import queued_job
from worker.sweeper import sweep_once

TINY_A = model_key("img2img", "tiny-a")
IMG2IMG_BODY = {
    "prompt": "a lighthouse",
    "init_image": "http://127.0.0.1:9/a.png",
    "width": 64,
    "height": 64,
    "num_inference_steps": 2,
}


@pytest.fixture
def rds(settings: Settings) -> Iterator[redis.Redis]:
    """The tests' Redis; the queues and presence keys of this test are deleted afterwards."""
    client = redis.Redis.from_url(settings.resolved_broker_url)
    yield client
    leftovers = [*client.keys(f"{settings.job_queue}*"), *client.keys(f"*.{settings.job_queue}.*")]
    if leftovers:
        client.delete(*leftovers)
    client.close()


@pytest.fixture
def broker(settings: Settings) -> Iterator[Celery]:
    app = make_celery(settings)
    yield app
    app.close()


def _advertise(settings: Settings, worker: str, *keys: ModelKey) -> Presence:
    """Advertise `keys` as a worker named `worker` would."""
    presence = Presence(settings, worker)
    presence.renew(WorkerPresence(worker, [key.name for key in keys]))
    return presence


def test_model_keys_name_the_operation_and_the_model() -> None:
    default = model_key("img2img", None)
    assert default.name == "img2img:stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert model_key("img2img", "stable-diffusion-v1-5/stable-diffusion-v1-5") == default
    assert model_key("pix2pix", None).name == "pix2pix:timbrooks/instruct-pix2pix"
    assert parse_model_key("tiny-a") == TINY_A
    assert parse_model_key(" pix2pix: ") == model_key("pix2pix", None)
    assert parse_model_key("img_mixer:owner/decoder") == ModelKey(
        Operation.IMG_MIXER, "owner/decoder"
    )
    with pytest.raises(ValueError, match="unknown operation 'upscale'"):
        parse_model_key("upscale:x")


def test_a_model_nobody_holds_goes_to_the_general_queue(
    settings: Settings, rds: redis.Redis
) -> None:
    assert choose_queue(settings, Operation.IMG2IMG, "tiny-a") == settings.job_queue


def test_a_live_holder_gets_its_models_jobs(settings: Settings, rds: redis.Redis) -> None:
    presence = _advertise(settings, "w1@test", TINY_A)
    queue = model_queue(settings, TINY_A)
    assert queue == f"{settings.job_queue}.model.img2img:tiny-a"
    assert choose_queue(settings, Operation.IMG2IMG, "tiny-a") == queue
    assert choose_queue(settings, Operation.IMG2IMG, "tiny-b") == settings.job_queue
    assert choose_queue(settings, Operation.PIX2PIX, "tiny-a") == settings.job_queue
    assert [w.models for w in live_workers(settings)] == [["img2img:tiny-a"]]

    presence.withdraw(TINY_A.name)
    assert choose_queue(settings, Operation.IMG2IMG, "tiny-a") == settings.job_queue
    presence.leave([])
    assert live_workers(settings) == []


def test_darkroom_workers_lists_the_live_workers(
    settings: Settings, rds: redis.Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    Presence(settings, "w1@test").renew(WorkerPresence("w1@test", [TINY_A.name], {TINY_A.name: 1}))
    assert cmd_workers(argparse.Namespace(), settings) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert json.loads(line) == {
        "name": "w1@test",
        "models": ["img2img:tiny-a"],
        "loads": {"img2img:tiny-a": 1},
        "jobs": 0,
        "gpus": [],  # a CPU worker's advertisement (system_details shows what a GPU one says)
        "versions": {},
    }
    assert cmd_workers(argparse.Namespace(), Settings(data_dir=tmp_path)) == 1  # embedded


def test_an_advertisement_expires_without_renewal(settings: Settings, rds: redis.Redis) -> None:
    short = settings.model_copy(update={"affinity_ttl_s": 0.3})
    _advertise(short, "w1@test", TINY_A)
    assert choose_queue(short, Operation.IMG2IMG, "tiny-a") == model_queue(short, TINY_A)
    time.sleep(0.5)
    assert choose_queue(short, Operation.IMG2IMG, "tiny-a") == short.job_queue
    assert live_workers(short) == []


def test_a_model_queue_much_longer_than_the_general_one_loses(
    settings: Settings, rds: redis.Redis, broker: Celery
) -> None:
    tight = settings.model_copy(update={"affinity_queue_slack": 1})
    _advertise(tight, "w1@test", TINY_A)
    queue = model_queue(tight, TINY_A)
    for job_id in (1, 2):
        assert send(broker, RUN_JOB_TASK, job_id, queue=queue)
    assert choose_queue(tight, Operation.IMG2IMG, "tiny-a") == tight.job_queue  # 2 > 0 + 1
    assert send(broker, RUN_JOB_TASK, 3)
    assert choose_queue(tight, Operation.IMG2IMG, "tiny-a") == queue  # 2 <= 1 + 1


def test_routing_is_off_without_redis_or_when_disabled(
    settings: Settings, rds: redis.Redis, tmp_path: Path
) -> None:
    _advertise(settings, "w1@test", TINY_A)
    disabled = settings.model_copy(update={"affinity_routing": False})
    assert choose_queue(disabled, Operation.IMG2IMG, "tiny-a") == settings.job_queue
    embedded = Settings(data_dir=tmp_path, job_queue=settings.job_queue)
    assert choose_queue(embedded, Operation.IMG2IMG, "tiny-a") == settings.job_queue


def test_an_unanswering_redis_costs_one_short_timeout(settings: Settings) -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        stuck = settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{port}/0"})
        started = time.monotonic()
        assert choose_queue(stuck, Operation.IMG2IMG, "tiny-a") == settings.job_queue
        assert time.monotonic() - started < 1.0  # affinity_lookup_timeout_s is 0.1 s


def test_submit_publishes_to_the_holders_queue_and_records_it(
    settings: Settings, rds: redis.Redis, api_key: IssuedKey
) -> None:
    _advertise(settings, "w1@test", TINY_A)
    with TestClient(create_app(settings)) as client:
        routed = _submit(client, api_key, "tiny-a")
        general = _submit(client, api_key, "tiny-b")
    queue = model_queue(settings, TINY_A)
    assert published_ids(settings.resolved_broker_url, queue) == [routed]
    assert published_ids(settings.resolved_broker_url, settings.job_queue) == [general]
    assert _queue_name(settings, routed) == queue
    assert _queue_name(settings, general) == settings.job_queue


def _submit(client: TestClient, api_key: IssuedKey, model_id: str) -> int:
    body = {**IMG2IMG_BODY, "key": api_key.plaintext, "model_id": model_id}
    answer = client.post("/api/v1/enterprise/img2img", json=body).json()
    assert answer["status"] == "processing", answer
    job_id: int = answer["id"]
    return job_id


def _queue_name(settings: Settings, job_id: int) -> str | None:
    with session_scope(settings.resolved_database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.queue_name


@pytest.fixture
def own(settings: Settings, own_pg_url: str) -> Settings:
    """Settings on a database of this test's own: the sweeper sees every row."""
    return settings.model_copy(
        update={"database_url": own_pg_url, "affinity_stranded_after_s": 30.0}
    )


@pytest.fixture
def own_key(own: Settings) -> IssuedKey:
    with session_scope(own.resolved_database_url) as session:
        return create_key(session, "routing-test")


def _ago(seconds: float) -> datetime:
    return utcnow() - timedelta(seconds=seconds)


def _job(settings: Settings, key: IssuedKey, model_id: str | None, **values: object) -> int:
    """A queued img2img job for `model_id`, with column values set as given."""
    row = {"operation": Operation.IMG2IMG, "endpoint": "enterprise", **values}
    params = {"operation": "img2img", "model_id": model_id}
    return queued_job(settings, key.row.id, params=params, **row)


def test_the_sweeper_routes_what_it_publishes(
    own: Settings, own_key: IssuedKey, rds: redis.Redis, broker: Celery
) -> None:
    _advertise(own, "w1@test", TINY_A)
    held = _job(own, own_key, "tiny-a", created_at=_ago(60))
    other = _job(own, own_key, "tiny-b", created_at=_ago(60))

    assert sweep_once(own, broker).enqueued_jobs == 2
    queue = model_queue(own, TINY_A)
    assert published_ids(own.resolved_broker_url, queue) == [held]
    assert published_ids(own.resolved_broker_url, own.job_queue) == [other]
    assert _queue_name(own, held) == queue
    assert _queue_name(own, other) == own.job_queue


def test_jobs_stranded_in_a_model_queue_move_to_the_general_queue(
    own: Settings, own_key: IssuedKey, rds: redis.Redis, broker: Celery
) -> None:
    queue_a, queue_b = model_queue(own, TINY_A), model_queue(own, model_key("img2img", "tiny-b"))
    stranded = _job(own, own_key, "tiny-a", enqueued_at=_ago(60), queue_name=queue_a)
    recent = _job(own, own_key, "tiny-a", enqueued_at=_ago(1), queue_name=queue_a)
    consumed = _job(own, own_key, "tiny-b", enqueued_at=_ago(60), queue_name=queue_b)
    for job_id, queue in ((stranded, queue_a), (recent, queue_a), (consumed, queue_b)):
        assert send(broker, RUN_JOB_TASK, job_id, queue=queue)  # messages not lost: waiting
    _advertise(own, "w2@test", model_key("img2img", "tiny-b"))

    report = sweep_once(own, broker)
    assert report.rescued_jobs == 1
    assert published_ids(own.resolved_broker_url, own.job_queue) == [stranded]
    assert _queue_name(own, stranded) == own.job_queue
    assert _queue_name(own, recent) == queue_a  # may still be a moment's flicker: waits
    assert _queue_name(own, consumed) == queue_b  # its holder is alive
    assert sweep_once(own, broker).rescued_jobs == 0  # moved once, not every sweep


class _CeleryConsumer:
    """Stands in for Celery's worker consumer: runs `call_soon` callbacks at once and records
    which queues it was told to consume."""

    hostname = "wt@test"

    def __init__(self) -> None:
        self.queues: list[str] = []

    def call_soon(self, callback: Callable[..., None], *args: object) -> None:
        callback(*args)

    def add_task_queue(self, queue: str) -> None:
        self.queues.append(queue)

    def cancel_task_queue(self, queue: str) -> None:
        self.queues.remove(queue)


def test_a_worker_holds_what_it_loaded_and_lets_go_of_what_it_evicted(
    own: Settings, own_key: IssuedKey, rds: redis.Redis
) -> None:
    from worker.models.weights import resolve_model
    from worker.residency import TrackedCache, WorkerAffinity

    tiny = own.model_copy(update={"worker_models": ["tiny-a"]})
    cache = TrackedCache(max_entries=1, device="cpu")  # room for one model: the next evicts
    affinity, consumer = WorkerAffinity(tiny, cache), _CeleryConsumer()
    affinity.start(consumer)
    try:
        assert consumer.queues == [model_queue(tiny, TINY_A)]
        assert choose_queue(tiny, Operation.IMG2IMG, "tiny-a") == model_queue(tiny, TINY_A)

        refused = _job(tiny, own_key, "tiny-b", enqueued_at=_ago(1))
        with affinity.tracking(refused):
            pass  # a duplicate the claim refused: no model fetched, nothing changes
        assert affinity.snapshot().models == ["img2img:tiny-a"]

        pix2pix = _job(tiny, own_key, None, enqueued_at=_ago(1), operation=Operation.PIX2PIX)
        with affinity.tracking(pix2pix):
            cache.get(resolve_model("pix2pix", None, tiny))  # what run_job does, evicting tiny-a
        held = model_key("pix2pix", None)
        assert consumer.queues == [model_queue(tiny, held)]
        assert choose_queue(tiny, Operation.IMG2IMG, "tiny-a") == tiny.job_queue
        assert choose_queue(tiny, Operation.PIX2PIX, None) == model_queue(tiny, held)
        [presence] = live_workers(tiny)
        assert presence.models == [held.name]
        assert presence.loads == {TINY_A.name: 1, held.name: 1}
        assert presence.jobs == 1
    finally:
        affinity.stop()
    assert live_workers(tiny) == []
