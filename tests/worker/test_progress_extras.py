"""Live progress extras (issue 16): preview images projected from the latents, shown by the
server-sent `progress` events, and opt-in `start`/`progress` webhooks sent by the dispatcher.

Real parts throughout: worker.jobs.run_job with the tiny models on Postgres, the API's event
stream read by an SSE reader, the dispatcher's progress sender POSTing to a loopback receiver
whose signatures are checked, the sweeper pruning what ended.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from standardwebhooks.webhooks import Webhook

from api.app import create_app
from darkroom.queue import make_celery
from darkroom.settings import Settings
from db.models import Job, JobPreview, JobState, WebhookDelivery
from db.repositories import progress, webhooks
from db.repositories.keys import IssuedKey
from db.session import session_scope
from services.progress_events import parse_filter
from tests.api.test_events import EventReader
from tests.support.servers import ImageServer, WebhookReceiver
from tests.worker.test_jobs import load, new_job
from worker import previews
from worker.jobs import WorkerRuntime, run_job
from worker.models.cache import ModelCache
from worker.sweeper import prune_progress
from worker.webhooks.dispatcher import deliver
from worker.webhooks.progress import send_due


@pytest.fixture
def runtime(settings: Settings, tiny_settings: Settings, model_cache: ModelCache) -> WorkerRuntime:
    """A worker's runtime on the test database, reusing the session's tiny models."""
    shared = settings.model_copy(update={"data_dir": tiny_settings.data_dir})
    return WorkerRuntime(settings=shared, broker=make_celery(shared), cache=model_cache)


def _with(runtime: WorkerRuntime, **changes: Any) -> WorkerRuntime:
    """The runtime with some settings changed (same model cache)."""
    runtime.settings = runtime.settings.model_copy(update=changes)
    return runtime


# --- the projection ---------------------------------------------------------------------------


def test_sd_latents_project_through_the_known_factors() -> None:
    latent = torch.zeros(4, 8, 8)
    latent[0] = 1.0  # channel 0 alone: SD's first row of factors
    rgb = previews.to_rgb(latent, "StableDiffusionImg2ImgPipeline")
    expected = [(0.3512 + 1) / 2, (0.2297 + 1) / 2, (0.3227 + 1) / 2]
    assert rgb[:, 3, 3].tolist() == pytest.approx(expected, abs=1e-4)
    xl = previews.to_rgb(latent, "StableDiffusionXLImg2ImgPipeline")
    assert xl[:, 0, 0].tolist() == pytest.approx(
        [(0.3651 + 0.1084 + 1) / 2, (0.4232 - 0.0175 + 1) / 2, (0.4341 - 0.0011 + 1) / 2], abs=1e-4
    )


def test_flux_packed_latents_unpack_as_diffusers_packs_them() -> None:
    from diffusers import FluxImg2ImgPipeline

    latents = torch.randn(1, 16, 12, 8)  # a 96x64 image's latents (h=12, w=8)
    packed = FluxImg2ImgPipeline._pack_latents(latents, 1, 16, 12, 8)
    unpacked = previews.unpack(packed[0], width=64, height=96)
    assert unpacked is not None
    assert torch.equal(unpacked, latents[0])
    image = previews.preview_of(packed[0], "FluxImg2ImgPipeline", 64, 96)
    assert image is not None
    with Image.open(io.BytesIO(image)) as shown:
        assert shown.size == (8, 12)


def test_a_preview_is_a_small_jpeg_whatever_the_size() -> None:
    big = torch.randn(4, 160, 96)  # a 1280x768 request's latents
    image = previews.preview_of(big, "StableDiffusionXLImg2ImgPipeline", 768, 1280)
    assert image is not None
    with Image.open(io.BytesIO(image)) as shown:
        assert shown.format == "JPEG"
        assert max(shown.size) <= previews.PREVIEW_MAX_SIDE
    assert len(image) < 8_000
    odd = previews.to_rgb(torch.randn(8, 4, 4), "StableDiffusionImg2ImgPipeline")
    assert odd.shape == (3, 4, 4)
    assert 0 <= float(odd.min()) <= float(odd.max()) <= 1


def test_each_job_of_a_batch_gets_its_first_samples_preview_every_k_steps() -> None:
    tap = previews.LatentTap(torch.randn(3, 4, 8, 8), "StableDiffusionImg2ImgPipeline")
    # job 0 has two samples, job 1 one: job 1's first sample is the batch's third
    maker = previews.PreviewMaker(tap, every=3, samples=[2, 1], sizes=[(64, 64), (64, 64)])
    made = maker.previews([0, 1], done=1)
    assert made[1] == previews.preview_of(tap.latents[2], tap.pipeline, 64, 64)  # type: ignore[index]
    assert made[0] == previews.preview_of(tap.latents[0], tap.pipeline, 64, 64)  # type: ignore[index]
    assert maker.previews([0, 1], done=2) == {}  # not due: every 3 steps
    assert set(maker.previews([0, 1], done=4)) == {0, 1}
    assert set(maker.previews([1], done=1)) == set()  # 3 latents, 1 sample: layout unknown
    tap.latents = torch.randn(1, 4, 8, 8)
    assert set(maker.previews([1], done=1)) == {1}  # the batch's next call starts again


def test_events_filter_reads_lists_and_comma_strings() -> None:
    assert parse_filter("progress, start") == ["start", "progress"]
    assert parse_filter(["completed"]) == ["completed"]
    assert parse_filter(None) is None
    with pytest.raises(ValueError, match="allowed are start, progress, completed"):
        parse_filter("done")
    with pytest.raises(ValueError, match="list or a comma-separated string"):
        parse_filter(5)


# --- previews from a real run -----------------------------------------------------------------


def test_a_running_job_streams_previews_and_they_are_pruned_after(
    runtime: WorkerRuntime, api_key: IssuedKey, image_server: ImageServer
) -> None:
    runtime = _with(runtime, preview_every_steps=1, events_poll_s=0.1)
    settings = runtime.settings
    job_id = new_job(
        runtime, api_key, None, init_images=[image_server.url("/red.png")], steps=60, samples=1
    )
    seen: list[tuple[str, dict[str, Any]]] = []
    with TestClient(create_app(settings)) as api:
        path = f"/api/v1/jobs/{job_id}/events"
        with api.stream("GET", path, params={"key": api_key.plaintext}) as answer:
            events = EventReader(answer.iter_lines())
            seen.append(events.next())
            worker = threading.Thread(target=run_job, args=(job_id, runtime))
            worker.start()
            while seen[-1][0] not in ("success", "failed"):
                seen.append(events.next())
            worker.join(timeout=120)
    assert seen[-1][0] == "success", seen[-1]
    shown = [data for name, data in seen if name == "progress" and "preview" in data]
    assert shown, [name for name, _ in seen]
    media, encoded = shown[-1]["preview"].split(",", 1)
    assert media == "data:image/jpeg;base64"
    with Image.open(io.BytesIO(base64.b64decode(encoded))) as image:
        assert image.format == "JPEG"
        assert max(image.size) <= previews.PREVIEW_MAX_SIDE
    assert 0 <= shown[-1]["preview_step"] <= 60
    # The terminal event shows no preview; the stored one goes at the next sweep.
    assert "preview" not in seen[-1][1]
    with session_scope(settings.resolved_database_url) as session:
        assert session.get(JobPreview, job_id) is not None
    assert prune_progress(settings) >= 1
    with session_scope(settings.resolved_database_url) as session:
        assert session.get(JobPreview, job_id) is None


def test_previews_off_stores_none(
    runtime: WorkerRuntime, api_key: IssuedKey, image_server: ImageServer
) -> None:
    runtime = _with(runtime, preview_every_steps=0)
    job_id = new_job(runtime, api_key, None, init_images=[image_server.url("/red.png")], steps=4)
    run_job(job_id, runtime)
    assert load(runtime, job_id).state == JobState.SUCCESS
    with session_scope(runtime.settings.resolved_database_url) as session:
        assert session.get(JobPreview, job_id) is None


# --- progress webhooks ------------------------------------------------------------------------


def _run_with_events(
    runtime: WorkerRuntime,
    api_key: IssuedKey,
    image_server: ImageServer,
    receiver: WebhookReceiver,
    events: list[str],
    steps: int = 40,
) -> int:
    job_id = new_job(
        runtime, api_key, receiver.url, init_images=[image_server.url("/red.png")], steps=steps
    )
    with session_scope(runtime.settings.resolved_database_url) as session:
        row = session.get_one(Job, job_id)
        row.meta = {**row.meta, "webhook_events_filter": events}
    run_job(job_id, runtime)
    assert load(runtime, job_id).state == JobState.SUCCESS
    return job_id


def _deliver_terminal(settings: Settings, job_id: int) -> None:
    with session_scope(settings.resolved_database_url) as session:
        delivery = webhooks.get_delivery_for_job(session, job_id)
        assert delivery is not None
        delivery_id = delivery.id
    deliver(delivery_id, settings)


def test_start_and_progress_webhooks_are_signed_once_each_and_bounded(
    runtime: WorkerRuntime,
    api_key: IssuedKey,
    image_server: ImageServer,
    receiver: WebhookReceiver,
) -> None:
    runtime = _with(runtime, progress_webhook_every_s=0.5, progress_webhook_max=2)
    settings = runtime.settings
    job_id = _run_with_events(
        runtime, api_key, image_server, receiver, ["start", "progress", "completed"], steps=80
    )
    assert receiver.snapshot() == []  # the GPU worker sends nothing itself
    sent = send_due(settings)
    _deliver_terminal(settings, job_id)

    got = receiver.snapshot()
    bodies = [Webhook(api_key.row.webhook_secret).verify(r.body, r.headers) for r in got]
    events = [r.headers.get("webhook-event") for r in got]
    assert events[0] == "start"
    assert 1 <= events.count("progress") <= 2  # bounded by DARKROOM_PROGRESS_WEBHOOK_MAX
    assert events[-1] is None  # the terminal one, as before
    assert sent == len(got) - 1
    assert [b.get("event") for b in bodies[:-1]] == events[:-1]
    assert bodies[-1]["status"] == "success"
    for body in bodies[1:-1]:
        assert (body["id"], body["steps"]) == (job_id, 80)
        assert 0 <= body["step"] <= 80
    assert len({r.headers["webhook-id"] for r in got}) == len(got)
    with session_scope(settings.resolved_database_url) as session:
        rows = progress.deliveries_for_job(session, job_id)
        assert [row.state for row in rows] == ["delivered"] * len(rows)
        assert all(row.status_code == 200 and row.attempted_at for row in rows)
        terminal = session.query(WebhookDelivery).filter_by(job_id=job_id).all()
        assert len(terminal) == 1  # one terminal delivery per job, whatever else was sent


def test_a_failed_progress_webhook_is_recorded_and_never_retried(
    runtime: WorkerRuntime,
    api_key: IssuedKey,
    image_server: ImageServer,
    receiver: WebhookReceiver,
) -> None:
    settings = runtime.settings
    receiver.respond = lambda request: (
        (500, {}) if request.headers.get("webhook-event") else (200, {})
    )
    job_id = _run_with_events(runtime, api_key, image_server, receiver, ["start", "completed"])
    assert send_due(settings) == 1
    assert send_due(settings) == 0  # failed once: never attempted again
    _deliver_terminal(settings, job_id)
    got = receiver.snapshot()
    assert [r.headers.get("webhook-event") for r in got] == ["start", None]
    with session_scope(settings.resolved_database_url) as session:
        [row] = progress.deliveries_for_job(session, job_id)
        assert (row.state, row.status_code, row.event) == ("failed", 500, "start")


def test_without_a_filter_only_the_terminal_webhook_is_recorded(
    runtime: WorkerRuntime,
    api_key: IssuedKey,
    image_server: ImageServer,
    receiver: WebhookReceiver,
) -> None:
    job_id = new_job(runtime, api_key, receiver.url, init_images=[image_server.url("/red.png")])
    run_job(job_id, runtime)
    with session_scope(runtime.settings.resolved_database_url) as session:
        assert progress.deliveries_for_job(session, job_id) == []
        assert webhooks.get_delivery_for_job(session, job_id) is not None


def test_the_api_keeps_the_filter_and_refuses_unknown_events(
    settings: Settings, api_key: IssuedKey, image_server: ImageServer
) -> None:
    body = {
        "key": api_key.plaintext,
        "prompt": "make it blue",
        "init_image": image_server.url("/red.png"),
        "webhook": "http://127.0.0.1:9/h",
    }
    with TestClient(create_app(settings)) as api:
        bad = api.post("/api/v5/pix2pix", json={**body, "webhook_events_filter": "started"})
        assert bad.status_code == 422, bad.text
        assert "webhook_events_filter" in json.dumps(bad.json())
        good = api.post("/api/v5/pix2pix", json={**body, "webhook_events_filter": "start,progress"})
        assert good.status_code == 200, good.text
        job_id = good.json()["id"]
    with session_scope(settings.resolved_database_url) as session:
        job = session.get_one(Job, job_id)
        assert job.meta["webhook_events_filter"] == ["start", "progress"]


def test_progress_webhooks_of_an_ended_job_are_given_up_by_the_sweeper(
    runtime: WorkerRuntime, api_key: IssuedKey, image_server: ImageServer, receiver: WebhookReceiver
) -> None:
    job_id = _run_with_events(runtime, api_key, image_server, receiver, ["start", "completed"])
    started = time.monotonic()
    prune_progress(runtime.settings)
    assert time.monotonic() - started < 10
    with session_scope(runtime.settings.resolved_database_url) as session:
        [row] = progress.deliveries_for_job(session, job_id)
        assert (row.state, row.attempted_at) == ("failed", None)
