"""Sync wait: `Prefer: wait=N` answers the outcome as soon as the job ends, woken by Postgres
NOTIFY (not by polling), or the processing shape when N seconds pass first.

The job ends either in a real `darkroom worker` process, or (for precise timing) in a test
thread that records the outcome through services.outcomes, the worker's own code path. Waits
re-check only every 30 s here, so a prompt answer can only come from the notification.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio.to_thread
import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.app import create_app
from api.errors import ApiError
from api.waiting import LISTENER_NAME, body_wait, listen_conninfo, prefer_wait
from darkroom.identities import FailureReason
from darkroom.settings import Settings
from db.migrate import upgrade_to_head
from db.models import Job, JobState
from db.repositories import jobs
from db.repositories.keys import IssuedKey, create_key
from db.session import session_factory, session_scope
from services import outcomes
from tests.api.test_submit import PIX2PIX
from tests.support.servers import ImageServer
from tests.support.system import settings_env

#: Long enough that only a notification can wake a wait within a test's patience.
RECHECK_S = 30.0
#: A woken wait must answer this soon after the outcome's commit (polling would take 30 s).
PROMPT_S = 0.5


@pytest.fixture
def waiting_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"sync_wait_recheck_s": RECHECK_S, "sync_wait_max_s": 120})


@pytest.fixture
def client(waiting_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(waiting_settings)) as test_client:
        yield test_client


def submit(
    client: TestClient, key: IssuedKey, prefer: str | None = None, **body: Any
) -> tuple[dict[str, Any], dict[str, str], float]:
    """POST pix2pix (with a Prefer header); the answer, its headers and how long it took."""
    headers = {"Prefer": prefer} if prefer else {}
    started = time.monotonic()
    response = client.post(
        "/api/v5/pix2pix", json={**PIX2PIX, **body, "key": key.plaintext}, headers=headers
    )
    assert response.status_code == 200, response.text
    return response.json(), dict(response.headers), time.monotonic() - started


class Finisher:
    """Ends the newest job of a key from another thread, as a worker would: claim it, then
    record the outcome through services.outcomes. Remembers when its transaction committed."""

    def __init__(
        self, settings: Settings, key: IssuedKey, delay_s: float, failure: str | None = None
    ) -> None:
        self.settings = settings
        self.key_id = key.row.id
        self.delay_s = delay_s
        self.failure = failure
        self.committed_at: float | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Finisher:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._thread.join(timeout=30)

    @property
    def latency(self) -> float:
        """Seconds from the outcome's commit to now (call it when the answer arrived)."""
        assert self.committed_at is not None, "the finisher did not commit"
        return time.monotonic() - self.committed_at

    def _run(self) -> None:
        job_id = self._wait_for_job()
        time.sleep(self.delay_s)
        finish_job(self.settings, job_id, self.failure)
        self.committed_at = time.monotonic()

    def _wait_for_job(self) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with session_scope(self.settings.resolved_database_url) as session:
                job_id = session.scalar(
                    select(func.max(Job.id)).where(
                        Job.api_key_id == self.key_id, Job.state == JobState.QUEUED
                    )
                )
            if job_id is not None:
                return int(job_id)
            time.sleep(0.02)
        raise AssertionError("no job was submitted")


def finish_job(settings: Settings, job_id: int, failure: str | None = None) -> None:
    """Claim job `job_id` and record its success (or `failure`), committed on return."""
    with session_scope(settings.resolved_database_url) as session:
        outcome, job = jobs.claim_job(session, job_id, lease_s=60, max_attempts=3)
        assert outcome == jobs.ClaimOutcome.CLAIMED, outcome
        assert job is not None
        if failure is not None:
            outcomes.fail(session, settings, job, failure, reason=FailureReason.REJECTED)
            return
        record = jobs.OutputRecord(0, f"{job.file_prefix}-0.png", 64, 64, 7)
        meta = {**job.meta, "W": 64, "H": 64}
        outcomes.succeed(session, settings, job, outputs=[record], meta=meta, generation_time=0.5)


# --- parsing the preference ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("wait=5", 5.0),
        ("respond-async, wait=10", 10.0),
        ('wait="2.5"', 2.5),
        ("Wait = 3 ; foo", 3.0),
        ("return=minimal", 0.0),
        ("wait=soon", 0.0),
        ("wait=-1", 0.0),
        ("wait=inf", 0.0),
        ("", 0.0),
    ],
)
def test_prefer_header(header: str, seconds: float) -> None:
    assert prefer_wait(header) == seconds


def test_body_wait_is_lenient_about_types_and_strict_about_values() -> None:
    assert body_wait({}) == 0.0
    assert body_wait({"wait": None}) == 0.0
    assert body_wait({"wait": "2"}) == 2.0
    assert body_wait({"wait": 1.5}) == 1.5
    for bad in ("soon", -1, True):
        with pytest.raises(ApiError) as refused:
            body_wait({"wait": bad})
        assert refused.value.status_code == 422
        assert list(refused.value.message) == ["wait"]


def test_listen_conninfo_only_for_postgres() -> None:
    assert listen_conninfo("sqlite:////tmp/x.sqlite3") is None
    assert listen_conninfo("postgresql+psycopg://u:p%40ss@db:5433/dark?sslmode=require") == (
        "postgresql://u:p%40ss@db:5433/dark?sslmode=require"
    )


# --- waiting in-process, jobs ended by a test thread ------------------------------------------


def test_wait_answers_the_success_shape_as_soon_as_the_job_ends(
    client: TestClient, api_key: IssuedKey, waiting_settings: Settings
) -> None:
    with Finisher(waiting_settings, api_key, delay_s=1.0) as finisher:
        answer, headers, elapsed = submit(client, api_key, "wait=20")
        latency = finisher.latency

    fetched = client.post(f"/api/v5/fetch/{answer['id']}", json={"key": api_key.plaintext})
    assert answer == fetched.json()
    assert answer["status"] == "success"
    assert headers["preference-applied"] == "wait=20"
    assert 1.0 <= elapsed < 20
    print(f"wake-up latency after commit: {latency * 1000:.1f} ms")
    assert latency < PROMPT_S


def test_wait_answers_the_failed_shape(
    client: TestClient, api_key: IssuedKey, waiting_settings: Settings
) -> None:
    failure = "Unable to fetch image from provided URL"
    with Finisher(waiting_settings, api_key, delay_s=0.5, failure=failure) as finisher:
        answer, _headers, _elapsed = submit(client, api_key, "wait=20", track_id="t-1")
        latency = finisher.latency

    assert answer == {
        "status": "failed",
        "id": answer["id"],
        "message": failure,
        "messege": failure,
        "track_id": "t-1",
    }
    assert latency < PROMPT_S


def test_a_cancel_wakes_the_waiting_request(
    client: TestClient, api_key: IssuedKey, waiting_settings: Settings
) -> None:
    result: dict[str, Any] = {}

    def waiting_submit() -> None:
        result["answer"] = submit(client, api_key, "wait=20")[0]

    thread = threading.Thread(target=waiting_submit)
    thread.start()
    job_id = _newest_job(waiting_settings, api_key)
    canceled = client.post(f"/api/v1/jobs/{job_id}/cancel", json={"key": api_key.plaintext})
    thread.join(timeout=10)

    assert canceled.json()["status"] == "failed"
    assert result["answer"]["status"] == "failed"
    assert result["answer"]["message"] == outcomes.CANCELED_MESSAGE


def test_a_wait_that_runs_out_answers_processing(client: TestClient, api_key: IssuedKey) -> None:
    answer, headers, elapsed = submit(client, api_key, "wait=1")

    assert answer["status"] == "processing"
    assert answer["progress"] == 0
    assert headers["preference-applied"] == "wait=1"
    assert 1.0 <= elapsed < 3.0


def test_the_wait_is_capped_by_the_setting(waiting_settings: Settings, api_key: IssuedKey) -> None:
    capped = waiting_settings.model_copy(update={"sync_wait_max_s": 0.5})
    with TestClient(create_app(capped)) as client:
        answer, headers, elapsed = submit(client, api_key, "wait=30")

    assert answer["status"] == "processing"
    assert headers["preference-applied"] == "wait=0.5"
    assert elapsed < 2.5


def test_a_zero_cap_turns_waiting_and_the_listener_off(
    waiting_settings: Settings, api_key: IssuedKey
) -> None:
    off = waiting_settings.model_copy(update={"sync_wait_max_s": 0})
    with TestClient(create_app(off)) as client:
        assert client.app.state.waiter.conninfo is None  # type: ignore[attr-defined]
        answer, headers, elapsed = submit(client, api_key, "wait=30")

    assert answer["status"] == "processing"
    assert "preference-applied" not in headers
    assert elapsed < 2.0


def test_without_a_preference_the_answer_is_immediate(
    client: TestClient, api_key: IssuedKey
) -> None:
    answer, headers, elapsed = submit(client, api_key)

    assert answer["status"] == "processing"
    assert "preference-applied" not in headers
    assert elapsed < 2.0


def test_the_body_field_asks_for_a_wait_too(
    client: TestClient, api_key: IssuedKey, waiting_settings: Settings
) -> None:
    with Finisher(waiting_settings, api_key, delay_s=0.5) as finisher:
        answer, headers, _elapsed = submit(client, api_key, None, wait="10")
        latency = finisher.latency

    assert answer["status"] == "success"
    assert headers["preference-applied"] == "wait=10"
    assert latency < PROMPT_S
    refused = client.post(
        "/api/v5/pix2pix", json={**PIX2PIX, "key": api_key.plaintext, "wait": "soon"}
    )
    assert refused.status_code == 422
    assert refused.json() == {"status": "error", "message": {"wait": ["wait must be a number"]}}


def test_fetch_can_wait_too(
    client: TestClient, api_key: IssuedKey, waiting_settings: Settings
) -> None:
    job_id = submit(client, api_key)[0]["id"]

    with Finisher(waiting_settings, api_key, delay_s=1.0) as finisher:
        response = client.post(
            "/api/v1/enterprise/fetch",
            json={"key": api_key.plaintext, "request_id": job_id},
            headers={"Prefer": "wait=20"},
        )
        latency = finisher.latency

    assert response.json()["status"] == "success"
    assert response.headers["preference-applied"] == "wait=20"
    assert latency < PROMPT_S


def test_a_waiting_request_holds_no_connection_and_no_thread(
    client: TestClient, api_key: IssuedKey, waiting_settings: Settings
) -> None:
    engine = session_factory(waiting_settings.resolved_database_url).kw["bind"]
    result: dict[str, Any] = {}

    def waiting_submit() -> None:
        result["answer"] = submit(client, api_key, "wait=20")[0]

    thread = threading.Thread(target=waiting_submit)
    thread.start()
    job_id = _newest_job(waiting_settings, api_key)
    time.sleep(0.5)  # the request is past its submit and re-read, and waits
    checked_out = engine.pool.checkedout()
    assert client.portal is not None
    borrowed = client.portal.call(_borrowed_threads)
    finish_job(waiting_settings, job_id)
    thread.join(timeout=10)

    assert (checked_out, borrowed) == (0, 0)
    assert result["answer"]["status"] == "success"


async def _borrowed_threads() -> float:
    return anyio.to_thread.current_default_thread_limiter().borrowed_tokens


def test_the_listener_reconnects_after_its_connection_dies(
    client: TestClient, api_key: IssuedKey, waiting_settings: Settings, pg_url: str
) -> None:
    waiter = client.app.state.waiter  # type: ignore[attr-defined]
    _wait_until(lambda: waiter.connections == 1)
    assert _terminate_listeners(pg_url) >= 1

    with Finisher(waiting_settings, api_key, delay_s=2.5) as finisher:
        answer, _headers, _elapsed = submit(client, api_key, "wait=20")
        latency = finisher.latency

    assert waiter.connections == 2
    assert answer["status"] == "success"
    assert latency < PROMPT_S


def _terminate_listeners(pg_url: str) -> int:
    """Kill this database's listener connections, as a Postgres restart or failover would."""
    conninfo = listen_conninfo(pg_url)
    assert conninfo is not None
    with psycopg.connect(conninfo, autocommit=True) as admin:
        rows = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s AND datname = current_database()",
            (LISTENER_NAME,),
        ).fetchall()
    return len(rows)


def test_sqlite_waits_poll(tmp_path: Path, image_server: ImageServer) -> None:
    embedded = Settings(
        data_dir=tmp_path / "data",
        model_preset="tiny",
        sync_wait_poll_s=0.2,
        job_queue=f"test.jobs.{uuid.uuid4().hex[:8]}",
    )
    upgrade_to_head(embedded.resolved_database_url)
    with session_scope(embedded.resolved_database_url) as session:
        key = create_key(session, "embedded")
    with TestClient(create_app(embedded)) as client:
        assert client.app.state.waiter.conninfo is None  # type: ignore[attr-defined]
        with Finisher(embedded, key, delay_s=1.0) as finisher:
            answer, _headers, _elapsed = submit(client, key, "wait=20")
            latency = finisher.latency

    assert answer["status"] == "success"
    assert latency < 0.2 + PROMPT_S


def _newest_job(settings: Settings, key: IssuedKey, timeout: float = 10) -> int:
    """The id of the key's newest job, once there is one."""
    found: list[int] = []

    def appeared() -> bool:
        with session_scope(settings.resolved_database_url) as session:
            job_id = session.scalar(select(func.max(Job.id)).where(Job.api_key_id == key.row.id))
        found[:] = [] if job_id is None else [int(job_id)]
        return bool(found)

    _wait_until(appeared, timeout)
    return found[0]


def _wait_until(condition: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# --- with a real worker process ---------------------------------------------------------------


@contextmanager
def running_worker(settings: Settings, workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A `darkroom worker` process on the settings' database and job queue; SIGTERM after."""
    env = settings_env(settings, workdir / "worker-data")
    log_path = workdir / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "worker"], env=env, stdout=log, stderr=log
        )
    try:
        yield worker
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=10)


def finished_at(settings: Settings, job_id: int) -> datetime:
    with session_scope(settings.resolved_database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert job.finished_at is not None
        return job.finished_at


@pytest.mark.slow
def test_a_real_worker_job_answers_in_the_submit(
    tmp_path: Path,
    client: TestClient,
    api_key: IssuedKey,
    waiting_settings: Settings,
    image_server: ImageServer,
) -> None:
    red = {"init_image": image_server.url("/red.png"), "steps": 2}
    with running_worker(waiting_settings, tmp_path):
        # The first job also waits for the worker to start and build its tiny models.
        first = submit(client, api_key, "wait=120", **red)[0]
        answer, headers, _elapsed = submit(client, api_key, "wait=60", **red)
        answered = datetime.now(UTC)
        failed = submit(client, api_key, "wait=60", init_image=image_server.url("/text.txt"))[0]

    assert first["status"] == "success", (tmp_path / "worker.log").read_text()[-3000:]
    assert answer["status"] == "success"
    assert headers["preference-applied"] == "wait=60"
    assert (
        answer
        == client.post(f"/api/v5/fetch/{answer['id']}", json={"key": api_key.plaintext}).json()
    )
    latency = (answered - finished_at(waiting_settings, answer["id"])).total_seconds()
    print(f"real worker: answer {latency * 1000:.0f} ms after the job's finished_at")
    assert latency < 1.0  # waits re-check every 30 s: only the notification is this fast
    assert failed["status"] == "failed"
    assert failed["message"].startswith("Unable to fetch image from provided URL")
