"""The operators' dashboard API: off without a token, guarded by it, and what it shows."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from api.app import create_app
from darkroom.identities import FailureReason, Operation
from darkroom.jobspec import JobSpec
from darkroom.settings import Settings
from darkroom.storage import make_storage
from db.models import Job
from db.repositories import jobs
from db.repositories.keys import IssuedKey, create_key
from db.session import session_scope
from services import outcomes
from tests.support.rows import queued_job
from tests.support.servers import ImageServer, WebhookReceiver, png
from worker.webhooks.dispatcher import deliver

TOKEN = "0f3c9a6e1b7d4c28a5e9f1036b2d7c4e"
BEARER = {"authorization": f"Bearer {TOKEN}"}
INLINE_IMAGE = "data:image/png;base64," + "A" * 1000


@pytest.fixture
def board(settings: Settings, own_pg_url: str) -> Settings:
    """Settings with the dashboard on, on a database of this test's own (it counts every row)."""
    return settings.model_copy(update={"admin_token": TOKEN, "database_url": own_pg_url})


@pytest.fixture
def client(board: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(board)) as test_client:
        yield test_client


def new_job(
    board: Settings, key_id: int, operation: Operation, hook: str | None = None, **fields: object
) -> int:
    spec = JobSpec.model_validate(
        {
            "operation": operation,
            "prompt": "a lighthouse",
            "init_images": ["http://127.0.0.1:9/in.png"],
            "steps": 2,
            "guidance_scale": 7.0,
            "seed": 5,
            **fields,
        }
    )
    return queued_job(board, key_id, spec=spec, webhook=hook)


def owner(board: Settings) -> IssuedKey:
    with session_scope(board.resolved_database_url) as session:
        return create_key(session, "dashboard")


@pytest.mark.parametrize("path", ["/dashboard", "/dashboard/dashboard.js", "/admin/api/queue"])
def test_everything_is_off_without_a_token(settings: Settings, path: str) -> None:
    with TestClient(create_app(settings)) as plain:
        answer = plain.get(path, headers=BEARER)
    assert answer.status_code == 404


@pytest.mark.parametrize(
    "token",
    [
        "changeme",
        "x" * 40,
        "admin-admin-admin-admin-1",
        "0123456789abcdef0123",
        "CHANGETHIS-9f8e7d6c5b4a39",
    ],
)
def test_weak_or_placeholder_tokens_are_refused(token: str) -> None:
    with pytest.raises(ValidationError, match="DARKROOM_ADMIN_TOKEN is too weak"):
        Settings(admin_token=token)


def test_the_api_needs_the_token_and_is_never_cached(client: TestClient) -> None:
    assert client.get("/admin/api/queue").status_code == 401
    wrong = {"authorization": "Bearer " + TOKEN[:-1] + "1"}
    assert client.get("/admin/api/jobs", headers=wrong).status_code == 401
    assert client.get("/admin/api/queue", params={"token": TOKEN}).status_code == 401
    answer = client.get("/admin/api/queue", headers=BEARER)
    assert answer.status_code == 200
    assert answer.headers["cache-control"] == "no-store"


def test_the_page_and_its_assets_are_served_with_a_strict_policy(client: TestClient) -> None:
    page = client.get("/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<script src="/dashboard/dashboard.js"' in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy
    assert "connect-src 'self'" in policy
    assert page.headers["referrer-policy"] == "no-referrer"
    script = client.get("/dashboard/dashboard.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert "innerHTML" not in script.text  # client-supplied fields are set as text only
    assert client.get("/dashboard/dashboard.css").status_code == 200
    assert client.get("/dashboard/..%2Fapp.py").status_code == 404
    assert client.get("/dashboard/secret.txt").status_code == 404


def test_the_queue_counts_jobs_by_operation_and_state(client: TestClient, board: Settings) -> None:
    key = owner(board).row.id
    new_job(board, key, Operation.PIX2PIX)
    new_job(board, key, Operation.PIX2PIX)
    failed = new_job(board, key, Operation.IMG2IMG, hook="http://127.0.0.1:9/hook")
    stuck = new_job(board, key, Operation.IMG2IMG)
    with session_scope(board.resolved_database_url) as session:
        jobs.claim_job(session, stuck, lease_s=-1, max_attempts=3)
        job = jobs.get_job(session, failed)
        assert job is not None
        outcomes.fail(session, board, job, "boom", reason=FailureReason.REJECTED)

    queue = client.get("/admin/api/queue", headers=BEARER).json()

    assert queue["by_state"] == {"queued": 2, "processing": 1, "success": 0, "failed": 1}
    by_operation = {row["operation"]: row for row in queue["by_operation"]}
    assert by_operation["pix2pix"]["queued"] == 2
    assert (by_operation["img2img"]["processing"], by_operation["img2img"]["failed"]) == (1, 1)
    assert queue["expired_leases"] == 1
    assert queue["webhooks"] == {"pending": 1, "delivered": 0, "failed": 0}
    assert queue["oldest_queued_age_s"] >= 0


def test_recent_jobs_link_thumbnails_without_fetching_inputs(
    client: TestClient, board: Settings, image_server: ImageServer
) -> None:
    key = owner(board)
    red = image_server.url("/red.png")
    done = new_job(board, key.row.id, Operation.IMG_MIXER, init_images=[red, INLINE_IMAGE])
    queued = new_job(board, key.row.id, Operation.PIX2PIX)
    filename = _succeed(board, done)
    seen_before = list(image_server.requests)

    listed = client.get("/admin/api/jobs", headers=BEARER).json()["jobs"]

    assert [row["id"] for row in listed] == [queued, done]
    row = listed[1]
    assert row["inputs"] == [{"kind": "url", "url": red}, {"kind": "inline", "chars": 1022}]
    assert row["outputs"][0]["url"] == f"/admin/api/outputs/{filename}"
    assert row["key"]["prefix"] == key.row.key_prefix
    assert image_server.requests == seen_before  # the server never fetched an input
    only = client.get(
        "/admin/api/jobs", headers=BEARER, params={"state": "success", "key": key.row.key_prefix}
    )
    assert [row["id"] for row in only.json()["jobs"]] == [done]
    assert client.get("/admin/api/jobs", headers=BEARER, params={"key": "nobody"}).json() == {
        "jobs": []
    }
    assert (
        client.get("/admin/api/jobs", headers=BEARER, params={"state": "lost"}).status_code == 422
    )

    image = client.get(row["outputs"][0]["url"], headers=BEARER)
    assert image.status_code == 200
    assert image.content == png(8, 8, (1, 2, 3))
    assert client.get(row["outputs"][0]["url"]).status_code == 401
    assert (
        client.get("/admin/api/outputs/" + "0" * 32 + "-0.png", headers=BEARER).status_code == 404
    )


def test_a_job_shows_its_timeline_and_webhook_attempts(
    client: TestClient, board: Settings, receiver: WebhookReceiver
) -> None:
    job_id = new_job(board, owner(board).row.id, Operation.PIX2PIX, hook=receiver.url)
    with session_scope(board.resolved_database_url) as session:
        jobs.claim_job(session, job_id, lease_s=60, max_attempts=3)
        job = jobs.get_job(session, job_id)
        assert job is not None
        delivery_id = outcomes.fail(
            session, board, job, "The image could not be generated.", reason=FailureReason.REJECTED
        )
    assert delivery_id is not None
    receiver.respond = lambda _r: (503, {})
    deliver(delivery_id, board)

    detail = client.get(f"/admin/api/jobs/{job_id}", headers=BEARER).json()

    events = [(event["event"], event["detail"]) for event in detail["timeline"]]
    assert [name for name, _ in events] == [
        "created",
        "started",
        "finished",
        "webhook_queued",
        "webhook_attempt",
        "webhook_retry_due",
    ]
    assert events[2][1] == "failed: The image could not be generated."
    assert events[4][1].startswith("#1: HTTP 503 in ")
    [attempt] = detail["webhook"]["attempts"]
    assert (attempt["status_code"], attempt["response_excerpt"]) == (503, "ok")
    assert detail["params"]["prompt"] == "a lighthouse"
    assert client.get("/admin/api/jobs/999999", headers=BEARER).status_code == 404


def _succeed(board: Settings, job_id: int) -> str:
    """Record a success with one stored output, as a worker does; the output's file name."""
    with session_scope(board.resolved_database_url) as session:
        jobs.claim_job(session, job_id, lease_s=60, max_attempts=3)
        job = session.get(Job, job_id)
        assert job is not None
        filename = f"{job.file_prefix}-0.png"
        make_storage(board).save(filename, png(8, 8, (1, 2, 3)))
        output = jobs.OutputRecord(0, filename, 8, 8, 5)
        outcomes.succeed(session, board, job, outputs=[output], meta={}, generation_time=0.5)
    return filename
