"""The v7 paths the official CLI calls, in process: what it sends, what it reads back."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from api.app import create_app
from darkroom.settings import Settings
from db.repositories.keys import IssuedKey
from tests.api.test_submit import queued_job_ids

#: What `modelslab generate image-to-image` sends (recorded from modelslab-cli 0.2.2).
CLI_BODY = {
    "init_image": "http://127.0.0.1:9/a.png",
    "model_id": "tiny-sd",
    "prompt": "a red square",
    "strength": 0.7,
}


def test_the_cli_body_with_the_key_only_in_the_key_header_is_queued(
    settings: Settings, api_key: IssuedKey
) -> None:
    with TestClient(create_app(settings)) as client:
        answer = client.post(
            "/api/v7/images/image-to-image", json=CLI_BODY, headers={"key": api_key.plaintext}
        )
        assert answer.status_code == 200, answer.text
        job = answer.json()
        fetched = client.post(
            f"/api/v7/images/fetch/{job['id']}", json={}, headers={"key": api_key.plaintext}
        )

    assert job["status"] == "processing"
    assert isinstance(job["eta"], float | int)
    assert job["fetch_result"] == f"http://127.0.0.1:8000/api/v7/images/fetch/{job['id']}"
    assert len(job["future_links"]) == 1
    assert job["id"] in queued_job_ids(settings)
    assert fetched.status_code == 200
    assert fetched.json()["id"] == job["id"]
    assert fetched.json()["status"] == "processing"
    # The v7 API keeps the prompt as sent (the enterprise page's default rewrites it).
    assert job["meta"]["prompt"] == "a red square"


def test_a_wrong_key_header_is_refused_and_another_keys_job_is_not_found(
    settings: Settings, api_key: IssuedKey
) -> None:
    with TestClient(create_app(settings)) as client:
        refused = client.post(
            "/api/v7/images/image-to-image", json=CLI_BODY, headers={"key": "not-a-key"}
        )
        missing = client.post("/api/v7/images/fetch/999999999", json={"key": api_key.plaintext})
    assert refused.status_code == 401
    assert refused.json() == {"status": "error", "message": "Invalid Api Key"}
    assert missing.status_code == 404


def test_a_rate_limited_submit_says_when_to_retry_as_a_unix_time(
    settings: Settings, api_key: IssuedKey
) -> None:
    limited = settings.model_copy(update={"max_jobs_per_minute_per_key": 1})
    body = {**CLI_BODY, "key": api_key.plaintext}
    with TestClient(create_app(limited)) as client:
        first = client.post("/api/v7/images/image-to-image", json=body)
        second = client.post("/api/v7/images/image-to-image", json=body)
    assert first.status_code == 200
    assert second.status_code == 429
    assert second.json()["retry_after"] == 60
    assert second.headers["retry-after"] == "60"
    reset = int(second.headers["x-ratelimit-reset"])
    assert time.time() + 59 <= reset <= time.time() + 62


def test_idempotency_key_replays_the_first_job(settings: Settings, api_key: IssuedKey) -> None:
    headers = {"key": api_key.plaintext, "Idempotency-Key": "cli-retry-1"}
    with TestClient(create_app(settings)) as client:
        first = client.post("/api/v7/images/image-to-image", json=CLI_BODY, headers=headers)
        again = client.post("/api/v7/images/image-to-image", json=CLI_BODY, headers=headers)
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
