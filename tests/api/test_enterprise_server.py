"""The enterprise server-management endpoints, on real Postgres and Redis, and with a real
worker process for the ones that act on workers (clear_cache, nsfw_image_check, restart_server).
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.app import create_app
from api.routes.enterprise_server import NOT_ADMIN
from darkroom.settings import Settings
from db.models import Job, JobState
from db.repositories import webhooks
from db.repositories.keys import IssuedKey, create_key
from db.session import session_scope
from services.routing import WorkerPresence, live_workers
from services.server import CLEARED_MESSAGE
from tests.api.test_submit import PIX2PIX
from tests.support.servers import ImageServer
from tests.support.system import darkroom, darkroom_up, production_env, settings_env, terminate

E = "/api/v1/enterprise"


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _key(settings: Settings, *, admin: bool = False) -> IssuedKey:
    with session_scope(settings.resolved_database_url) as session:
        return create_key(session, f"srv-{uuid.uuid4().hex[:6]}", admin=admin)


def _png(size: tuple[int, int] = (24, 16), mode: str = "RGB", fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size).save(out, format=fmt)
    return out.getvalue()


def test_keys_create_admin_marks_the_key(settings: Settings) -> None:
    env = {**os.environ, "DARKROOM_DATABASE_URL": settings.resolved_database_url}
    lines = darkroom(env, "keys", "create", "--name", "ops-admin", "--admin").splitlines()
    created = json.loads(lines[-1])
    assert created["admin"] is True
    plain = json.loads(darkroom(env, "keys", "create", "--name", "ops-plain").splitlines()[-1])
    assert plain["admin"] is False
    listed = [json.loads(line) for line in darkroom(env, "keys", "list").splitlines()]
    flags = {row["prefix"]: row["admin"] for row in listed}
    assert flags[created["key"][:10]] is True
    assert flags[plain["key"][:10]] is False


@pytest.mark.parametrize("operation", ["system_details", "clear_cache", "restart_server"])
def test_admin_operations_refuse_other_keys(
    client: TestClient, api_key: IssuedKey, operation: str
) -> None:
    refused = client.post(f"{E}/{operation}", json={"key": api_key.plaintext})
    assert refused.status_code == 403
    assert refused.json() == {"status": "error", "message": NOT_ADMIN}
    missing = client.post(f"{E}/{operation}", json={})
    assert missing.status_code == 401
    assert missing.json()["message"] == "Invalid Api Key"


def test_system_details_show_queue_depths(client: TestClient, settings: Settings) -> None:
    admin = _key(settings, admin=True)
    submitted = client.post("/api/v5/pix2pix", json={"key": admin.plaintext, **PIX2PIX})
    assert submitted.status_code == 200

    answer = client.post(f"{E}/system_details", json={"key": admin.plaintext})

    assert answer.status_code == 200
    details = answer.json()
    assert details["status"] == "success"
    assert details["workers"] == []  # none started in this test
    assert details["queues"][settings.job_queue] == 1
    assert details["versions"]["python"]


def test_clear_queue_fails_the_callers_queued_jobs_and_an_admin_clears_all(
    own_pg_url: str, settings: Settings
) -> None:
    # A database of its own: an admin's clear fails every queued job in it.
    tuned = settings.model_copy(update={"database_url": own_pg_url})
    alice, bob, admin = _key(tuned), _key(tuned), _key(tuned, admin=True)
    with TestClient(create_app(tuned)) as client:

        def submit(key: IssuedKey) -> int:
            body = {"key": key.plaintext, **PIX2PIX, "webhook": "http://127.0.0.1:9/hook"}
            job_id: int = client.post("/api/v5/pix2pix", json=body).json()["id"]
            return job_id

        alices, bobs = [submit(alice), submit(alice)], [submit(bob)]
        cleared = client.post(f"{E}/clear_queue", json={"key": alice.plaintext}).json()
        assert cleared["status"] == "success"
        assert sorted(cleared["cleared"]) == sorted(alices)
        assert _states(tuned, alices + bobs) == [JobState.FAILED] * 2 + [JobState.QUEUED]
        _assert_failed_with_webhook(tuned, alices)

        everyone = client.post(f"{E}/clear_queue", json={"key": admin.plaintext}).json()
        assert everyone["cleared"] == bobs
        _assert_failed_with_webhook(tuned, bobs)
        again = client.post(f"{E}/clear_queue", json={"key": admin.plaintext}).json()
        assert again["cleared"] == []
        assert again["message"] == "0 queued jobs cleared"


def _states(settings: Settings, ids: list[int]) -> list[JobState]:
    with session_scope(settings.resolved_database_url) as session:
        return [session.get_one(Job, job_id).state for job_id in ids]


def _assert_failed_with_webhook(settings: Settings, ids: list[int]) -> None:
    with session_scope(settings.resolved_database_url) as session:
        for job_id in ids:
            assert session.get_one(Job, job_id).error == CLEARED_MESSAGE
            delivery = webhooks.get_delivery_for_job(session, job_id)
            assert delivery is not None
            assert json.loads(delivery.payload)["message"] == CLEARED_MESSAGE


@pytest.mark.parametrize("path", ["list_schedulers", "schedulers_list"])
def test_list_schedulers_per_family(client: TestClient, api_key: IssuedKey, path: str) -> None:
    answer = client.post(f"{E}/{path}", json={"key": api_key.plaintext}).json()
    assert answer["status"] == "success"
    assert "EulerAncestralDiscreteScheduler" in answer["schedulers"]
    assert "DDIMInverseScheduler" in answer["refused"]
    assert answer["families"]["sd"] == answer["schedulers"]
    assert answer["families"]["flux"] == []  # Flux runs its own scheduler only


def test_base64_to_url_stores_an_image_served_by_its_link(
    client: TestClient, api_key: IssuedKey
) -> None:
    data = _png()
    body = {"key": api_key.plaintext, "base64_string": base64.b64encode(data).decode()}
    answer = client.post("/api/v6/image_editing/base64_to_url", json=body).json()
    assert answer["status"] == "success"
    link: str = answer["output"][0]
    path = link.removeprefix("http://127.0.0.1:8000")
    served = client.get(path)
    assert served.status_code == 200
    assert served.headers["content-type"] == "image/png"
    assert served.content == data
    webp = "data:image/webp;base64," + base64.b64encode(_png(fmt="WEBP")).decode()
    stored = client.post(f"{E}/upload_image", json={"key": api_key.plaintext, "image": webp})
    assert stored.json()["link"].endswith(".webp")
    assert client.get("/uploads/upload-" + "0" * 32 + ".png").status_code == 404


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        (base64.b64encode(_png(fmt="GIF")).decode(), "not a PNG, JPEG or WebP"),
        ("not base64!", "not valid base64"),
        (base64.b64encode(_png((8001, 5000), mode="1")).decode(), "too many pixels"),
    ],
)
def test_base64_to_url_refuses_what_is_no_usable_image(
    client: TestClient, api_key: IssuedKey, payload: str, says: str
) -> None:
    body = {"key": api_key.plaintext, "base64_string": payload}
    answer = client.post(f"{E}/base64_to_url", json=body)
    assert answer.status_code == 422
    assert says in answer.json()["message"]["base64_string"][0]


# --- with a real worker ---------------------------------------------------------------------


@pytest.fixture
def worker(settings: Settings, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """One `darkroom worker` holding the tiny img2img model, stopped afterwards."""
    env = {**settings_env(settings, tmp_path / "w"), "DARKROOM_LOG_FORMAT": "text"}
    env["OMP_NUM_THREADS"] = "1"
    name = f"srv-{uuid.uuid4().hex[:6]}@127.0.0.1"
    log = (tmp_path / "worker.log").open("wb")
    command = [sys.executable, "-m", "cli.main", "worker", "--name", name, "--models", "tiny"]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        terminate(process, timeout=30)
        log.close()


def _until(check: Callable[[], Any], what: str, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _presence(settings: Settings) -> WorkerPresence | None:
    workers = live_workers(settings)
    return workers[0] if workers and workers[0].models else None


@pytest.mark.slow
def test_worker_operations_with_a_real_worker(
    settings: Settings,
    worker: subprocess.Popen[bytes],
    image_server: ImageServer,
) -> None:
    admin = _key(settings, admin=True)
    presence = _until(lambda: _presence(settings), "the worker's model advertisement")
    with TestClient(create_app(settings)) as client:
        details = client.post(f"{E}/system_details", json={"key": admin.plaintext}).json()
        [shown] = details["workers"]
        assert shown["name"] == presence.name
        assert shown["models"] == presence.models
        assert "torch" in shown["versions"]
        model_queue = f"{settings.job_queue}.model.{presence.models[0]}"
        assert details["queues"][model_queue] == 0

        cleared = client.post(f"{E}/clear_cache", json={"key": admin.plaintext}).json()
        assert cleared["status"] == "success"
        assert cleared["workers"][presence.name]["dropped"] >= 1
        assert cleared["pending"] == []
        # The model left memory: the worker stops advertising it.
        _until(lambda: live_workers(settings)[0].models == [], "the model to be withdrawn", 10)

        body = {"key": admin.plaintext, "init_image": image_server.url("/red.png")}
        checked = client.post(f"{E}/nsfw_image_check", json=body)
        assert checked.status_code == 200, checked.text
        assert checked.json()["nsfw"] is False
        unreachable = {**body, "init_image": image_server.url("/text.txt")}
        assert client.post(f"{E}/nsfw_image_check", json=unreachable).status_code == 400

        # A job that runs a few seconds is running when the restart is asked for.
        job = {
            "key": admin.plaintext,
            "model_id": "tiny",
            "prompt": "a lighthouse",
            "init_image": image_server.url("/red.png"),
            "width": 512,
            "height": 512,
            # Long enough (seconds, even on a loaded machine) that the restart surely arrives
            # while it runs.
            "num_inference_steps": 25,
            "samples": 1,
            "strength": 1.0,
        }
        job_id = client.post(f"{E}/img2img", json=job).json()["id"]
        _until(lambda: _states(settings, [job_id]) == [JobState.PROCESSING], "the job to run")
        asked = datetime.now(UTC)
        restarted = client.post(f"{E}/restart_server", json={"key": admin.plaintext}).json()
        assert restarted["workers"] == [presence.name]
        # The command went out while the job ran.
        assert _states(settings, [job_id]) == [JobState.PROCESSING]
        # A warm shutdown: the worker finishes its job, then leaves by itself, cleanly, for its
        # supervisor to restart.
        assert worker.wait(timeout=120) == 0
        with session_scope(settings.resolved_database_url) as session:
            ran = session.get_one(Job, job_id)
            assert ran.state == JobState.SUCCESS
            assert ran.finished_at is not None
            # It ended after the restart was asked for: the shutdown waited for it. (A wall-clock
            # margin here would only measure how loaded the machine is.)
            assert ran.finished_at > asked
        assert live_workers(settings) == []
        gone = client.post(f"{E}/clear_cache", json={"key": admin.plaintext})
        assert gone.status_code == 503


@pytest.mark.slow
def test_restart_server_under_darkroom_up_brings_the_worker_back(
    tmp_path: Path, pg_url: str, redis_url: str
) -> None:
    env = production_env(tmp_path / "data", pg_url, redis_url, "h2")
    with darkroom_up(env, tmp_path) as system:
        made = darkroom(system.env, "keys", "create", "--name", "ops", "--admin")
        key = json.loads(made.splitlines()[-1])["key"]

        def workers() -> list[str]:
            answer = system.post(f"{E}/system_details", {"key": key})
            return [worker["name"] for worker in answer["workers"]]

        [before] = _until(workers, "the worker's presence")
        told = system.post(f"{E}/restart_server", {"key": key})
        assert told["workers"] == [before]
        # The supervisor starts a new worker process (a new node name: its pid).
        [after] = _until(lambda: [n for n in workers() if n != before], "a restarted worker")
        assert before not in workers()  # the old one left cleanly, withdrawing its presence
        assert after.startswith("worker-")
