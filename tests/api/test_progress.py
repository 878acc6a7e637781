"""Progress and eta in the processing shape: the worker's recorded progress, and an eta from
the queue ahead and measured job times (see docs/CLIENTS.md for the formula).

The formula tests run on a database of their own, so the queue is exactly what they build.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from sqlalchemy.orm import Session

from api.app import create_app
from darkroom.identities import Operation
from darkroom.settings import Settings
from db.models import Job, JobState, utcnow
from db.repositories import jobs
from db.repositories.keys import IssuedKey, create_key
from db.session import session_scope
from services.eta import DEFAULT_ETA_S
from tests.api.test_submit import IMG2IMG, PIX2PIX
from tests.api.test_sync_wait import running_worker
from tests.support.rows import job_row
from tests.support.servers import ImageServer


@pytest.fixture
def own_settings(settings: Settings, own_pg_url: str) -> Settings:
    return settings.model_copy(update={"database_url": own_pg_url})


@pytest.fixture
def own_key(own_pg_url: str) -> IssuedKey:
    with session_scope(own_pg_url) as session:
        return create_key(session, "progress")


@pytest.fixture
def client(own_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(own_settings)) as test_client:
        yield test_client


def add_job(
    session: Session,
    key: IssuedKey,
    operation: Operation,
    *,
    state: JobState = JobState.QUEUED,
    seconds: float | None = None,
    progress: float | None = None,
    batch_key: str | None = None,
    running_for: float = 0.0,
) -> int:
    """A job in `state`: succeeded after `seconds`, or running at `progress` for `running_for`
    seconds, or queued."""
    params = {"samples": 1}
    job_id = job_row(
        session, key.row.id, operation=operation, params=params, batch_key=batch_key
    ).id
    if state == JobState.QUEUED:
        return job_id
    assert jobs.claim_job(session, job_id, lease_s=60, max_attempts=3)[0].value == "claimed"
    if state == JobState.PROCESSING:
        jobs.record_progress(session, [job_id], progress or 0.0)
        started = utcnow() - timedelta(seconds=running_for)
        session.execute(update(Job).where(Job.id == job_id).values(started_at=started))
        return job_id
    assert seconds is not None
    assert jobs.complete_job(session, job_id, outputs=[], meta={}, generation_time=seconds)
    finished = utcnow()
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(started_at=finished - timedelta(seconds=seconds), finished_at=finished)
    )
    return job_id


def add_running(
    session: Session, key: IssuedKey, operation: Operation, progress: float, running_for: float
) -> int:
    """A job at `progress`, claimed `running_for` seconds ago."""
    state = JobState.PROCESSING
    return add_job(session, key, operation, state=state, progress=progress, running_for=running_for)


def fetch(client: TestClient, key: IssuedKey, job_id: int) -> dict[str, Any]:
    answer: dict[str, Any] = client.post(
        f"/api/v5/fetch/{job_id}", json={"key": key.plaintext}
    ).json()
    return answer


def test_before_any_job_finished_the_eta_counts_the_queue_at_the_default(
    client: TestClient, own_key: IssuedKey
) -> None:
    body = {**PIX2PIX, "key": own_key.plaintext}
    first = client.post("/api/v5/pix2pix", json=body).json()
    second = client.post("/api/v5/pix2pix", json=body).json()

    assert (first["eta"], first["progress"]) == (DEFAULT_ETA_S, 0)
    assert second["eta"] == 2 * DEFAULT_ETA_S  # one job ahead, then its own


def test_eta_from_queue_position_running_work_and_median_job_times(
    client: TestClient, own_key: IssuedKey, own_pg_url: str
) -> None:
    with session_scope(own_pg_url) as session:
        for seconds in (2.0, 4.0, 100.0):  # a cold model load does not move the median
            add_job(session, own_key, Operation.PIX2PIX, state=JobState.SUCCESS, seconds=seconds)
        add_job(session, own_key, Operation.IMG2IMG, state=JobState.SUCCESS, seconds=10.0)
        running = add_running(session, own_key, Operation.IMG2IMG, 0.5, 3.0)
        add_job(session, own_key, Operation.PIX2PIX)
        add_job(session, own_key, Operation.PIX2PIX)

    answer = client.post("/api/v1/enterprise/img2img", json={**IMG2IMG, "key": own_key.plaintext})
    queued = answer.json()

    # Running img2img: half done in 3 s, so 3 s left at its own pace (not half of the typical
    # 10 s); two pix2pix ahead at 4 s each; then its own typical 10 s.
    assert queued["eta"] == pytest.approx(3 + 8 + 10, abs=1.0)
    assert queued["progress"] == 0
    running_answer = fetch(client, own_key, running)
    assert running_answer["progress"] == 0.5
    assert running_answer["eta"] == pytest.approx(3.0, abs=1.0)


def test_a_long_running_job_is_estimated_at_its_own_pace(
    client: TestClient, own_key: IssuedKey, own_pg_url: str
) -> None:
    """A job far slower than its operation's median (50 steps among 4-step jobs): 20% done in
    20 s leaves 80 s, not 80% of the median's 10 s; below 10% its pace says too little yet."""
    with session_scope(own_pg_url) as session:
        add_job(session, own_key, Operation.IMG2IMG, state=JobState.SUCCESS, seconds=10.0)
        slow = add_running(session, own_key, Operation.IMG2IMG, 0.2, 20.0)
        barely = add_running(session, own_key, Operation.IMG2IMG, 0.05, 20.0)
    assert fetch(client, own_key, slow)["eta"] == pytest.approx(80.0, rel=0.05)
    assert fetch(client, own_key, barely)["eta"] == pytest.approx(9.5, abs=0.05)


def test_running_jobs_stand_for_workers_and_a_batch_runs_once(
    client: TestClient, own_key: IssuedKey, own_pg_url: str
) -> None:
    with session_scope(own_pg_url) as session:
        add_job(session, own_key, Operation.PIX2PIX, state=JobState.SUCCESS, seconds=6.0)
        for _ in range(2):  # one batch: one run, one worker
            add_job(session, own_key, Operation.PIX2PIX, state=JobState.PROCESSING, batch_key="b")
        add_running(session, own_key, Operation.PIX2PIX, 0.5, 3.0)
        ahead = [add_job(session, own_key, Operation.PIX2PIX) for _ in range(4)]
        last = add_job(session, own_key, Operation.IMG_MIXER)

    # Two runs (6 s and 3 s left) and four pix2pix ahead (24 s) over two workers, then its own
    # 6 s: an operation without history takes the median of all recent jobs.
    assert fetch(client, own_key, last)["eta"] == pytest.approx((6 + 3 + 24) / 2 + 6, abs=1.0)
    assert fetch(client, own_key, ahead[0])["eta"] == pytest.approx((6 + 3) / 2 + 6, abs=1.0)


def test_progress_and_eta_follow_a_running_job(
    client: TestClient, own_key: IssuedKey, own_pg_url: str
) -> None:
    with session_scope(own_pg_url) as session:
        add_job(session, own_key, Operation.PIX2PIX, state=JobState.SUCCESS, seconds=8.0)
        job_id = add_job(session, own_key, Operation.PIX2PIX, state=JobState.PROCESSING)

    seen = []
    for progress in (0.0, 0.25, 0.75):
        with session_scope(own_pg_url) as session:
            jobs.record_progress(session, [job_id], progress)
            started = utcnow() - timedelta(seconds=8.0 * progress)  # the typical job's pace
            session.execute(update(Job).where(Job.id == job_id).values(started_at=started))
        answer = fetch(client, own_key, job_id)
        seen.append((answer["progress"], answer["eta"]))

    assert [p for p, _eta in seen] == [0.0, 0.25, 0.75]
    assert [eta for _p, eta in seen] == pytest.approx([8.0, 6.0, 2.0], abs=0.5)


@pytest.mark.slow
def test_a_real_worker_reports_progress_while_it_runs(
    tmp_path: Path,
    own_settings: Settings,
    own_key: IssuedKey,
    image_server: ImageServer,
) -> None:
    # Its own database: the eta reads recent job durations, which other tests' rows would set.
    settings, api_key = own_settings, own_key
    body = {
        **IMG2IMG,
        "key": api_key.plaintext,
        "init_image": image_server.url("/red.png"),
        # Long enough (a few seconds on CPU) for several throttled progress writes.
        "width": 512,
        "height": 512,
        "num_inference_steps": "40",
        "strength": 1.0,
        "enhance_prompt": "no",
        "model_id": None,
    }
    seen: list[tuple[float, float]] = []
    with TestClient(create_app(settings)) as client, running_worker(settings, tmp_path):
        job_id = client.post("/api/v1/enterprise/img2img", json=body).json()["id"]
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            answer = fetch(client, api_key, job_id)
            if answer["status"] != "processing":
                break
            seen.append((answer["progress"], answer["eta"]))
            time.sleep(0.1)

    assert answer["status"] == "success", (tmp_path / "worker.log").read_text()[-3000:]
    progress = [p for p, _eta in seen]
    print(f"progress seen while running: {sorted(set(progress))}")
    assert progress == sorted(progress)  # never goes back
    assert any(0 < p < 1 for p in progress), progress
    started = [(p, eta) for p, eta in seen if p > 0]
    assert started[-1][1] < started[0][1]  # the eta shrinks as the job advances


def test_a_requeued_job_reports_no_progress_until_it_runs_again(
    client: TestClient, own_key: IssuedKey, own_pg_url: str
) -> None:
    with session_scope(own_pg_url) as session:
        job_id = add_job(
            session, own_key, Operation.PIX2PIX, state=JobState.PROCESSING, progress=0.6
        )
        expired = utcnow() - timedelta(seconds=1)
        session.execute(update(Job).where(Job.id == job_id).values(lease_until=expired))
        assert jobs.requeue_job(session, job_id)  # its worker died at 60 %

    answer = fetch(client, own_key, job_id)
    assert (answer["status"], answer["progress"]) == ("processing", 0)
