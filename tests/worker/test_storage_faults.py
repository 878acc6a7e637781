"""Storage faults are storage faults: a write the storage refuses is retried with backoff,
with the images in memory (the pipeline runs once), then the job fails saying the images
could not be stored, counted under the `storage` reason (docs/RELIABILITY.md).

The tests run as root, which ignores file permissions: the local fault is an outputs folder
replaced by a file after the worker started (every write then fails with ENOTDIR, whoever
runs it); the S3 fault is a moto server on loopback without the bucket.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from darkroom.identities import Operation
from darkroom.jobspec import JobSpec
from darkroom.queue import make_celery
from darkroom.settings import Settings
from db.models import Job, JobState
from db.repositories import jobs, webhooks
from db.repositories.keys import IssuedKey
from db.session import session_scope
from tests.support.rows import queued_job
from tests.support.s3 import moto_s3
from tests.support.servers import ImageServer
from worker.jobs import WorkerRuntime, run_job
from worker.models.cache import ModelCache

ATTEMPTS, BACKOFF_S = 3, 0.05


def own_runtime(
    settings: Settings, tiny_settings: Settings, cache: ModelCache, data_dir: Path, **fields: object
) -> WorkerRuntime:
    """A worker runtime with an outputs folder of its own (the tiny models shared)."""
    data_dir.mkdir()
    (data_dir / "tiny-models").symlink_to(tiny_settings.tiny_models_dir)
    values = {
        "data_dir": data_dir,
        "storage_write_attempts": ATTEMPTS,
        "storage_retry_backoff_s": BACKOFF_S,
        **fields,
    }
    own = Settings.model_validate({**settings.model_dump(), **values})
    return WorkerRuntime(settings=own, broker=make_celery(own), cache=cache)


def new_job(settings: Settings, key: IssuedKey, image_url: str) -> int:
    spec = JobSpec(
        operation=Operation.PIX2PIX,
        prompt="make it blue",
        init_images=[image_url],
        steps=2,
        guidance_scale=7.0,
        seed=7,
        samples=2,
    )
    return queued_job(settings, key.row.id, spec=spec, webhook="http://127.0.0.1:9/")


def load(settings: Settings, job_id: int) -> tuple[Job, str]:
    with session_scope(settings.resolved_database_url) as session:
        job = jobs.get_job(session, job_id)
        assert job is not None
        delivery = webhooks.get_delivery_for_job(session, job_id)
        assert delivery is not None
        assert job.outputs is not None  # loaded while the session is open
        session.expunge(job)
        return job, delivery.payload


def counter(name: str, **labels: str) -> float:
    """The sum of a Prometheus counter's samples matching `labels` in this process."""
    total = 0.0
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def pipeline_runs() -> float:
    """Model cache lookups of the pix2pix pipeline: one per pipeline run of these jobs."""
    return counter("darkroom_model_cache_lookups_total", kind="pix2pix")


def storage_failures() -> float:
    return counter("darkroom_job_failures_total", operation="pix2pix", reason="storage")


def retries(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("writing output ")]


@pytest.fixture
def blocked(
    tmp_path: Path, settings: Settings, tiny_settings: Settings, model_cache: ModelCache
) -> WorkerRuntime:
    """A worker runtime of its own whose outputs folder is an empty file instead: every write
    into it fails (ENOTDIR), root's too."""
    runtime = own_runtime(settings, tiny_settings, model_cache, tmp_path / "data")
    outputs = runtime.settings.outputs_dir
    outputs.rmdir()
    outputs.write_bytes(b"")
    return runtime


def test_an_unwritable_outputs_folder_fails_the_job_as_a_storage_fault(
    blocked: WorkerRuntime,
    api_key: IssuedKey,
    image_server: ImageServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runtime = blocked
    outputs = runtime.settings.outputs_dir
    job_id = new_job(runtime.settings, api_key, image_server.url("/red.png"))
    runs, failures = pipeline_runs(), storage_failures()

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="worker.recording"):
        run_job(job_id, runtime)
    elapsed = time.monotonic() - started

    job, payload = load(runtime.settings, job_id)
    message = "The images were generated but could not be stored: not a directory."
    assert (job.state, job.error, job.outputs, job.attempts) == (JobState.FAILED, message, [], 1)
    assert json.loads(payload)["message"] == message
    assert pipeline_runs() - runs == 1
    assert storage_failures() - failures == 1
    tries = retries(caplog)
    assert [r.getMessage().split(": try ")[1][:6] for r in tries] == ["2 of 3", "3 of 3"]
    assert elapsed >= BACKOFF_S + 2 * BACKOFF_S
    assert outputs.read_bytes() == b""


def test_a_write_that_succeeds_on_a_retry_keeps_the_generated_images(
    blocked: WorkerRuntime,
    api_key: IssuedKey,
    image_server: ImageServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runtime = blocked
    outputs = runtime.settings.outputs_dir

    class Repair(logging.Handler):
        """The operator frees the folder while the worker waits to try again."""

        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("writing output ") and outputs.is_file():
                outputs.unlink()
                outputs.mkdir()

    repair = Repair()
    logging.getLogger("worker.recording").addHandler(repair)
    job_id = new_job(runtime.settings, api_key, image_server.url("/red.png"))
    runs = pipeline_runs()
    try:
        with caplog.at_level(logging.WARNING, logger="worker.recording"):
            run_job(job_id, runtime)
    finally:
        logging.getLogger("worker.recording").removeHandler(repair)

    job, _payload = load(runtime.settings, job_id)
    assert job.state == JobState.SUCCESS, job.error
    assert pipeline_runs() - runs == 1
    assert len(retries(caplog)) == 1
    assert sorted(p.name for p in outputs.iterdir()) == sorted(o.filename for o in job.outputs)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free loopback port, and AWS credentials in the environment."""
    with moto_s3() as endpoint:
        yield endpoint


def test_a_missing_bucket_fails_the_job_as_a_storage_fault(
    tmp_path: Path,
    settings: Settings,
    tiny_settings: Settings,
    model_cache: ModelCache,
    api_key: IssuedKey,
    image_server: ImageServer,
    s3_endpoint: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runtime = own_runtime(
        settings,
        tiny_settings,
        model_cache,
        tmp_path / "data",
        storage="s3",
        s3_bucket=f"missing-{uuid.uuid4().hex[:12]}",
        s3_endpoint_url=s3_endpoint,
        s3_region="us-east-1",
    )
    job_id = new_job(runtime.settings, api_key, image_server.url("/red.png"))
    runs, failures = pipeline_runs(), storage_failures()

    with caplog.at_level(logging.WARNING, logger="worker.recording"):
        run_job(job_id, runtime)

    job, _payload = load(runtime.settings, job_id)
    assert job.state == JobState.FAILED
    assert job.error == (
        "The images were generated but could not be stored: "
        "the storage service answered NoSuchBucket."
    )
    assert runtime.settings.s3_bucket not in (job.error or "")
    assert pipeline_runs() - runs == 1
    assert storage_failures() - failures == 1
    assert len(retries(caplog)) == ATTEMPTS - 1
