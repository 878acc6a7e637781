"""worker.jobs.run_job against Postgres, Redis, the loopback image host and the tiny models."""

from __future__ import annotations

import base64
import json
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from PIL import Image
from prometheus_client import REGISTRY
from sqlalchemy import update

from darkroom.identities import FailureReason, Operation
from darkroom.jobspec import JobSpec
from darkroom.queue import make_celery
from darkroom.settings import Settings
from db.models import Job, JobOutput, JobState, utcnow
from db.repositories import jobs, webhooks
from db.repositories.keys import IssuedKey
from db.session import session_scope
from services.outcomes import CANCELED_MESSAGE, exhausted_message
from tests.conftest import count_rows
from tests.support.broker import published_ids
from tests.support.rows import queued_job
from tests.support.servers import ImageServer, WebhookReceiver, png
from worker.jobs import INTERNAL_ERROR, WorkerRuntime, run_job
from worker.models.cache import ModelCache
from worker.sweeper import expire_temporary_outputs


@pytest.fixture
def runtime(settings: Settings, tiny_settings: Settings, model_cache: ModelCache) -> WorkerRuntime:
    """A worker's runtime on the test database, reusing the session's tiny models."""
    shared = settings.model_copy(update={"data_dir": tiny_settings.data_dir})
    return WorkerRuntime(settings=shared, broker=make_celery(shared), cache=model_cache)


def new_job(runtime: WorkerRuntime, key: IssuedKey, webhook: str | None, **spec: Any) -> int:
    fields: dict[str, Any] = {
        "operation": Operation.PIX2PIX,
        "prompt": "make it blue",
        "steps": 3,
        "guidance_scale": 7.0,
        "seed": 1234,
        "samples": 2,
        **spec,
    }
    return queued_job(runtime.settings, key.row.id, spec=JobSpec(**fields), webhook=webhook)


def load(runtime: WorkerRuntime, job_id: int) -> Job:
    with session_scope(runtime.settings.resolved_database_url) as session:
        job = jobs.get_job(session, job_id)
        assert job is not None
        session.expunge(job)
        return job


def published_deliveries(settings: Settings) -> list[int]:
    return published_ids(settings.broker_url, settings.webhook_queue)


def test_success_writes_outputs_records_them_and_queues_the_webhook(
    runtime: WorkerRuntime, api_key: IssuedKey, image_server: ImageServer, receiver: WebhookReceiver
) -> None:
    job_id = new_job(runtime, api_key, receiver.url, init_images=[image_server.url("/wide.png")])

    run_job(job_id, runtime)

    job = load(runtime, job_id)
    assert job.state == JobState.SUCCESS
    assert job.attempts == 1
    assert job.generation_time is not None
    assert job.generation_time > 0
    assert (job.meta["W"], job.meta["H"]) == (160, 96)
    assert [(o.index, o.seed) for o in job.outputs] == [(0, 1234), (1, 1235)]
    for output in job.outputs:
        with Image.open(runtime.settings.outputs_dir / output.filename) as image:
            assert image.size == (160, 96)
    with session_scope(runtime.settings.resolved_database_url) as session:
        delivery = webhooks.get_delivery_for_job(session, job_id)
        assert delivery is not None
        payload = json.loads(delivery.payload)
    assert payload["status"] == "success"
    # Links name the output's public name; the row, the file this run stored under its own name.
    assert payload["output"] == f"{runtime.settings.public_url}/outputs/{job.file_prefix}-0.png"
    assert job.outputs[0].filename.startswith(f"{job.file_prefix}-0-1-")
    assert published_deliveries(runtime.settings) == [delivery.id]


def test_running_a_finished_job_again_changes_nothing(
    runtime: WorkerRuntime, api_key: IssuedKey, image_server: ImageServer, receiver: WebhookReceiver
) -> None:
    job_id = new_job(runtime, api_key, receiver.url, init_images=[image_server.url("/red.png")])
    run_job(job_id, runtime)
    first = load(runtime, job_id)
    first_file = runtime.settings.outputs_dir / first.outputs[0].filename
    mtime = first_file.stat().st_mtime_ns

    run_job(job_id, runtime)  # a duplicate message

    with session_scope(runtime.settings.resolved_database_url) as session:
        assert count_rows(session, "job_outputs", f"job_id = {job_id}") == 2
        assert count_rows(session, "webhook_deliveries", f"job_id = {job_id}") == 1
    assert load(runtime, job_id).attempts == 1
    assert first_file.stat().st_mtime_ns == mtime


def test_a_job_rerun_after_its_worker_died_gives_the_same_single_result(
    runtime: WorkerRuntime, api_key: IssuedKey, image_server: ImageServer
) -> None:
    url = image_server.url("/blue.png")
    reference_id = new_job(runtime, api_key, None, init_images=[url])
    run_job(reference_id, runtime)
    orphan_id = new_job(runtime, api_key, None, init_images=[url])
    with session_scope(runtime.settings.resolved_database_url) as session:
        # As if a worker had claimed it and vanished: processing, lease long expired.
        session.execute(
            update(Job)
            .where(Job.id == orphan_id)
            .values(
                state=JobState.PROCESSING, attempts=1, lease_until=utcnow() - timedelta(hours=1)
            )
        )

    run_job(orphan_id, runtime)

    orphan, reference = load(runtime, orphan_id), load(runtime, reference_id)
    assert orphan.state == JobState.SUCCESS
    assert orphan.attempts == 2
    assert len(orphan.outputs) == 2
    outputs = runtime.settings.outputs_dir
    for mine, theirs in zip(orphan.outputs, reference.outputs, strict=True):
        assert (outputs / mine.filename).read_bytes() == (outputs / theirs.filename).read_bytes()


@pytest.mark.parametrize(
    ("path", "reason"),
    [("/text.txt", "not a PNG, JPEG or WebP image"), ("/missing.png", "HTTP 404")],
)
def test_bad_init_image_fails_the_job_with_the_reason(
    runtime: WorkerRuntime,
    api_key: IssuedKey,
    image_server: ImageServer,
    receiver: WebhookReceiver,
    path: str,
    reason: str,
) -> None:
    job_id = new_job(runtime, api_key, receiver.url, init_images=[image_server.url(path)])

    run_job(job_id, runtime)

    job = load(runtime, job_id)
    assert job.state == JobState.FAILED
    assert job.error == f"Unable to fetch image from provided URL: {reason}"
    assert job.outputs == []
    with session_scope(runtime.settings.resolved_database_url) as session:
        delivery = webhooks.get_delivery_for_job(session, job_id)
        assert delivery is not None
        assert json.loads(delivery.payload)["status"] == "failed"


def test_init_image_on_a_refused_address_fails_without_a_request(
    runtime: WorkerRuntime, api_key: IssuedKey, image_server: ImageServer
) -> None:
    guarded = WorkerRuntime(
        settings=runtime.settings.model_copy(update={"url_allowlist": []}),
        broker=runtime.broker,
        cache=runtime.cache,
    )
    seen = len(image_server.requests)
    job_id = new_job(guarded, api_key, None, init_images=[image_server.url("/red.png")])

    run_job(job_id, guarded)

    job = load(guarded, job_id)
    assert job.state == JobState.FAILED
    assert job.error is not None
    assert "non-public address" in job.error
    assert len(image_server.requests) == seen


def test_a_job_out_of_attempts_fails_and_says_why(
    runtime: WorkerRuntime, api_key: IssuedKey, image_server: ImageServer
) -> None:
    job_id = new_job(runtime, api_key, None, init_images=[image_server.url("/red.png")])
    attempts = runtime.settings.job_max_attempts
    with session_scope(runtime.settings.resolved_database_url) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(state=JobState.PROCESSING, attempts=attempts, lease_until=utcnow())
        )

    run_job(job_id, runtime)

    job = load(runtime, job_id)
    assert job.state == JobState.FAILED
    assert job.error == exhausted_message(attempts)


def test_base64_in_and_out(runtime: WorkerRuntime, api_key: IssuedKey) -> None:
    inline = (
        "data:application/octet-stream;base64,"
        + base64.b64encode(png(96, 64, (10, 200, 10))).decode()
    )
    job_id = new_job(
        runtime,
        api_key,
        "http://127.0.0.1:9/never-called",
        operation=Operation.IMG2IMG,
        init_images=[inline],
        samples=1,
        base64_output=True,
    )

    run_job(job_id, runtime)

    job = load(runtime, job_id)
    assert job.state == JobState.SUCCESS, job.error
    with session_scope(runtime.settings.resolved_database_url) as session:
        delivery = webhooks.get_delivery_for_job(session, job_id)
        assert delivery is not None
        payload = json.loads(delivery.payload)
    stored = (runtime.settings.outputs_dir / job.outputs[0].filename).read_bytes()
    assert payload["output"] == [base64.b64encode(stored).decode()]
    assert (job.meta["W"], job.meta["H"]) == (96, 64)


def test_temporary_outputs_expire_and_their_files_are_deleted(
    runtime: WorkerRuntime, api_key: IssuedKey, image_server: ImageServer
) -> None:
    job_id = new_job(
        runtime, api_key, None, init_images=[image_server.url("/red.png")], samples=1, temp=True
    )
    run_job(job_id, runtime)
    job = load(runtime, job_id)
    [output] = job.outputs
    assert output.expires_at is not None
    lifetime = output.expires_at - utcnow()
    assert timedelta(hours=23, minutes=59) < lifetime <= timedelta(hours=24)
    path = runtime.settings.outputs_dir / output.filename
    assert path.is_file()

    with session_scope(runtime.settings.resolved_database_url) as session:
        session.execute(
            update(JobOutput)
            .where(JobOutput.id == output.id)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    # The sweeper's fourth duty alone: a whole sweep_once would also act on the rows other
    # tests leave in the shared database.
    assert expire_temporary_outputs(runtime.settings) >= 1
    assert not path.exists()
    assert load(runtime, job_id).outputs[0].deleted_at is not None


def test_every_enterprise_option_runs_and_flags_are_recorded(
    runtime: WorkerRuntime, api_key: IssuedKey, image_server: ImageServer
) -> None:
    job_id = new_job(
        runtime,
        api_key,
        None,
        operation=Operation.IMG2IMG,
        prompt="a landscape [[nsfw-test]] emb-one",
        init_images=[image_server.url("/red.png")],
        steps=4,
        strength=0.75,
        scheduler="DPMSolverMultistepScheduler",
        use_karras_sigmas=True,
        algorithm_type="dpmsolver+++",
        loras=[{"name": "lora-a", "strength": 0.5}, {"name": "lora-b", "strength": 1.0}],
        vae="vae-x",
        embeddings=["emb-one"],
        clip_skip=2,
        tomesd=True,
        safety_checker=True,
        safety_checker_type="black",
    )

    run_job(job_id, runtime)

    job = load(runtime, job_id)
    assert job.state == JobState.SUCCESS, job.error
    assert job.meta["nsfw_content_detected"] == [True, True]
    assert [output.nsfw for output in job.outputs] == [True, True]
    with Image.open(runtime.settings.outputs_dir / job.outputs[0].filename) as image:
        assert image.getextrema() == ((0, 0), (0, 0), (0, 0))  # "black" replaced the sample


def test_a_running_job_stops_between_steps_when_canceled(
    runtime: WorkerRuntime, api_key: IssuedKey, image_server: ImageServer
) -> None:
    job_id = new_job(
        runtime,
        api_key,
        None,
        operation=Operation.IMG2IMG,
        init_images=[image_server.url("/red.png")],
        width=512,
        height=512,
        steps=50,
        strength=1.0,
        samples=1,
    )
    worker = threading.Thread(target=run_job, args=(job_id, runtime))
    worker.start()
    while load(runtime, job_id).state == JobState.QUEUED:
        time.sleep(0.05)
    with session_scope(runtime.settings.resolved_database_url) as session:
        jobs.request_cancel(session, job_id)
    worker.join(timeout=60)

    job = load(runtime, job_id)
    assert job.state == JobState.FAILED
    assert job.error == CANCELED_MESSAGE
    assert job.outputs == []
    assert not list(runtime.settings.outputs_dir.glob(f"{job.file_prefix}-*"))


def test_a_job_whose_parameters_cannot_be_read_fails_instead_of_looping(
    runtime: WorkerRuntime, api_key: IssuedKey
) -> None:
    job_id = queued_job(runtime.settings, api_key.row.id, params={"samples": 1})

    run_job(job_id, runtime)

    job = load(runtime, job_id)
    assert job.state == JobState.FAILED
    assert job.error == INTERNAL_ERROR


def rejections(operation: Operation) -> float:
    """The failures of `operation` counted as rejected input so far in this process."""
    labels = {"operation": operation.value, "reason": FailureReason.REJECTED.value}
    return REGISTRY.get_sample_value("darkroom_job_failures_total", labels) or 0.0


@pytest.mark.parametrize(
    "operation", [Operation.IMG2IMG, Operation.PIX2PIX, Operation.IMG_MIXER], ids=str
)
def test_a_damaged_init_image_is_a_rejected_input_not_an_internal_error(
    runtime: WorkerRuntime, api_key: IssuedKey, operation: Operation
) -> None:
    """A PNG cut inside its header: Pillow's OSError is the client's fault, said in its words."""
    inline = "data:image/png;base64," + base64.b64encode(png(64, 64, (1, 2, 3))[:20]).decode()
    images = [inline] * (2 if operation == Operation.IMG_MIXER else 1)
    weights = [1.0, 1.0] if operation == Operation.IMG_MIXER else None
    before = rejections(operation)
    job_id = new_job(
        runtime,
        api_key,
        None,
        operation=operation,
        init_images=images,
        image_weights=weights,
        samples=1,
    )

    run_job(job_id, runtime)

    job = load(runtime, job_id)
    assert job.state == JobState.FAILED
    assert job.error == "Unable to fetch image from provided URL: the image data is damaged"
    assert rejections(operation) == before + 1
