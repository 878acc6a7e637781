"""Cancel through the API: a queued job fails at once; finished jobs cannot be canceled."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from api.app import create_app
from darkroom.settings import Settings
from db.models import Job, JobState
from db.repositories import jobs, webhooks
from db.repositories.keys import IssuedKey, create_key
from services.outcomes import CANCELED_MESSAGE
from tests.api.test_submit import PIX2PIX, post


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_a_queued_job_is_failed_with_a_cancel_message_and_its_webhook(
    client: TestClient, api_key: IssuedKey, db: Session
) -> None:
    body = {**PIX2PIX, "webhook": "http://127.0.0.1:9/hook", "track_id": "t-1"}
    job_id = post(client, "/api/v5/pix2pix", api_key, body).json()["id"]

    answer = client.post(f"/api/v1/jobs/{job_id}/cancel", json={"key": api_key.plaintext})

    assert answer.status_code == 200
    assert answer.json()["status"] == "failed"
    assert answer.json()["message"] == CANCELED_MESSAGE
    job = db.get(Job, job_id)
    assert job is not None
    assert job.state == JobState.FAILED
    delivery = webhooks.get_delivery_for_job(db, job_id)
    assert delivery is not None
    assert json.loads(delivery.payload) == {
        "status": "failed",
        "id": job_id,
        "message": CANCELED_MESSAGE,
        "messege": CANCELED_MESSAGE,
        "track_id": "t-1",
    }
    again = client.post(f"/api/v1/jobs/{job_id}/cancel", json={"key": api_key.plaintext})
    assert again.status_code == 409


def test_a_running_job_is_asked_to_stop(
    client: TestClient, api_key: IssuedKey, db: Session
) -> None:
    job_id = post(client, "/api/v5/pix2pix", api_key, PIX2PIX).json()["id"]
    outcome, _ = jobs.claim_job(db, job_id, lease_s=60, max_attempts=3)
    assert outcome == jobs.ClaimOutcome.CLAIMED
    db.commit()

    answer = client.post(f"/api/v1/jobs/{job_id}/cancel", json={"key": api_key.plaintext})

    assert answer.json()["status"] == "processing"
    assert answer.json()["cancel_requested"] is True
    db.expire_all()
    assert jobs.cancel_requested(db, job_id)


def test_another_keys_job_cannot_be_canceled(
    client: TestClient, api_key: IssuedKey, db: Session
) -> None:
    job_id = post(client, "/api/v5/pix2pix", api_key, PIX2PIX).json()["id"]
    other = create_key(db, "other")
    db.commit()
    answer = client.post(f"/api/v1/jobs/{job_id}/cancel", json={"key": other.plaintext})
    assert answer.status_code == 404
    job = db.get(Job, job_id)
    assert job is not None
    assert job.state == JobState.QUEUED
