"""Idempotent submits: the same API key, Idempotency-Key and body answer one job, however often
and however concurrently they are sent; another body is refused; keys are scoped per API key
and expire after 24 hours. Against the real app, Postgres and Redis (and once SQLite)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, inspect, select, update

from api.app import create_app
from api.routes.submit import MAX_IDEMPOTENCY_KEY, ROUTES
from api.submission import IDEMPOTENCY_MISMATCH
from api.waiting import listen_conninfo
from darkroom.settings import Settings
from db.migrate import alembic_config, upgrade_to_head
from db.models import IdempotencyKey, Job, utcnow
from db.repositories import idempotency
from db.repositories.keys import IssuedKey, create_key
from db.session import session_scope
from tests.api.test_compat import ALIASES
from tests.api.test_group_isolation import in_one_group, jobs_locked, wait_until
from tests.api.test_submit import ENDPOINTS, PIX2PIX, queued_job_ids
from tests.api.test_sync_wait import finish_job
from tests.conftest import count_rows
from tests.support.servers import WebhookReceiver


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def submit(
    client: TestClient,
    key: IssuedKey,
    idempotency_key: str | None,
    body: dict[str, Any] | None = None,
    path: str = "/api/v5/pix2pix",
    **headers: str,
) -> Any:
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return client.post(path, json={"key": key.plaintext, **(body or PIX2PIX)}, headers=headers)


def jobs_of(settings: Settings, key: IssuedKey) -> int:
    with session_scope(settings.resolved_database_url) as session:
        return count_rows(session, "jobs", f"api_key_id = {key.row.id}")


def new_key() -> str:
    return f"order-{uuid.uuid4()}"


def test_a_retry_answers_the_same_job_and_creates_nothing(
    client: TestClient, settings: Settings, api_key: IssuedKey, receiver: WebhookReceiver
) -> None:
    body = {**PIX2PIX, "webhook": receiver.url, "track_id": "t-1"}
    first = submit(client, api_key, "order-1", body)
    again = submit(client, api_key, "order-1", body)

    assert first.status_code == again.status_code == 200, again.text
    job_id = first.json()["id"]
    assert again.json()["id"] == job_id
    assert again.json()["status"] == "processing"
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert jobs_of(settings, api_key) == 1
    assert queued_job_ids(settings) == [job_id]  # published once

    finish_job(settings, job_id)
    after = submit(client, api_key, "order-1", body)

    assert after.status_code == 200
    assert after.json()["id"] == job_id
    assert after.json()["status"] == "success"  # the job's current shape, as a fetch answers
    assert after.json()["output"] == submit_fetch(client, api_key, job_id)["output"]
    assert jobs_of(settings, api_key) == 1
    with session_scope(settings.resolved_database_url) as session:
        assert count_rows(session, "webhook_deliveries", f"job_id = {job_id}") == 1


def submit_fetch(client: TestClient, key: IssuedKey, job_id: int) -> Any:
    return client.post(f"/api/v5/fetch/{job_id}", json={"key": key.plaintext}).json()


def test_a_replay_with_a_sync_wait_answers_the_outcome_at_once(
    client: TestClient, settings: Settings, api_key: IssuedKey
) -> None:
    job_id = submit(client, api_key, "wait-1").json()["id"]
    finish_job(settings, job_id, failure="The job failed: out of memory.")

    replay = submit(client, api_key, "wait-1", Prefer="wait=20")

    assert replay.json()["id"] == job_id
    assert replay.json()["status"] == "failed"
    assert replay.headers["Preference-Applied"] == "wait=20"


def test_the_same_key_with_another_body_is_refused(
    client: TestClient, settings: Settings, api_key: IssuedKey
) -> None:
    first = submit(client, api_key, "order-2")
    other = submit(client, api_key, "order-2", {**PIX2PIX, "prompt": "make him a cat"})
    elsewhere = submit(client, api_key, "order-2", path="/api/v6/image_editing/pix2pix")

    assert first.status_code == 200
    for refused in (other, elsewhere):
        assert refused.status_code == 422
        assert refused.json() == {"status": "error", "message": IDEMPOTENCY_MISMATCH}
    assert jobs_of(settings, api_key) == 1


def test_the_credentials_and_the_wait_do_not_make_another_request(
    client: TestClient, api_key: IssuedKey
) -> None:
    first = submit(client, api_key, "order-3")
    by_header = client.post(
        "/api/v5/pix2pix",
        json={**PIX2PIX, "wait": 0},
        headers={"Authorization": f"Bearer {api_key.plaintext}", "Idempotency-Key": "order-3"},
    )

    assert by_header.status_code == 200, by_header.text
    assert by_header.json()["id"] == first.json()["id"]


def test_keys_are_scoped_per_api_key(
    client: TestClient, settings: Settings, api_key: IssuedKey
) -> None:
    with session_scope(settings.resolved_database_url) as session:
        other_tenant = create_key(session, "other tenant")
    mine = submit(client, api_key, "shared-key").json()["id"]
    theirs = submit(client, other_tenant, "shared-key", {**PIX2PIX, "prompt": "another"})

    assert theirs.status_code == 200  # another body is fine: it is not the same key's request
    assert theirs.json()["id"] != mine
    assert "Idempotent-Replayed" not in theirs.headers
    assert submit(client, api_key, "shared-key").json()["id"] == mine
    assert (
        submit(client, other_tenant, "shared-key", {**PIX2PIX, "prompt": "another"}).json()["id"]
        == theirs.json()["id"]
    )


def test_concurrent_duplicates_in_one_group_make_one_job(
    client: TestClient, settings: Settings, api_key: IssuedKey
) -> None:
    """Eight copies of one request and eight other requests, all stored in one group commit."""
    intake = client.app.state.intake  # type: ignore[attr-defined]
    copies = [partial(submit, client, api_key, "dup-1") for _ in range(8)]
    others = [partial(submit, client, api_key, new_key()) for _ in range(8)]

    _, answers = in_one_group(
        settings.resolved_database_url,
        intake,
        partial(submit, client, api_key, None),
        [call for pair in zip(copies, others, strict=True) for call in pair],
    )

    assert [answer.status_code for answer in answers] == [200] * 16
    copy_ids = {answer.json()["id"] for answer in answers[0::2]}
    other_ids = {answer.json()["id"] for answer in answers[1::2]}
    assert len(copy_ids) == 1
    assert len(other_ids) == 8
    assert jobs_of(settings, api_key) == 1 + 1 + 8  # the group's first, one copy, the others
    with session_scope(settings.resolved_database_url) as session:
        assert count_rows(session, "idempotency_keys", "key = 'dup-1'") == 1


def test_concurrent_duplicates_across_groups_make_one_job(
    client: TestClient, settings: Settings, api_key: IssuedKey
) -> None:
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: submit(client, api_key, "dup-2"), range(12)))

    assert {answer.status_code for answer in answers} == {200}
    assert len({answer.json()["id"] for answer in answers}) == 1
    assert jobs_of(settings, api_key) == 1


def test_two_api_processes_storing_the_same_key_at_once_make_one_job(
    settings: Settings, api_key: IssuedKey
) -> None:
    """Two apps (as two replicas would) each hold the same request at its INSERT, then both go:
    the second's Idempotency-Key waits for the first's commit, and then answers its job."""
    url = settings.resolved_database_url
    with (
        TestClient(create_app(settings)) as one,
        TestClient(create_app(settings)) as two,
        ThreadPoolExecutor(2) as pool,
    ):
        with jobs_locked(url) as blocked:
            answers = [pool.submit(submit, client, api_key, "replicas-1") for client in (one, two)]
            wait_until(lambda: blocked() == 2)
        first, second = (answer.result(timeout=30) for answer in answers)

    assert (first.status_code, second.status_code) == (200, 200), second.text
    assert first.json()["id"] == second.json()["id"]
    assert jobs_of(settings, api_key) == 1


def test_a_submit_answered_503_was_not_stored_and_its_retry_makes_one_job(
    client: TestClient, settings: Settings, api_key: IssuedKey
) -> None:
    """The database connection is lost while the group waits at its INSERT: 503, nothing kept."""
    url = settings.resolved_database_url
    conninfo = listen_conninfo(url)
    assert conninfo is not None
    with ThreadPoolExecutor(1) as pool, jobs_locked(url) as blocked:
        lost = pool.submit(submit, client, api_key, "lost-1")
        wait_until(lambda: blocked() == 1)
        with psycopg.connect(conninfo, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks"
                " WHERE relation = 'jobs'::regclass AND NOT granted"
            )
        answer = lost.result(timeout=30)

    assert answer.status_code == 503
    assert answer.json()["status"] == "error"
    assert jobs_of(settings, api_key) == 0
    retried = submit(client, api_key, "lost-1")
    assert retried.status_code == 200
    assert submit(client, api_key, "lost-1").json()["id"] == retried.json()["id"]
    assert jobs_of(settings, api_key) == 1


def test_a_replay_is_not_refused_by_the_limits(settings: Settings, api_key: IssuedKey) -> None:
    limited = settings.model_copy(update={"max_active_jobs_per_key": 1})
    with TestClient(create_app(limited)) as client:
        first = submit(client, api_key, "order-4")
        replay = submit(client, api_key, "order-4")
        fresh = submit(client, api_key, "order-5")

    assert (first.status_code, replay.status_code, fresh.status_code) == (200, 200, 429)
    assert replay.json()["id"] == first.json()["id"]


def test_after_24_hours_the_key_names_a_new_request(
    client: TestClient, settings: Settings, api_key: IssuedKey
) -> None:
    first = submit(client, api_key, "order-6").json()["id"]
    age(settings, "order-6", timedelta(hours=23, minutes=59))
    assert submit(client, api_key, "order-6").json()["id"] == first  # still within the window

    age(settings, "order-6", timedelta(hours=24, seconds=1))
    renewed = submit(client, api_key, "order-6", {**PIX2PIX, "prompt": "a new request"})

    assert renewed.status_code == 200, renewed.text
    assert renewed.json()["id"] != first
    assert (
        submit(client, api_key, "order-6", {**PIX2PIX, "prompt": "a new request"}).json()["id"]
        == renewed.json()["id"]
    )
    with session_scope(settings.resolved_database_url) as session:
        assert count_rows(session, "idempotency_keys", "key = 'order-6'") == 1


def test_the_sweeper_function_deletes_only_expired_records(
    client: TestClient, settings: Settings, api_key: IssuedKey
) -> None:
    for name in ("sweep-old", "sweep-new"):
        assert submit(client, api_key, name).status_code == 200
    age(settings, "sweep-old", timedelta(hours=25))

    with session_scope(settings.resolved_database_url) as session:
        deleted = idempotency.delete_expired(session)
        left = set(
            session.scalars(select(IdempotencyKey.key).where(IdempotencyKey.key.like("sweep-%")))
        )

    assert deleted >= 1
    assert left == {"sweep-new"}


def age(settings: Settings, key: str, by: timedelta) -> None:
    """Make the record of `key` look `by` old."""
    with session_scope(settings.resolved_database_url) as session:
        session.execute(
            update(IdempotencyKey).where(IdempotencyKey.key == key).values(created_at=utcnow() - by)
        )


@pytest.mark.parametrize(
    "value",
    ["", "   ", "x" * (MAX_IDEMPOTENCY_KEY + 1), "caf\u00e9", "tab\there"],
    ids=["empty", "blank", "too-long", "non-ascii", "control"],
)
def test_bad_header_values_are_refused_clearly(
    client: TestClient, settings: Settings, api_key: IssuedKey, value: str
) -> None:
    answer = client.post(
        "/api/v5/pix2pix",
        json={"key": api_key.plaintext, **PIX2PIX},
        headers=[(b"Idempotency-Key", value.encode("latin-1"))],
    )

    assert answer.status_code == 400
    assert answer.json()["status"] == "error"
    assert "Idempotency-Key" in answer.json()["message"]
    assert jobs_of(settings, api_key) == 0


def test_the_longest_key_is_accepted(client: TestClient, api_key: IssuedKey) -> None:
    longest = "k" * MAX_IDEMPOTENCY_KEY
    first = submit(client, api_key, longest)
    assert first.status_code == 200
    assert submit(client, api_key, longest).json()["id"] == first.json()["id"]


EVERY_ROUTE = [(path, body) for path, body, _operation, _fetch in (*ENDPOINTS, *ALIASES)]


def test_every_submit_path_is_covered() -> None:
    assert {path for path, _ in EVERY_ROUTE} == {route.path for route in ROUTES}


@pytest.mark.parametrize(("path", "body"), EVERY_ROUTE)
def test_every_submit_path_is_idempotent(
    client: TestClient, settings: Settings, api_key: IssuedKey, path: str, body: dict[str, Any]
) -> None:
    first = submit(client, api_key, "route", body, path)
    again = submit(client, api_key, "route", body, path)

    assert first.status_code == again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["fetch_result"] == first.json()["fetch_result"]
    assert jobs_of(settings, api_key) == 1


def test_the_migration_matches_the_model_and_downgrades(tmp_path: Path, pg_url: str) -> None:
    sqlite_url = f"sqlite:///{tmp_path / 'migrated.sqlite3'}"
    upgrade_to_head(sqlite_url)
    expected = set(IdempotencyKey.__table__.columns.keys())
    for url in (sqlite_url, pg_url):
        engine = create_engine(url)
        try:
            inspector = inspect(engine)
            assert {c["name"] for c in inspector.get_columns("idempotency_keys")} == expected
            unique = inspector.get_unique_constraints("idempotency_keys")
            assert [sorted(u["column_names"]) for u in unique] == [["api_key_id", "key"]]
        finally:
            engine.dispose()

    command.downgrade(alembic_config(sqlite_url), "0006")
    engine = create_engine(sqlite_url)
    try:
        assert "idempotency_keys" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()
    upgrade_to_head(sqlite_url)


def test_on_sqlite(tmp_path: Path) -> None:
    embedded = Settings(
        data_dir=tmp_path / "data",
        model_preset="tiny",
        job_queue=f"test.jobs.{uuid.uuid4().hex[:8]}",
    )
    upgrade_to_head(embedded.resolved_database_url)
    with session_scope(embedded.resolved_database_url) as session:
        key = create_key(session, "embedded")
    with TestClient(create_app(embedded)) as client, ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: submit(client, key, "lite"), range(6)))
        other = submit(client, key, "lite", {**PIX2PIX, "prompt": "different"})

    assert {answer.status_code for answer in answers} == {200}
    assert len({answer.json()["id"] for answer in answers}) == 1
    assert other.status_code == 422
    with session_scope(embedded.resolved_database_url) as session:
        assert len(list(session.scalars(select(Job.id)))) == 1
