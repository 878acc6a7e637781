"""The dashboard in headless Chromium against a real API process: rendered rows, thumbnails,
timeline and webhook attempts, and a screenshot that is the right size and not blank.

Chromium comes from Debian (`scripts/system-deps.sh`). Without it the test is skipped, except in
CI (CI=true), where it must run. DARKROOM_DOCS_SCREENSHOT=1 also copies the screenshot to
docs/dashboard.png.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageStat

from darkroom.identities import FailureReason, Operation
from darkroom.jobspec import JobSpec
from darkroom.settings import Settings
from darkroom.storage import make_storage
from db.repositories import jobs, routing
from db.repositories.keys import create_key
from db.session import session_scope
from services import outcomes
from tests.support.rows import job_row
from tests.support.servers import ImageServer, WebhookReceiver, png
from tests.support.system import free_port
from worker.webhooks.dispatcher import deliver

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "5d1e8b3f9a0c47e2b6d4a8f1c3e7092b"
WINDOW = (1280, 900)
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() and os.environ.get("CI") != "true",
    reason="chromium is not installed (scripts/system-deps.sh installs it)",
)


@dataclass(frozen=True)
class Seeded:
    """The jobs the page must show."""

    done: int
    failed: int
    queued: int
    input_url: str


def _job(
    settings: Settings, key_id: int, operation: Operation, images: list[str], hook: str | None
) -> int:
    spec = JobSpec(
        operation=operation,
        prompt="a lighthouse at dusk",
        init_images=images,
        steps=2,
        guidance_scale=7.0,
        seed=42,
    )
    with session_scope(settings.resolved_database_url) as session:
        job = job_row(session, key_id, spec=spec, track_id="t-1", webhook=hook)
        routing.mark_published(session, [job.id], settings.job_queue)
        return job.id


def _seed(settings: Settings, image_server: ImageServer, receiver: WebhookReceiver) -> Seeded:
    """A finished job with an output PNG and a webhook delivered on its second attempt, a failed
    job and a queued one."""
    with session_scope(settings.resolved_database_url) as session:
        key_id = create_key(session, "browser").row.id
    red = image_server.url("/red.png")
    images = [red, image_server.url("/blue.png")]
    done = _job(settings, key_id, Operation.IMG_MIXER, images, receiver.url)
    failed = _job(settings, key_id, Operation.PIX2PIX, ["data:image/png;base64,AAAA"], None)
    with session_scope(settings.resolved_database_url) as session:
        for job_id in (done, failed):
            jobs.claim_job(session, job_id, lease_s=60, max_attempts=3)
        job = jobs.get_job(session, done)
        assert job is not None
        name = f"{job.file_prefix}-0.png"
        make_storage(settings).save(name, png(128, 128, (230, 120, 40)))
        output = jobs.OutputRecord(0, name, 128, 128, 42)
        delivery_id = outcomes.succeed(
            session, settings, job, outputs=[output], meta=job.meta, generation_time=2.4
        )
        failed_job = jobs.get_job(session, failed)
        assert failed_job is not None
        outcomes.fail(
            session,
            settings,
            failed_job,
            "The init image could not be read.",
            reason=FailureReason.REJECTED,
        )
    queued = _job(settings, key_id, Operation.IMG2IMG, [red], None)
    assert delivery_id is not None
    answers: Iterator[tuple[int, dict[str, str]]] = iter([(500, {}), (200, {})])
    receiver.respond = lambda _r: next(answers)
    deliver(delivery_id, settings)
    time.sleep(0.3)  # the test schedule's retry wait
    deliver(delivery_id, settings)
    return Seeded(done, failed, queued, red)


@pytest.fixture
def api_url(settings: Settings, own_pg_url: str, tmp_path: Path) -> Iterator[str]:
    """`darkroom api` with the dashboard on, on a database of its own; its base URL."""
    port = free_port()
    env = {
        **os.environ,
        "DARKROOM_DATABASE_URL": own_pg_url,
        "DARKROOM_BROKER_URL": settings.resolved_broker_url,
        "DARKROOM_DATA_DIR": str(settings.data_dir),
        "DARKROOM_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "DARKROOM_ADMIN_TOKEN": TOKEN,
    }
    log = (tmp_path / "api.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "api", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, process)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _wait_healthy(base: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the API exited early"
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"the API was not healthy within {timeout}s")


def chromium(tmp_path: Path, *args: str) -> str:
    """Run headless Chromium once (a fresh profile, no network beyond the page); its stdout."""
    done = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            "--virtual-time-budget=8000",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout


def test_the_dashboard_renders_jobs_thumbnails_timeline_and_attempts(
    settings: Settings,
    own_pg_url: str,
    api_url: str,
    image_server: ImageServer,
    receiver: WebhookReceiver,
    tmp_path: Path,
) -> None:
    seeded = _seed(settings.model_copy(update={"database_url": own_pg_url}), image_server, receiver)
    page = f"{api_url}/dashboard#token={TOKEN}&job={seeded.done}"
    fetched_before = list(image_server.requests)

    dom = chromium(tmp_path, "--dump-dom", page)

    for job_id in (seeded.done, seeded.failed, seeded.queued):
        assert f'data-job-id="{job_id}"' in dom
    assert _loaded(dom, "output")
    assert "/red.png" in dom  # the input is shown as text...
    assert image_server.requests == fetched_before  # ...loaded by nobody, the browser included
    assert "inline · 1 kB" in dom
    assert f"Job #{seeded.done}" in dom
    assert "webhook attempt" in dom
    assert "#1: HTTP 500 in" in dom
    assert "HTTP 200" in dom
    assert "webhook delivered" in dom
    assert "The init image could not be read." in dom

    shot = tmp_path / "dashboard.png"
    chromium(tmp_path, f"--screenshot={shot}", page)
    with Image.open(shot) as image:
        assert image.size == WINDOW
        rgb = image.convert("RGB")
        assert len(rgb.getcolors(maxcolors=1 << 20) or []) > 50  # text, badges, thumbnails
        assert max(ImageStat.Stat(rgb).stddev) > 20
        assert rgb.getpixel((20, 20)) != rgb.getpixel((640, 450))
    if os.environ.get("DARKROOM_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(shot, DOCS_SCREENSHOT)


def _loaded(dom: str, kind: str) -> bool:
    """Whether an <img class="thumb KIND"> in the dumped DOM finished loading."""
    for tag in dom.split("<img")[1:]:
        attributes = tag.split(">", 1)[0]
        if f'class="thumb {kind}"' in attributes and 'data-loaded="true"' in attributes:
            return True
    return False
