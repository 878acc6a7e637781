"""Fencing: a run whose claim was superseded can neither renew its lease, nor replace the
winner's file, nor record a result (docs/RELIABILITY.md, "Fencing and storage faults").

The stall is made deterministic with a gated image host: the stale run is held in its init
image fetch (after its claim) until the test lets it go. Each run gets a different image, so
a stale run that overwrote the winner's file would change its bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text, update

from api.app import create_app
from darkroom.identities import Operation
from darkroom.jobspec import JobSpec
from darkroom.queue import make_celery
from darkroom.settings import Settings
from darkroom.storage import LocalStorage
from db.models import Job, JobOutput, JobState
from db.repositories import jobs, webhooks
from db.repositories.jobs import ClaimOutcome
from db.repositories.keys import IssuedKey
from db.session import session_scope
from services.responses import run_output_filename
from tests.support.rows import queued_job
from tests.support.servers import WebhookReceiver, png
from tests.support.system import settings_env
from worker.jobs import WorkerRuntime, run_job
from worker.models.cache import ModelCache

RED, BLUE = png(64, 64, (200, 30, 30)), png(64, 64, (30, 30, 200))


class GatedImages:
    """A loopback image host: the n-th request gets `images[n]` once gate n is opened (gates
    beyond the list are open); 404 where the image is None."""

    def __init__(self, images: list[bytes | None], held: set[int]) -> None:
        self.images = images
        self.gates = {n: threading.Event() for n in held}
        self.arrived: list[threading.Event] = [threading.Event() for _ in images]
        self.count = 0
        self.lock = threading.Lock()
        gated = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with gated.lock:
                    n, gated.count = gated.count, gated.count + 1
                if n < len(gated.arrived):
                    gated.arrived[n].set()
                if n in gated.gates:
                    gated.gates[n].wait(120)
                body = gated.images[min(n, len(gated.images) - 1)]
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("content-type", "image/png")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/image.png"

    def wait_for(self, n: int) -> None:
        assert self.arrived[n].wait(120), f"request {n} never came"

    def open(self, n: int) -> None:
        self.gates[n].set()

    def close(self) -> None:
        for gate in self.gates.values():
            gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def gated() -> Iterator[list[GatedImages]]:
    """Gated image hosts a test makes (closed, their gates opened, when it ends)."""
    made: list[GatedImages] = []
    yield made
    for server in made:
        server.close()


@pytest.fixture
def runtime(settings: Settings, tiny_settings: Settings, model_cache: ModelCache) -> WorkerRuntime:
    shared = settings.model_copy(update={"data_dir": tiny_settings.data_dir})
    return WorkerRuntime(settings=shared, broker=make_celery(shared), cache=model_cache)


def new_job(settings: Settings, key: IssuedKey, image_url: str, webhook: str | None) -> int:
    spec = JobSpec(
        operation=Operation.PIX2PIX,
        prompt="make it blue",
        init_images=[image_url],
        steps=2,
        guidance_scale=7.0,
        seed=42,
    )
    return queued_job(settings, key.row.id, spec=spec, webhook=webhook)


def start_stale_run(runtime: WorkerRuntime, images: GatedImages, job_id: int) -> threading.Thread:
    """A run that claims the job (its first request to `images`), then stalls in its image
    fetch past its lease; the caller opens gate 0 to let it go on, and joins it. It runs in a
    worker of its own (another process's runtime: worker.held is per process)."""
    elsewhere = WorkerRuntime(settings=runtime.settings, broker=runtime.broker, cache=runtime.cache)
    stale = threading.Thread(target=run_job, args=(job_id, elsewhere))
    stale.start()
    images.wait_for(0)
    expire_lease(runtime.settings, job_id)
    return stale


def expire_lease(settings: Settings, job_id: int) -> None:
    """As if the holder stalled past its lease: expired on the database's clock."""
    with session_scope(settings.resolved_database_url) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(lease_until=func.now() - text("interval '1 second'"))
        )


@dataclass(frozen=True)
class Delivered:
    """What clients were given: the job row as recorded and the frozen webhook payload."""

    state: JobState
    attempts: int
    meta: dict[str, Any]
    outputs: list[tuple[int, str]]
    payload: str | None
    hashes: dict[str, str]


def delivered(settings: Settings, job_id: int) -> Delivered:
    """The job as recorded, and the hash of each file its outputs' public names resolve to."""
    with session_scope(settings.resolved_database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        delivery = webhooks.get_delivery_for_job(session, job_id)
        outputs = sorted((out.index, out.filename) for out in job.outputs)
        hashes = {}
        for index, _name in outputs:
            public = f"{job.file_prefix}-{index}.png"  # what the links and future_links name
            found = jobs.get_output(session, public)
            assert found is not None
            data = (settings.outputs_dir / found.filename).read_bytes()
            hashes[public] = hashlib.sha256(data).hexdigest()
        return Delivered(
            job.state,
            job.attempts,
            dict(job.meta),
            outputs,
            delivery.payload if delivery is not None else None,
            hashes,
        )


def served_hash(settings: Settings, link: str) -> str:
    """The hash of what the API serves at an output link (the route, not the disk)."""
    assert link.startswith(settings.public_url + "/outputs/")
    with TestClient(create_app(settings)) as client:
        answer = client.get(link.removeprefix(settings.public_url))
    assert answer.status_code == 200, answer.text
    return hashlib.sha256(answer.content).hexdigest()


def files_of(settings: Settings, job_id: int) -> list[str]:
    with session_scope(settings.resolved_database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        prefix = job.file_prefix
    return sorted(path.name for path in settings.outputs_dir.glob(f"{prefix}-*"))


def test_a_superseded_run_cannot_renew_overwrite_or_finish(
    runtime: WorkerRuntime,
    api_key: IssuedKey,
    receiver: WebhookReceiver,
    gated: list[GatedImages],
    caplog: pytest.LogCaptureFixture,
) -> None:
    images = GatedImages([RED, BLUE], held={0})
    gated.append(images)
    settings = runtime.settings
    job_id = new_job(settings, api_key, images.url, receiver.url)

    stale = start_stale_run(runtime, images, job_id)
    run_job(job_id, runtime)  # another worker claims it (attempt 2) and succeeds
    won = delivered(settings, job_id)
    assert (won.state, won.attempts) == (JobState.SUCCESS, 2)
    assert won.payload is not None
    assert json.loads(won.payload)["status"] == "success"

    link = json.loads(won.payload)["output"]  # v5 pix2pix: one link, the public name
    served = served_hash(settings, link)
    assert served == next(iter(won.hashes.values()))
    with caplog.at_level(logging.WARNING, logger="worker.recording"):
        images.open(0)  # the stale run goes on: red image, its own files, then its result
        stale.join(120)
    assert not stale.is_alive()

    assert any("was ended by another run" in r.getMessage() for r in caplog.records)
    assert delivered(settings, job_id) == won  # meta, outputs, payload and file bytes
    assert files_of(settings, job_id) == [name for _index, name in won.outputs]
    assert served_hash(settings, link) == served


def test_a_superseded_run_that_ends_first_records_nothing(
    runtime: WorkerRuntime, api_key: IssuedKey, gated: list[GatedImages]
) -> None:
    images = GatedImages([RED, BLUE], held={0, 1})
    gated.append(images)
    settings = runtime.settings
    job_id = new_job(settings, api_key, images.url, None)

    stale = start_stale_run(runtime, images, job_id)
    winner = threading.Thread(target=run_job, args=(job_id, runtime))
    winner.start()  # claims (attempt 2) and waits for its image
    images.wait_for(1)
    with session_scope(settings.resolved_database_url) as session:  # the stale heartbeat
        assert not jobs.extend_lease(session, job_id, 600, attempt=1)
        assert jobs.extend_leases(session, {job_id: 1}, 600) == 0
        assert jobs.extend_leases(session, {job_id: 2}, 600) == 1

    images.open(0)  # the stale run finishes first: without fencing it would win with red
    stale.join(120)
    with session_scope(settings.resolved_database_url) as session:
        job = jobs.get_job(session, job_id)
        assert job is not None
        assert (job.state, job.attempts, job.outputs) == (JobState.PROCESSING, 2, [])
    assert files_of(settings, job_id) == []  # the stale run removed what it wrote

    images.open(1)
    winner.join(120)
    won = delivered(settings, job_id)
    assert (won.state, won.attempts, len(won.outputs)) == (JobState.SUCCESS, 2, 1)
    assert won.outputs[0][1].startswith(f"{won.meta['file_prefix']}-0-2-")


def test_a_superseded_run_cannot_fail_the_job(
    runtime: WorkerRuntime, api_key: IssuedKey, gated: list[GatedImages]
) -> None:
    images = GatedImages([None, BLUE], held={0})  # the stale run's fetch will fail (404)
    gated.append(images)
    settings = runtime.settings
    job_id = new_job(settings, api_key, images.url, None)
    stale = start_stale_run(runtime, images, job_id)
    run_job(job_id, runtime)
    won = delivered(settings, job_id)

    images.open(0)
    stale.join(120)

    assert won.state == JobState.SUCCESS
    assert delivered(settings, job_id) == won


def test_the_terminal_updates_match_the_claims_token(
    settings: Settings, api_key: IssuedKey
) -> None:
    job_id = new_job(settings, api_key, "http://127.0.0.1:9/unused.png", None)
    url = settings.resolved_database_url
    with session_scope(url) as session:
        assert (
            jobs.claim_job(session, job_id, lease_s=60, max_attempts=3)[0] == ClaimOutcome.CLAIMED
        )
    expire_lease(settings, job_id)
    with session_scope(url) as session:
        assert (
            jobs.claim_job(session, job_id, lease_s=60, max_attempts=3)[0] == ClaimOutcome.CLAIMED
        )
    with session_scope(url) as session:
        assert not jobs.complete_job(
            session, job_id, outputs=[], meta={}, generation_time=1, attempt=1
        )
        assert not jobs.fail_job(session, job_id, "stale", attempt=1)
        assert jobs.fail_job(session, job_id, "current", attempt=2)
    with session_scope(url) as session:
        job = jobs.get_job(session, job_id)
        assert job is not None
        assert (job.state, job.error) == (JobState.FAILED, "current")


def store_dead_run(settings: Settings, job_id: int, claims: int) -> tuple[list[str], str]:
    """The job claimed `claims` times, its last run storing images and dying before recording
    them (its lease expired); (that run's unrecorded files, its file a job_outputs row names)."""
    with session_scope(settings.resolved_database_url) as session:
        for _ in range(claims):
            claimed = jobs.claim_job(session, job_id, lease_s=-1, max_attempts=claims)
            assert claimed[0] == ClaimOutcome.CLAIMED
        job = session.get_one(Job, job_id)
        run_id = f"{claims}-0badc0de"
        dead = [run_output_filename(job, index, run_id) for index in (0, 1)]
        named = run_output_filename(job, 2, run_id)
        session.add(JobOutput(job_id=job_id, index=2, filename=named, width=8, height=8, seed=1))
    for name in [*dead, named]:
        LocalStorage(settings.outputs_dir).save(name, b"png")
    expire_lease(settings, job_id)
    return dead, named


def wait_for_files(settings: Settings, job_id: int, expected: list[str]) -> None:
    """Until the job's files are `expected` (the deletion runs in a thread), 30 s at most."""
    deadline = time.monotonic() + 30
    while files_of(settings, job_id) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert files_of(settings, job_id) == expected


def test_a_takeover_deletes_the_files_the_dead_run_never_recorded(
    runtime: WorkerRuntime, api_key: IssuedKey, gated: list[GatedImages]
) -> None:
    """A run claimed the job, stored images, and died before recording them; its message is
    redelivered once the lease ran out and a worker takes the job over directly (no sweep).
    That run's files go while the new run still waits for its init image (off its path); a
    file of that attempt that a job_outputs row names, and the new run's own file, stay."""
    images = GatedImages([BLUE], held={0})
    gated.append(images)
    settings = runtime.settings
    job_id = new_job(settings, api_key, images.url, None)
    _dead, named = store_dead_run(settings, job_id, claims=1)

    taker = threading.Thread(target=run_job, args=(job_id, runtime))
    taker.start()  # claims attempt 2 and waits for its image
    images.wait_for(0)
    wait_for_files(settings, job_id, [named])

    images.open(0)
    taker.join(120)
    won = delivered(settings, job_id)
    assert (won.state, won.attempts) == (JobState.SUCCESS, 2)
    assert named in files_of(settings, job_id)
    assert len(files_of(settings, job_id)) == 2  # and the new run's image


def test_failing_a_job_out_of_attempts_deletes_its_dead_runs_files(
    runtime: WorkerRuntime, api_key: IssuedKey
) -> None:
    """The last attempt's run died after storing images: the worker that receives the message
    again fails the job (out of attempts) and deletes those files, not the recorded one."""
    settings = runtime.settings
    job_id = new_job(settings, api_key, "http://127.0.0.1:9/unused.png", None)
    _dead, named = store_dead_run(settings, job_id, claims=settings.job_max_attempts)

    run_job(job_id, runtime)
    assert delivered(settings, job_id).state == JobState.FAILED
    wait_for_files(settings, job_id, [named])


# --- real processes: a worker stopped (SIGSTOP) past a short lease --------------------------

#: A worker process that runs one job; with "wait" it starts up, then waits for a line on
#: stdin, so that its imports overlap the other worker's stall.
WORKER = """
import sys
from darkroom.queue import make_celery
from darkroom.settings import Settings
from worker.jobs import WorkerRuntime, run_job
settings = Settings()
runtime = WorkerRuntime(settings=settings, broker=make_celery(settings))
if sys.argv[2:] == ["wait"]:
    sys.stdin.readline()
run_job(int(sys.argv[1]), runtime)
"""


def start_worker(
    env: dict[str, str], job_id: int, log: Path, *, wait: bool = False
) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-c", WORKER, str(job_id), *(["wait"] if wait else [])]
    with log.open("wb") as out:
        return subprocess.Popen(args, env=env, stdin=subprocess.PIPE, stdout=out, stderr=out)


def lease_expired(settings: Settings, job_id: int) -> bool:
    with session_scope(settings.resolved_database_url) as session:
        expired = session.scalar(select(Job.lease_until < func.now()).where(Job.id == job_id))
        return bool(expired)


@pytest.mark.slow
def test_a_stopped_worker_process_resumes_without_touching_the_delivered_job(
    tmp_path: Path,
    settings: Settings,
    tiny_settings: Settings,
    api_key: IssuedKey,
    receiver: WebhookReceiver,
    gated: list[GatedImages],
) -> None:
    shared = settings.model_copy(update={"data_dir": tiny_settings.data_dir})
    env = {
        **settings_env(shared, tiny_settings.data_dir),
        "DARKROOM_JOB_LEASE_S": "2",
        "DARKROOM_IMAGE_FETCH_TIMEOUT_S": "120",
        "OMP_NUM_THREADS": "1",
    }
    images = GatedImages([RED, BLUE], held={0})
    gated.append(images)
    job_id = new_job(shared, api_key, images.url, receiver.url)
    stale = start_worker(env, job_id, tmp_path / "stale.log")
    winner = start_worker(env, job_id, tmp_path / "winner.log", wait=True)
    try:
        images.wait_for(0)  # claimed, fetching: stop it there, its heartbeat with it
        os.kill(stale.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 30
        while not lease_expired(shared, job_id) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lease_expired(shared, job_id)

        assert winner.stdin is not None
        winner.stdin.write(b"go\n")
        winner.stdin.close()
        assert winner.wait(120) == 0, (tmp_path / "winner.log").read_text(errors="replace")
        won = delivered(shared, job_id)
        assert (won.state, won.attempts) == (JobState.SUCCESS, 2)

        images.open(0)
        os.kill(stale.pid, signal.SIGCONT)
        assert stale.wait(120) == 0
    finally:
        for process in (stale, winner):
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)
                process.kill()
    logged = (tmp_path / "stale.log").read_text(errors="replace")
    assert "was ended by another run" in logged, logged[-3000:]
    assert delivered(shared, job_id) == won
    assert files_of(shared, job_id) == [name for _index, name in won.outputs]
