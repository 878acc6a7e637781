"""Scale-out with model-affinity routing, with real worker processes on CPU.

Two `darkroom worker` processes preload different tiny models (`tiny-a`, `tiny-b`); the API
(in this process) and the sweeper (a thread here) share their Postgres database and Redis.
Each worker writes its outputs under a data folder of its own, so the files on disk say which
worker ran a job. Then the holder of `tiny-a` is killed, and its model's jobs still complete.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from darkroom.queue import make_celery
from darkroom.settings import Settings
from db.models import TERMINAL_STATES, Job, JobState
from db.repositories.keys import IssuedKey, create_key
from db.session import session_scope
from services.routing import WorkerPresence, live_workers, model_key, model_queue
from tests.support.servers import ImageServer
from tests.support.system import settings_env
from worker.sweeper import sweep_once

pytestmark = pytest.mark.slow

TTL_S = 3.0


@dataclass
class Worker:
    """A `darkroom worker` process we started, and where it writes."""

    name: str
    process: subprocess.Popen[bytes]
    data_dir: Path
    log_path: Path

    def ran(self, file_prefix: str) -> bool:
        """Whether this worker wrote the job's first output (stored under a run's own name,
        `<prefix>-0-<run>.png`)."""
        return any((self.data_dir / "outputs").glob(f"{file_prefix}-0-*.png"))

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-40:])


@pytest.fixture
def tuned(settings: Settings, own_pg_url: str) -> Settings:
    """A database of our own (the sweeper sweeps every row), short presence and rescue times,
    and room enough in model queues for every job of the test."""
    return settings.model_copy(
        update={
            "database_url": own_pg_url,
            "affinity_ttl_s": TTL_S,
            "affinity_stranded_after_s": 1.0,
            "affinity_queue_slack": 100,
            "outbox_grace_s": 1.0,
        }
    )


@pytest.fixture
def key(tuned: Settings) -> IssuedKey:
    with session_scope(tuned.resolved_database_url) as session:
        return create_key(session, "affinity-e2e")


@contextmanager
def workers(tuned: Settings, tmp_path: Path, models: dict[str, str]) -> Iterator[list[Worker]]:
    """One worker process per `name: model id`, stopped (SIGTERM, then SIGKILL) afterwards."""
    started = [_start(tuned, tmp_path, name, model_id) for name, model_id in models.items()]
    try:
        yield started
    finally:
        for worker in started:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        for worker in started:
            try:
                worker.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait(timeout=10)


def _start(tuned: Settings, tmp_path: Path, name: str, model_id: str) -> Worker:
    data_dir = tmp_path / name
    data_dir.mkdir()
    env = {
        **settings_env(tuned, data_dir),
        "DARKROOM_AFFINITY_TTL_S": str(TTL_S),
        "DARKROOM_LOG_FORMAT": "text",
        "OMP_NUM_THREADS": "1",  # two workers share two cores with everything else
    }
    log_path = tmp_path / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "worker", "--name", name, "--models", model_id],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Worker(name, process, data_dir, log_path)


@contextmanager
def sweeper(tuned: Settings) -> Iterator[Counter[str]]:
    """The sweeper, every 0.3 s in a thread; yields the running total of jobs it rescued."""
    totals: Counter[str] = Counter()
    stop = threading.Event()
    broker = make_celery(tuned)

    def loop() -> None:
        while not stop.wait(0.3):
            totals["rescued"] += sweep_once(tuned, broker).rescued_jobs

    thread = threading.Thread(target=loop, name="test-sweeper", daemon=True)
    thread.start()
    try:
        yield totals
    finally:
        stop.set()
        thread.join(timeout=30)
        broker.close()


def _wait(
    condition: str, check: Callable[[], bool], pool: list[Worker], timeout: float = 90
) -> None:
    """Poll `check()` until it is true; on timeout fail with the workers' logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    logs = "\n\n".join(f"--- {w.name}\n{w.log_tail()}" for w in pool)
    raise AssertionError(f"timed out waiting for {condition}\n{logs}")


def _advertised(tuned: Settings) -> dict[str, WorkerPresence]:
    return {worker.name: worker for worker in live_workers(tuned)}


def _models(tuned: Settings) -> dict[str, list[str]]:
    """The model keys each live worker advertises."""
    return {name: worker.models for name, worker in _advertised(tuned).items()}


def _submit(client: TestClient, key: IssuedKey, image: str, model_id: str, seed: int) -> int:
    body = {
        "key": key.plaintext,
        "model_id": model_id,
        "prompt": f"a lighthouse {seed}",
        "init_image": image,
        "width": 64,
        "height": 64,
        "num_inference_steps": 2,
        "strength": 1.0,
        "seed": seed,
    }
    answer = client.post("/api/v1/enterprise/img2img", json=body).json()
    assert answer["status"] == "processing", answer
    job_id: int = answer["id"]
    return job_id


def _jobs(tuned: Settings, ids: list[int]) -> dict[int, Job]:
    with session_scope(tuned.resolved_database_url) as session:
        rows = list(session.scalars(select(Job).where(Job.id.in_(ids))))
        session.expunge_all()
    return {row.id: row for row in rows}


def _finished(tuned: Settings, ids: list[int]) -> bool:
    return all(job.state in TERMINAL_STATES for job in _jobs(tuned, ids).values())


def _runner(pool: list[Worker], job: Job) -> str:
    """The one worker whose folder holds the job's output."""
    ran = [worker.name for worker in pool if worker.ran(job.file_prefix)]
    assert len(ran) == 1, (job.id, ran)
    return ran[0]


def test_jobs_run_where_their_model_is_and_outlive_its_worker(
    tmp_path: Path, tuned: Settings, key: IssuedKey, image_server: ImageServer
) -> None:
    image = image_server.url("/red.png")
    queue = {m: model_queue(tuned, model_key("img2img", m)) for m in ("tiny-a", "tiny-b", "tiny-c")}
    with (
        workers(tuned, tmp_path, {"wa@affinity": "tiny-a", "wb@affinity": "tiny-b"}) as pool,
        sweeper(tuned) as swept,
        TestClient(create_app(tuned)) as client,
    ):
        wa, wb = pool
        expected = {"wa@affinity": ["img2img:tiny-a"], "wb@affinity": ["img2img:tiny-b"]}
        _wait("both workers to advertise", lambda: _models(tuned) == expected, pool, 120)

        # A model nobody holds goes to the general queue, which idle workers still take.
        first_c = _submit(client, key, image, "tiny-c", seed=1)
        _wait("the first tiny-c job", lambda: _finished(tuned, [first_c]), pool)
        job = _jobs(tuned, [first_c])[first_c]
        assert (job.state, job.queue_name) == (JobState.SUCCESS, tuned.job_queue), job.error
        holder_c = _runner(pool, job)
        expected[holder_c].append("img2img:tiny-c")
        _wait("tiny-c to be advertised", lambda: _models(tuned) == expected, pool)

        # Now every model has a holder: each job goes to its model's queue and runs there.
        mix = ["tiny-a", "tiny-b", "tiny-c", "tiny-a", "tiny-b", "tiny-c", "tiny-a", "tiny-b"]
        submitted = {_submit(client, key, image, m, seed=10 + i): m for i, m in enumerate(mix)}
        _wait("the mix of jobs", lambda: _finished(tuned, list(submitted)), pool)
        holders = {"tiny-a": wa.name, "tiny-b": wb.name, "tiny-c": holder_c}
        for job_id, job in _jobs(tuned, list(submitted)).items():
            model = submitted[job_id]
            assert job.state == JobState.SUCCESS, job.error
            assert job.queue_name == queue[model]
            assert _runner(pool, job) == holders[model], (job_id, model)
        loads = sum((Counter(w.loads) for w in _advertised(tuned).values()), Counter[str]())
        assert loads == {"img2img:tiny-a": 1, "img2img:tiny-b": 1, "img2img:tiny-c": 1}

        # The only holder of tiny-a dies; jobs routed to its queue meanwhile still run.
        wa.process.kill()
        wa.process.wait(timeout=30)
        orphans = [_submit(client, key, image, "tiny-a", seed=30 + i) for i in range(2)]
        routed = _jobs(tuned, orphans)
        assert {job.queue_name for job in routed.values()} == {queue["tiny-a"]}
        _wait("tiny-a's jobs after its worker died", lambda: _finished(tuned, orphans), pool)
        for job in _jobs(tuned, orphans).values():
            assert job.state == JobState.SUCCESS, job.error
            assert job.queue_name == tuned.job_queue  # the sweeper moved it
            assert _runner(pool, job) == wb.name
        assert swept["rescued"] == 2
        survivors = _advertised(tuned)
        assert set(survivors) == {wb.name}
        assert survivors[wb.name].loads["img2img:tiny-a"] == 1
        assert "img2img:tiny-a" in survivors[wb.name].models
