"""Live progress as server-sent events, and `darkroom jobs watch`, on real Postgres.

The job moves through its states by the same repository calls the worker makes (claim,
record_progress, outcomes.fail), so each test controls when an event must appear.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from api.app import create_app
from darkroom.identities import FailureReason
from darkroom.settings import Settings
from db.models import Job
from db.repositories import jobs, webhooks
from db.repositories.keys import IssuedKey
from db.session import session_scope
from services import outcomes
from tests.api.test_enterprise_server import E, worker  # noqa: F401 (a fixture)
from tests.api.test_submit import PIX2PIX
from tests.support.servers import ImageServer


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _submit(client: TestClient, key: IssuedKey) -> int:
    body = {"key": key.plaintext, **PIX2PIX, "steps": 20, "webhook": "http://127.0.0.1:9/h"}
    job_id: int = client.post("/api/v5/pix2pix", json=body).json()["id"]
    return job_id


class EventReader:
    """Reads `event:`/`data:` pairs off a streaming response's lines."""

    def __init__(self, lines: Iterator[str]) -> None:
        self.lines = lines

    def next(self) -> tuple[str, dict[str, Any]]:
        name = ""
        for line in self.lines:
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: ") and name:
                return name, json.loads(line.removeprefix("data: "))
        raise AssertionError("the stream ended")


def test_events_follow_a_job_from_queue_to_its_end(
    client: TestClient, settings: Settings, api_key: IssuedKey, db: Session
) -> None:
    job_id = _submit(client, api_key)
    path = f"/api/v1/jobs/{job_id}/events"
    with client.stream("GET", path, headers={"Authorization": f"Bearer {api_key.plaintext}"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = EventReader(r.iter_lines())
        name, queued = events.next()
        assert name == "queued"
        assert queued["position"] >= 1
        assert queued["id"] == job_id

        outcome, _ = jobs.claim_job(db, job_id, lease_s=60, max_attempts=3)
        assert outcome == jobs.ClaimOutcome.CLAIMED
        db.commit()
        assert events.next()[1]["step"] == 0
        jobs.record_progress(db, [job_id], 0.5)
        db.commit()
        name, running = events.next()
        assert (name, running["step"], running["steps"]) == ("progress", 10, 20)

        started = time.monotonic()
        outcomes.fail(
            db, settings, db.get_one(Job, job_id), "it broke", reason=FailureReason.REJECTED
        )
        db.commit()
        name, ended = events.next()
        # The end arrives by the waiter's notification, sooner than a poll would bring it.
        assert time.monotonic() - started < 2.0
        assert name == "failed"
        delivery = webhooks.get_delivery_for_job(db, job_id)
        assert delivery is not None
        assert ended == json.loads(delivery.payload)  # the webhook's payload, exactly
        assert [line for line in events.lines if line] == []  # and the stream ends


def test_events_authenticate_like_fetch(
    client: TestClient, api_key: IssuedKey, pg_url: str
) -> None:
    job_id = _submit(client, api_key)
    path = f"/api/v1/jobs/{job_id}/events"
    assert client.get(path).status_code == 401
    assert client.get(path, params={"key": "dk_wrong"}).status_code == 401
    from db.repositories.keys import create_key

    with session_scope(pg_url) as session:
        other = create_key(session, "events-other")
    assert client.get(path, params={"key": other.plaintext}).status_code == 404
    with client.stream("GET", path, params={"key": api_key.plaintext}) as answer:
        assert answer.status_code == 200
        assert EventReader(answer.iter_lines()).next()[0] == "queued"


def test_streams_are_bounded_in_number_and_time(settings: Settings, api_key: IssuedKey) -> None:
    none = settings.model_copy(update={"events_max_streams": 0})
    with TestClient(create_app(none)) as client:
        job_id = _submit(client, api_key)
        refused = client.get(f"/api/v1/jobs/{job_id}/events", params={"key": api_key.plaintext})
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
    short = settings.model_copy(update={"events_max_s": 0.3, "events_poll_s": 0.1})
    with TestClient(create_app(short)) as client:
        job_id = _submit(client, api_key)
        started = time.monotonic()
        path = f"/api/v1/jobs/{job_id}/events"
        with client.stream("GET", path, params={"key": api_key.plaintext}) as answer:
            names = [line for line in answer.iter_lines() if line.startswith("event: ")]
        assert names == ["event: queued", "event: timeout"]
        assert time.monotonic() - started < 5


def test_jobs_watch_draws_progress_until_the_end(
    client: TestClient, settings: Settings, api_key: IssuedKey, db: Session
) -> None:
    job_id = _submit(client, api_key)
    env = {**os.environ, "DARKROOM_DATABASE_URL": settings.resolved_database_url}
    command = [sys.executable, "-m", "cli.main", "jobs", "watch", str(job_id)]
    watch = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert "queued: position" in _line(watch)
        jobs.claim_job(db, job_id, lease_s=60, max_attempts=3)
        db.commit()
        assert "step 0/20" in _line(watch)
        jobs.record_progress(db, [job_id], 0.25)
        db.commit()
        assert "step 5/20" in _line(watch)
        outcomes.fail(
            db, settings, db.get_one(Job, job_id), "it broke", reason=FailureReason.REJECTED
        )
        db.commit()
        assert json.loads(_line(watch))["message"] == "it broke"
        assert watch.wait(timeout=10) == 1  # failed
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()


def _line(process: subprocess.Popen[str], timeout: float = 30) -> str:
    """The process's next line of output, within `timeout` seconds."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, "no output in time"
    return process.stdout.readline()


@pytest.mark.slow
@pytest.mark.usefixtures("worker")
def test_a_real_workers_job_streams_its_steps_and_its_outputs(
    settings: Settings, api_key: IssuedKey, image_server: ImageServer
) -> None:
    body = {
        "key": api_key.plaintext,
        "model_id": "tiny",
        "prompt": "a lighthouse",
        "init_image": image_server.url("/red.png"),
        "width": 64,
        "height": 64,
        "num_inference_steps": 8,
        "strength": 1.0,
        "seed": 7,
    }
    with TestClient(create_app(settings)) as client:
        job_id = client.post(f"{E}/img2img", json=body).json()["id"]
        path = f"/api/v1/jobs/{job_id}/events"
        with client.stream("GET", path, params={"key": api_key.plaintext}) as answer:
            events = EventReader(answer.iter_lines())
            seen = [events.next()]
            while seen[-1][0] not in ("success", "failed"):
                seen.append(events.next())
    names = [name for name, _data in seen]
    assert names[-1] == "success", seen[-1]
    assert set(names[:-1]) <= {"queued", "progress"}
    assert all(data["steps"] == 8 for name, data in seen if name == "progress")
    assert seen[-1][1]["output"][0].endswith(".png")
