"""`darkroom jobs list|show|cancel|requeue`, run as an operator would, on Postgres and Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Interval, literal, select, update
from standardwebhooks.webhooks import Webhook

from cli import admin
from darkroom.identities import FailureReason, Operation
from darkroom.jobspec import JobSpec
from darkroom.queue import make_celery
from darkroom.settings import Settings
from db.clock import DbNow
from db.models import Job, JobRequeue, JobState, WebhookDelivery, utcnow
from db.repositories import jobs, keys, routing, webhooks
from db.repositories.jobs import LOST_RUN
from db.repositories.keys import IssuedKey
from db.session import session_scope
from services import outcomes
from tests.support.broker import published_ids
from tests.support.rows import queued_job
from tests.support.servers import ImageServer, WebhookReceiver
from tests.worker.test_clock import FAKETIME_LIBS
from worker.jobs import WorkerRuntime, run_job
from worker.models.cache import ModelCache
from worker.models.tiny import ensure_tiny_models
from worker.webhooks.dispatcher import deliver

INLINE_IMAGE = "data:image/png;base64," + "A" * 400


def cli(
    settings: Settings, *args: str, env_extra: dict[str, str] | None = None
) -> tuple[int, list[dict[str, Any]], str]:
    """Run `darkroom ...` on the test database and queues: exit code, JSON lines, stdout."""
    env = {
        **os.environ,
        **(env_extra or {}),
        "DARKROOM_DATABASE_URL": settings.resolved_database_url,
        "DARKROOM_BROKER_URL": settings.resolved_broker_url,
        "DARKROOM_JOB_QUEUE": settings.job_queue,
        "DARKROOM_WEBHOOK_QUEUE": settings.webhook_queue,
        "DARKROOM_PUBLIC_URL": settings.public_url,
        "DARKROOM_DATA_DIR": str(settings.data_dir),
    }
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return done.returncode, rows, done.stdout


def seed(
    settings: Settings,
    key_id: int,
    *,
    operation: Operation = Operation.PIX2PIX,
    webhook: str | None = None,
    init_images: list[str] | None = None,
) -> int:
    """A queued job, stored as the API stores one."""
    spec = JobSpec(
        operation=operation,
        prompt="make it blue",
        init_images=init_images or ["http://127.0.0.1:9/in.png"],
        steps=2,
        guidance_scale=7.0,
        seed=99,
        width=64,
        height=64,
    )
    return queued_job(settings, key_id, spec=spec, track_id="t-9", webhook=webhook)


def claim(settings: Settings, job_id: int, lease_s: float = 60) -> None:
    """Take the job as a worker would (a negative lease: a worker that has since vanished)."""
    with session_scope(settings.resolved_database_url) as session:
        outcome, _ = jobs.claim_job(session, job_id, lease_s=lease_s, max_attempts=3)
        assert outcome == jobs.ClaimOutcome.CLAIMED


def fail(settings: Settings, job_id: int, message: str) -> int | None:
    """End the job failed the way the worker and sweeper do; its delivery id."""
    with session_scope(settings.resolved_database_url) as session:
        job = jobs.get_job(session, job_id)
        assert job is not None
        return outcomes.fail(session, settings, job, message, reason=FailureReason.REJECTED)


def load(settings: Settings, job_id: int) -> Job:
    with session_scope(settings.resolved_database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def second_key(settings: Settings) -> IssuedKey:
    with session_scope(settings.resolved_database_url) as session:
        return keys.create_key(session, "other")


def test_list_filters_by_key_state_and_operation(settings: Settings, api_key: IssuedKey) -> None:
    queued = seed(settings, api_key.row.id)
    failed = seed(settings, api_key.row.id, operation=Operation.IMG2IMG)
    fail(settings, failed, "boom")
    running = seed(settings, api_key.row.id)
    claim(settings, running)
    seed(settings, second_key(settings).row.id)
    prefix = api_key.row.key_prefix

    _, mine, _ = cli(settings, "jobs", "list", "--key", prefix, "--json")
    assert [row["id"] for row in mine] == [running, failed, queued]  # newest first
    assert {row["key"]["prefix"] for row in mine} == {prefix}
    _, only_failed, _ = cli(
        settings, "jobs", "list", "--key", prefix, "--state", "failed", "--json"
    )
    assert [(row["id"], row["error"]) for row in only_failed] == [(failed, "boom")]
    _, newest_pix2pix, _ = cli(
        settings,
        "jobs",
        "list",
        "--key",
        prefix,
        "--operation",
        "pix2pix",
        "--limit",
        "1",
        "--json",
    )
    assert [row["id"] for row in newest_pix2pix] == [running]

    code, _, table = cli(settings, "jobs", "list", "--key", str(api_key.row.id))
    assert code == 0
    header, *lines = table.strip().splitlines()
    assert tuple(header.split()) == admin.LIST_COLUMNS
    assert [line.split()[:3] for line in lines] == [
        [str(running), "processing", "pix2pix"],
        [str(failed), "failed", "img2img"],
        [str(queued), "queued", "pix2pix"],
    ]


def test_show_gives_params_timeline_outputs_and_webhook_attempts(
    settings: Settings, api_key: IssuedKey, receiver: WebhookReceiver
) -> None:
    url_input = "http://127.0.0.1:9/in.png"
    job_id = seed(
        settings, api_key.row.id, webhook=receiver.url, init_images=[url_input, INLINE_IMAGE]
    )
    with session_scope(settings.resolved_database_url) as session:
        routing.mark_published(session, [job_id], settings.job_queue)
    claim(settings, job_id)
    with session_scope(settings.resolved_database_url) as session:
        job = jobs.get_job(session, job_id)
        assert job is not None
        output = jobs.OutputRecord(0, f"{job.file_prefix}-0.png", 64, 64, 99)
        delivery_id = outcomes.succeed(
            session, settings, job, outputs=[output], meta=job.meta, generation_time=1.5
        )
    assert delivery_id is not None
    answers: Iterator[tuple[int, dict[str, str]]] = iter([(500, {}), (200, {})])
    receiver.respond = lambda _r: next(answers)
    deliver(delivery_id, settings)
    time.sleep(0.3)  # the schedule's 0.2 s retry wait
    deliver(delivery_id, settings)

    code, [view], _ = cli(settings, "jobs", "show", str(job_id), "--json")

    assert code == 0
    assert [event["event"] for event in view["timeline"]] == [
        "created",
        "enqueued",
        "started",
        "finished",
        "webhook_queued",
        "webhook_attempt",
        "webhook_attempt",
        "webhook_delivered",
    ]
    assert view["timeline"][3]["detail"] == "success: 1 output(s) in 1.5 s"
    assert view["params"]["prompt"] == "make it blue"
    assert view["params"]["init_images"] == 2
    assert view["inputs"] == [{"kind": "url", "url": url_input}, {"kind": "inline", "chars": 422}]
    assert view["outputs"][0]["url"] == f"{settings.public_url}/outputs/{output.filename}"
    assert [a["status_code"] for a in view["webhook"]["attempts"]] == [500, 200]
    assert view["webhook"]["state"] == "delivered"
    assert view["meta"]["seed"] == 99

    code, _, text = cli(settings, "jobs", "show", str(job_id))
    assert code == 0
    assert "#1: HTTP 500" in text
    assert "inline image, 422 chars" in text
    assert INLINE_IMAGE not in text


def test_cancel_works_like_the_api(settings: Settings, api_key: IssuedKey) -> None:
    queued = seed(settings, api_key.row.id, webhook="http://127.0.0.1:9/hook")
    running = seed(settings, api_key.row.id)
    claim(settings, running)

    code, [answer], _ = cli(settings, "jobs", "cancel", str(queued))
    assert code == 0
    assert answer["state"] == "failed"
    assert load(settings, queued).error == outcomes.CANCELED_MESSAGE
    with session_scope(settings.resolved_database_url) as session:
        delivery = webhooks.get_delivery_for_job(session, queued)
        assert delivery is not None
        assert json.loads(delivery.payload)["message"] == outcomes.CANCELED_MESSAGE
    assert answer["webhook"] == delivery.id
    assert delivery.id in published_ids(settings.resolved_broker_url, settings.webhook_queue)

    code, [answer], _ = cli(settings, "jobs", "cancel", str(running))
    assert (code, answer["state"]) == (0, "processing")
    assert load(settings, running).cancel_requested_at is not None

    code, [refused], _ = cli(settings, "jobs", "cancel", str(queued))
    assert code == 1
    assert "already finished" in refused["error"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with the tiny models built, for a worker in this process."""
    data_dir = tmp_path_factory.mktemp("tiny")
    ensure_tiny_models(Settings(data_dir=data_dir).tiny_models_dir)
    return data_dir


def test_a_requeued_job_runs_again_with_fresh_attempts_and_sends_a_new_webhook(
    settings: Settings,
    api_key: IssuedKey,
    receiver: WebhookReceiver,
    image_server: ImageServer,
    tiny_models: Path,
) -> None:
    settings = settings.model_copy(update={"data_dir": tiny_models})
    job_id = seed(
        settings, api_key.row.id, webhook=receiver.url, init_images=[image_server.url("/red.png")]
    )
    for _ in range(3):  # three workers died running it
        claim(settings, job_id, lease_s=-1)
    failed_delivery = fail(settings, job_id, outcomes.exhausted_message(3))
    assert failed_delivery is not None
    deliver(failed_delivery, settings)

    code, [answer], _ = cli(settings, "jobs", "requeue", str(job_id), "--reason", "bad GPU")

    assert code == 0
    [failed_hook] = receiver.snapshot()
    assert answer == {
        "id": job_id,
        "state": "queued",
        "published": True,
        "previous_state": "failed",
        "previous_attempts": 3,
        "superseded_webhook": failed_hook.headers["webhook-id"],
    }
    assert job_id in published_ids(settings.resolved_broker_url, settings.job_queue)
    job = load(settings, job_id)
    assert (job.state, job.attempts, job.error, job.finished_at) == (JobState.QUEUED, 0, None, None)
    with session_scope(settings.resolved_database_url) as session:
        assert webhooks.get_delivery_for_job(session, job_id) is None
        query = select(JobRequeue).where(JobRequeue.job_id == job_id).order_by(JobRequeue.id)
        *lost, record = session.scalars(query)
        # The two runs taken over when their leases ran out are in its history too.
        assert [(row.reason, row.previous_attempts) for row in lost] == [
            (LOST_RUN, 1),
            (LOST_RUN, 2),
        ]
        assert record.reason == "bad GPU"
        assert record.previous_webhook is not None
        assert record.previous_webhook["payload"]["status"] == "failed"
        assert [a["status_code"] for a in record.previous_webhook["attempts"]] == [200]

    # A real worker runs it: with the old counter (3 of 3) it would be failed as exhausted.
    runtime = WorkerRuntime(
        settings=settings, broker=make_celery(settings), cache=ModelCache(device="cpu")
    )
    run_job(job_id, runtime)
    job = load(settings, job_id)
    assert (job.state, job.attempts) == (JobState.SUCCESS, 1)
    with session_scope(settings.resolved_database_url) as session:
        delivery = webhooks.get_delivery_for_job(session, job_id)
        assert delivery is not None
        new_delivery = delivery.id
    assert new_delivery != failed_delivery
    deliver(new_delivery, settings)

    _, success_hook = receiver.snapshot()
    assert success_hook.headers["webhook-id"] != failed_hook.headers["webhook-id"]
    body = Webhook(api_key.row.webhook_secret).verify(success_hook.body, success_hook.headers)
    assert body["status"] == "success"
    assert body["id"] == job_id
    assert body["output"] == f"{settings.public_url}/outputs/{job.file_prefix}-0.png"  # pix2pix

    _, [view], _ = cli(settings, "jobs", "show", str(job_id), "--json")
    events = [event["event"] for event in view["timeline"]]
    # Two runs lost to expired leases, then the operator's requeue; then it ran again.
    assert events[:5] == ["created", "requeued", "requeued", "requeued", "enqueued"]
    details = [event["detail"] for event in view["timeline"] if event["event"] == "requeued"]
    assert details[0].startswith("was processing after 1 attempt(s), the last started 20")
    assert "its run stopped renewing its lease" in details[0]
    assert "webhook_delivered" in events
    assert view["requeues"][-1]["previous_webhook"]["state"] == "delivered"


def test_requeue_refuses_what_it_must_not_touch(settings: Settings, api_key: IssuedKey) -> None:
    succeeded = seed(settings, api_key.row.id)
    claim(settings, succeeded)
    with session_scope(settings.resolved_database_url) as session:
        job = jobs.get_job(session, succeeded)
        assert job is not None
        outcomes.succeed(session, settings, job, outputs=[], meta={}, generation_time=1.0)
    alive = seed(settings, api_key.row.id)
    claim(settings, alive, lease_s=60)
    with session_scope(settings.resolved_database_url) as session:
        jobs.request_cancel(session, alive)  # the stuck worker never reaches its next step
    sending = seed(settings, api_key.row.id, webhook="http://127.0.0.1:9/hook")
    fail(settings, sending, "boom")
    with session_scope(settings.resolved_database_url) as session:  # a dispatcher holds it
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.job_id == sending)
            .values(lease_until=utcnow() + timedelta(seconds=60))
        )

    for job_id, says in (
        (succeeded, "succeeded"),
        (alive, "--force"),
        (sending, "being sent"),
        (2**31 - 1, "no job"),
    ):
        code, [refused], _ = cli(settings, "jobs", "requeue", str(job_id))
        assert code == 1
        assert says in refused["error"]
    assert load(settings, alive).state == JobState.PROCESSING
    assert load(settings, sending).state == JobState.FAILED

    code, [answer], _ = cli(settings, "jobs", "requeue", str(alive), "--force")
    assert (code, answer["previous_state"]) == (0, "processing")
    requeued = load(settings, alive)
    assert (requeued.state, requeued.cancel_requested_at) == (JobState.QUEUED, None)


def test_requeue_reads_leases_on_the_database_clock(settings: Settings, api_key: IssuedKey) -> None:
    """An operator's host whose clock runs 10 minutes ahead (libfaketime) still sees a live
    worker's lease, and a dispatcher's, as live: the database's clock decides, as for workers."""
    if not FAKETIME_LIBS:
        pytest.fail("libfaketime is missing: run scripts/system-deps.sh (Debian's faketime)")
    ahead = {
        "LD_PRELOAD": str(FAKETIME_LIBS[0]),
        "FAKETIME": "+600",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    alive = seed(settings, api_key.row.id)
    claim(settings, alive, lease_s=60)
    sending = seed(settings, api_key.row.id, webhook="http://127.0.0.1:9/hook")
    fail(settings, sending, "boom")
    with session_scope(settings.resolved_database_url) as session:  # a dispatcher holds it
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.job_id == sending)
            .values(lease_until=DbNow() + literal(timedelta(seconds=60), Interval()))
        )

    for job_id, says in ((alive, "--force"), (sending, "being sent")):
        code, rows, out = cli(settings, "jobs", "requeue", str(job_id), env_extra=ahead)
        assert code == 1, out
        assert says in rows[0]["error"]
    assert load(settings, alive).state == JobState.PROCESSING
    assert load(settings, sending).state == JobState.FAILED
