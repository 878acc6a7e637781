"""The submit endpoints against a real Postgres and Redis: shapes, storage, enqueue, errors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from api.app import create_app
from darkroom.identities import Operation
from darkroom.settings import Settings
from db.models import Job, JobState
from db.repositories.keys import IssuedKey
from tests.support.broker import published_ids

MIXER_V5 = {
    "seed": 12345,
    "init_image": "http://127.0.0.1:9/a.png,http://127.0.0.1:9/b.png",
    "prompt": "rose man",
    "negative_prompt": "A polluted city",
    "init_image_weights": "0.5,0.7",
    "width": 800,
    "height": 600,
    "guidance_scale": 10,
    "steps": 100,
    "samples": 1,
}
MIXER_V6 = {
    "seed": 12345,
    "init_image": ["http://127.0.0.1:9/a.png", "http://127.0.0.1:9/b.png"],
    "prompt": "rose man",
    "negative_prompt": "A polluted city",
    "width": 800,
    "height": 600,
    "guidance_scale": 10,
    "steps": 41,
    "samples": 1,
}
PIX2PIX = {
    "init_image": "http://127.0.0.1:9/a.png",
    "prompt": "make him woman",
    "image_guidance_scale": 1,
    "steps": 50,
    "guidance_scale": 7,
}
IMG2IMG = {
    "model_id": "model_id",
    "prompt": "papercraft, quilling, layers, landscape",
    "negative_prompt": None,
    "init_image": "http://127.0.0.1:9/a.png",
    "width": "512",
    "height": "512",
    "samples": "1",
    "num_inference_steps": "20",
    "safety_checker": "yes",
    "enhance_prompt": "yes",
    "guidance_scale": 7.5,
    "strength": 0.7,
    "scheduler": "DDPMScheduler",
    "lora_model": None,
    "tomesd": "yes",
    "use_karras_sigmas": "yes",
    "vae": None,
    "lora_strength": None,
    "embeddings_model": None,
    "seed": None,
    "webhook": None,
    "track_id": None,
}
ENDPOINTS: list[tuple[str, dict[str, Any], Operation, str]] = [
    ("/api/v5/img_mixer", MIXER_V5, Operation.IMG_MIXER, "/api/v5/fetch/"),
    (
        "/api/v6/image_editing/img_mixer",
        MIXER_V6,
        Operation.IMG_MIXER,
        "/api/v6/image_editing/fetch/",
    ),
    ("/api/v5/pix2pix", PIX2PIX, Operation.PIX2PIX, "/api/v5/fetch/"),
    ("/api/v1/enterprise/img2img", IMG2IMG, Operation.IMG2IMG, "/api/v1/enterprise/fetch/"),
]


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def queued_job_ids(settings: Settings) -> list[int]:
    """The job ids waiting in the jobs queue."""
    return published_ids(settings.broker_url, settings.job_queue)


def post(client: TestClient, path: str, key: IssuedKey, body: dict[str, Any]) -> Any:
    return client.post(path, json={"key": key.plaintext, **body})


@pytest.mark.parametrize(("path", "body", "operation", "fetch_path"), ENDPOINTS)
def test_reference_example_is_accepted_stored_and_enqueued(
    client: TestClient,
    settings: Settings,
    api_key: IssuedKey,
    db: Session,
    path: str,
    body: dict[str, Any],
    operation: Operation,
    fetch_path: str,
) -> None:
    response = post(client, path, api_key, body)

    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["status"] == "processing"
    assert isinstance(answer["id"], int)
    assert answer["message"] == answer["messege"]
    assert answer["output"] == []
    assert answer["fetch_result"] == f"{settings.public_url}{fetch_path}{answer['id']}"
    assert len(answer["future_links"]) == 1
    assert isinstance(answer["meta"]["seed"], int)
    job = db.get(Job, answer["id"])
    assert job is not None
    assert job.state == JobState.QUEUED
    assert job.operation == operation
    assert job.enqueued_at is not None
    assert job.params["seed"] == answer["meta"]["seed"]
    assert queued_job_ids(settings) == [answer["id"]]


def test_v5_mixer_example_steps_above_50_run_50_and_say_so(
    client: TestClient, api_key: IssuedKey
) -> None:
    meta = post(client, "/api/v5/img_mixer", api_key, MIXER_V5).json()["meta"]
    assert meta["steps"] == 50
    assert meta["warnings"] == ["steps 100 is above the maximum of 50; 50 were run"]
    assert meta["init_image_weights"] == "0.5,0.7"


def test_lenient_types_are_normalised(client: TestClient, api_key: IssuedKey, db: Session) -> None:
    body = {
        **PIX2PIX,
        "steps": "12",
        "guidance_scale": "7.5",
        "samples": "2",
        "seed": "42",
        "track_id": 77,
        "width": 256.0,
        "height": "128",
    }
    answer = post(client, "/api/v5/pix2pix", api_key, body).json()
    job = db.get(Job, answer["id"])
    assert job is not None
    assert (job.params["steps"], job.params["guidance_scale"], job.params["samples"]) == (
        12,
        7.5,
        2,
    )
    assert (job.params["width"], job.params["height"]) == (256, 128)
    assert answer["meta"]["seeds"] == [42, 43]
    assert answer["track_id"] == 77
    assert len(answer["future_links"]) == 2


def test_bearer_header_authenticates_too(client: TestClient, api_key: IssuedKey) -> None:
    response = client.post(
        "/api/v5/pix2pix", json=PIX2PIX, headers={"authorization": f"Bearer {api_key.plaintext}"}
    )
    assert response.status_code == 200
    assert response.json()["status"] == "processing"


@pytest.mark.parametrize("key", [None, "", "dk_not-a-key", 12])
def test_bad_key_is_refused(client: TestClient, key: object) -> None:
    response = client.post("/api/v5/pix2pix", json={**PIX2PIX, "key": key})
    assert response.status_code == 401
    assert response.json() == {"status": "error", "message": "Invalid Api Key"}


@pytest.mark.parametrize(
    ("path", "change", "field", "message"),
    [
        ("/api/v5/pix2pix", {"prompt": None}, "prompt", "The prompt field is required."),
        (
            "/api/v5/pix2pix",
            {"guidance_scale": 25},
            "guidance_scale",
            "guidance_scale must be between 1 and 20",
        ),
        ("/api/v5/pix2pix", {"steps": 0}, "steps", "steps must be between 1 and 50"),
        ("/api/v5/pix2pix", {"steps": "many"}, "steps", "steps must be a number"),
        ("/api/v5/pix2pix", {"samples": 5}, "samples", "samples must be between 1 and 4"),
        ("/api/v5/pix2pix", {"width": 2048}, "width", "width must be between 64 and 1024"),
        (
            "/api/v5/pix2pix",
            {"init_image": "ftp://x/y.png"},
            "init_image",
            "init_image 'ftp://x/y.png' is not an http or https URL",
        ),
        (
            "/api/v5/pix2pix",
            {"init_image": "data:image/png;base64,iVBORw0KGgo="},
            "init_image",
            "init_image must be an http or https URL: data: URIs and base64 images are not",
        ),
        (
            "/api/v5/img_mixer",
            {"init_image": " DATA:image/png;base64,iVBORw0KGgo=", "init_image_weights": None},
            "init_image",
            "init_image must be an http or https URL: data: URIs",
        ),
        ("/api/v5/pix2pix", {"seed": -1}, "seed", "seed must be between 0 and 4294967295"),
        (
            "/api/v5/pix2pix",
            {"webhook": "not a url"},
            "webhook",
            "webhook 'not a url' is not an http or https URL",
        ),
        (
            "/api/v6/image_editing/img_mixer",
            {"samples": 2},
            "samples",
            "samples must be between 1 and 1",
        ),
        (
            "/api/v5/img_mixer",
            {"init_image_weights": "0.5"},
            "init_image_weights",
            "1 weights for 2 images; give one weight per image",
        ),
        (
            "/api/v5/img_mixer",
            {"init_image_weights": "0.5,-1"},
            "init_image_weights",
            "weights must not be negative",
        ),
        (
            "/api/v5/img_mixer",
            {"init_image": ",".join(["http://127.0.0.1:9/a.png"] * 5), "init_image_weights": None},
            "init_image",
            "at most 4 images can be mixed",
        ),
        (
            "/api/v1/enterprise/img2img",
            {"strength": 1.5},
            "strength",
            "strength must be between 0 and 1",
        ),
        (
            "/api/v1/enterprise/img2img",
            {"scheduler": "DDIMInverseScheduler"},
            "scheduler",
            "DDIMInverseScheduler cannot run image to image",
        ),
        ("/api/v1/enterprise/img2img", {"scheduler": "Nope"}, "scheduler", "unknown scheduler"),
    ],
)
def test_invalid_fields_get_the_reference_error_shape(
    client: TestClient,
    api_key: IssuedKey,
    settings: Settings,
    path: str,
    change: dict[str, Any],
    field: str,
    message: str,
) -> None:
    base = {p: b for p, b, _, _ in ENDPOINTS}[path]
    response = post(client, path, api_key, {**base, **change})

    assert response.status_code == 422, response.text
    answer = response.json()
    assert answer["status"] == "error"
    assert list(answer["message"]) == [field]
    assert answer["message"][field][0].startswith(message)
    assert queued_job_ids(settings) == []


def test_body_that_is_not_json_is_a_400(client: TestClient) -> None:
    response = client.post(
        "/api/v5/pix2pix", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json() == {"status": "error", "message": "The request body is not valid JSON."}


def test_body_that_is_not_an_object_is_a_400(client: TestClient) -> None:
    response = client.post("/api/v5/pix2pix", json=[1, 2])
    assert response.status_code == 400
    assert response.json()["message"] == "The request body must be a JSON object."


def test_unknown_fields_are_ignored(client: TestClient, api_key: IssuedKey) -> None:
    response = post(client, "/api/v5/pix2pix", api_key, {**PIX2PIX, "surprise": {"x": 1}})
    assert response.status_code == 200


def test_broker_down_still_accepts_into_the_outbox(
    settings: Settings, api_key: IssuedKey, db: Session
) -> None:
    unreachable = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(unreachable)) as down_client:
        response = post(down_client, "/api/v5/pix2pix", api_key, PIX2PIX)

    assert response.status_code == 200
    job = db.get(Job, response.json()["id"])
    assert job is not None
    assert job.state == JobState.QUEUED
    assert job.enqueued_at is None  # the sweeper will publish it


def test_health(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}


def test_oversized_body_is_a_413(client: TestClient) -> None:
    from api.deps import MAX_BODY_BYTES

    response = client.post(
        "/api/v5/pix2pix",
        content=b" " * (MAX_BODY_BYTES + 1),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413
    assert response.json()["status"] == "error"
