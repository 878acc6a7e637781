"""Fetch by id and output downloads: each state's shape, and isolation between keys."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from api.app import create_app
from api.routes.fetch import BASE64_BUILDS, BASE64_BUILDS_AT_ONCE
from darkroom.identities import Operation
from darkroom.settings import Settings
from db.repositories import jobs
from db.repositories.keys import IssuedKey, create_key
from tests.api.test_submit import IMG2IMG, PIX2PIX, post

FETCH_PATHS = [
    "/api/v6/image_editing/fetch/{id}",
    "/api/v5/fetch/{id}",
    "/api/v3/fetch/{id}",
    "/api/v1/enterprise/fetch/{id}",
]


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def submit_pix2pix(client: TestClient, key: IssuedKey) -> int:
    job_id: int = post(client, "/api/v5/pix2pix", key, PIX2PIX).json()["id"]
    return job_id


def finish_with_output(db: Session, settings: Settings, job_id: int) -> str:
    """Play the worker's part for one job: claim it, write a file, record success."""
    outcome, job = jobs.claim_job(db, job_id, lease_s=60, max_attempts=3)
    assert outcome == jobs.ClaimOutcome.CLAIMED
    assert job is not None
    name = f"{job.file_prefix}-0.png"
    settings.outputs_dir.mkdir(parents=True, exist_ok=True)
    (settings.outputs_dir / name).write_bytes(b"\x89PNG fake but served as is")
    meta = {**job.meta, "W": 64, "H": 64}
    assert jobs.complete_job(
        db, job_id, outputs=[jobs.OutputRecord(0, name, 64, 64, 7)], meta=meta, generation_time=1.5
    )
    db.commit()
    return name


@pytest.mark.parametrize("path", FETCH_PATHS)
def test_queued_job_fetches_as_processing(
    client: TestClient, api_key: IssuedKey, path: str
) -> None:
    job_id = submit_pix2pix(client, api_key)
    answer = client.post(path.format(id=job_id), json={"key": api_key.plaintext}).json()
    assert answer["status"] == "processing"
    assert answer["id"] == job_id
    assert answer["output"] == []


def test_enterprise_fetch_takes_request_id_in_the_body(
    client: TestClient, api_key: IssuedKey
) -> None:
    job_id = submit_pix2pix(client, api_key)
    response = client.post(
        "/api/v1/enterprise/fetch", json={"key": api_key.plaintext, "request_id": str(job_id)}
    )
    assert response.json()["id"] == job_id
    missing = client.post("/api/v1/enterprise/fetch", json={"key": api_key.plaintext})
    assert missing.status_code == 422
    assert missing.json()["message"] == {"request_id": ["The request_id field is required."]}


def test_success_shape_and_the_output_is_served(
    client: TestClient, api_key: IssuedKey, db: Session, settings: Settings
) -> None:
    job_id = submit_pix2pix(client, api_key)
    name = finish_with_output(db, settings, job_id)

    answer = client.post(f"/api/v5/fetch/{job_id}", json={"key": api_key.plaintext}).json()

    url = f"{settings.public_url}/outputs/{name}"
    assert answer["status"] == "success"
    assert answer["generationTime"] == 1.5
    assert answer["output"] == url  # pix2pix: a plain string, as on the reference page
    assert answer["proxy_links"] == [url]
    assert answer["meta"]["W"] == 64
    download = client.get(f"/outputs/{name}")
    assert download.status_code == 200
    assert download.headers["content-type"] == "image/png"
    assert download.content == b"\x89PNG fake but served as is"


def test_failed_shape(client: TestClient, api_key: IssuedKey, db: Session) -> None:
    job_id = submit_pix2pix(client, api_key)
    assert jobs.fail_job(db, job_id, "Unable to fetch image from provided URL")
    db.commit()

    answer = client.post(f"/api/v5/fetch/{job_id}", json={"key": api_key.plaintext}).json()

    assert answer == {
        "status": "failed",
        "id": job_id,
        "message": "Unable to fetch image from provided URL",
        "messege": "Unable to fetch image from provided URL",
        "track_id": None,
    }


def test_another_keys_job_answers_exactly_like_a_missing_one(
    client: TestClient, api_key: IssuedKey, db: Session
) -> None:
    job_id = submit_pix2pix(client, api_key)
    other = create_key(db, "other")
    db.commit()

    theirs = client.post(f"/api/v5/fetch/{job_id}", json={"key": other.plaintext})
    missing = client.post("/api/v5/fetch/999999999", json={"key": other.plaintext})

    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["message"] == f"No request with id {job_id}."
    assert missing.json()["message"] == "No request with id 999999999."


@pytest.mark.parametrize("name", ["../etc/passwd", "nothere.png", "0" * 32 + "-0.png"])
def test_unknown_output_names_are_404(client: TestClient, name: str) -> None:
    assert client.get(f"/outputs/{name}").status_code == 404


def test_fetch_needs_a_key(client: TestClient, api_key: IssuedKey) -> None:
    job_id = submit_pix2pix(client, api_key)
    response = client.post(f"/api/v5/fetch/{job_id}", json={})
    assert response.status_code == 401


def test_operation_is_recorded(client: TestClient, api_key: IssuedKey, db: Session) -> None:
    job = jobs.get_job(db, submit_pix2pix(client, api_key))
    assert job is not None
    assert job.operation == Operation.PIX2PIX


def test_key_mode_downloads_only_with_the_owning_key(
    settings: Settings, api_key: IssuedKey, db: Session
) -> None:
    private = settings.model_copy(update={"output_access": "key"})
    with TestClient(create_app(private)) as client:
        job_id = submit_pix2pix(client, api_key)
        name = finish_with_output(db, private, job_id)
        other = create_key(db, "stranger")
        db.commit()

        anonymous = client.get(f"/outputs/{name}")
        stranger = client.get(
            f"/outputs/{name}", headers={"authorization": f"Bearer {other.plaintext}"}
        )
        owner = client.get(
            f"/outputs/{name}", headers={"authorization": f"Bearer {api_key.plaintext}"}
        )
        by_query = client.get(f"/outputs/{name}", params={"key": api_key.plaintext})

    assert anonymous.status_code == stranger.status_code == 404
    assert anonymous.json() == stranger.json() == {"status": "error", "message": "No such output."}
    assert owner.status_code == by_query.status_code == 200


def test_base64_answers_built_at_once_are_bounded(
    client: TestClient, api_key: IssuedKey, db: Session, settings: Settings
) -> None:
    """While BASE64_BUILDS_AT_ONCE fetches build `base64: yes` answers (held here as if they
    were), another such fetch is told 503 + Retry-After once it has waited its turn; a fetch
    of a job with linked outputs never waits; with a turn free it is answered inline."""
    body = {**IMG2IMG, "base64": "yes", "init_image": "http://127.0.0.1:9/x.png"}
    inline = post(client, "/api/v1/enterprise/img2img", api_key, body).json()["id"]
    finish_with_output(db, settings, inline)
    linked = submit_pix2pix(client, api_key)
    finish_with_output(db, settings, linked)
    fetch = "/api/v1/enterprise/fetch/{}"
    held = [BASE64_BUILDS.acquire(timeout=1) for _ in range(BASE64_BUILDS_AT_ONCE)]
    try:
        assert all(held)
        busy = client.post(fetch.format(inline), json={"key": api_key.plaintext})
        assert busy.status_code == 503, busy.text
        assert busy.headers["retry-after"] == "1"
        assert busy.json()["status"] == "error"
        assert post(client, fetch.format(linked), api_key, {}).json()["status"] == "success"
    finally:
        for _ in held:
            BASE64_BUILDS.release()
    answer = client.post(fetch.format(inline), json={"key": api_key.plaintext}).json()
    assert answer["status"] == "success"
    assert base64.b64decode(answer["output"][0]) == b"\x89PNG fake but served as is"
