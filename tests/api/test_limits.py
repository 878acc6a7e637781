"""Admission control and unavailable dependencies, answered in the error shape."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from api.app import create_app
from darkroom.settings import Settings
from db.repositories import jobs
from db.repositories.keys import IssuedKey
from tests.api.test_submit import PIX2PIX, post, queued_job_ids


def test_too_many_active_jobs_per_key_is_a_429(settings: Settings, api_key: IssuedKey) -> None:
    limited = settings.model_copy(update={"max_active_jobs_per_key": 2})
    with TestClient(create_app(limited)) as client:
        answers = [post(client, "/api/v5/pix2pix", api_key, PIX2PIX) for _ in range(3)]

    assert [a.status_code for a in answers] == [200, 200, 429]
    refused = answers[2]
    assert refused.json() == {
        "status": "error",
        "message": "Too many queued jobs: at most 2 per key at once.",
        "retry_after": 10,
    }
    assert refused.headers["retry-after"] == "10"
    assert len(queued_job_ids(settings)) == 2  # the refused one was never queued


def test_rate_limit_per_key(settings: Settings, api_key: IssuedKey) -> None:
    limited = settings.model_copy(update={"max_jobs_per_minute_per_key": 1})
    with TestClient(create_app(limited)) as client:
        first = post(client, "/api/v5/pix2pix", api_key, PIX2PIX)
        second = post(client, "/api/v5/pix2pix", api_key, PIX2PIX)
    assert first.status_code == 200
    assert second.status_code == 429
    assert second.json()["retry_after"] == 60


def test_global_backpressure_is_a_503(settings: Settings, api_key: IssuedKey, db: Session) -> None:
    depth = jobs.queued_jobs(db) + 1
    limited = settings.model_copy(update={"max_queue_depth": depth})
    with TestClient(create_app(limited)) as client:
        first = post(client, "/api/v5/pix2pix", api_key, PIX2PIX)
        second = post(client, "/api/v5/pix2pix", api_key, PIX2PIX)
    assert first.status_code == 200
    assert second.status_code == 503
    assert second.json()["message"] == "The service is at capacity; try again shortly."


def test_database_down_is_a_clear_503(settings: Settings, api_key: IssuedKey) -> None:
    down = settings.model_copy(
        update={"database_url": "postgresql+psycopg://postgres@127.0.0.1:1/nowhere"}
    )
    with TestClient(create_app(down), raise_server_exceptions=False) as client:
        response = post(client, "/api/v5/pix2pix", api_key, PIX2PIX)
    assert response.status_code == 503
    assert response.json() == {
        "status": "error",
        "message": "Service temporarily unavailable: the database cannot be reached.",
    }
    assert "Traceback" not in response.text
