"""Nothing lost under faults: jobs submitted while every tier and the broker are knocked over.

The production profile runs as separate processes this test owns: the API, two GPU workers and
the dispatcher (with its sweeper), on a Postgres cluster and a redis-server of the test's own.
The dispatcher's clock runs behind the database's and the second worker's ahead (libfaketime).
While jobs are submitted (each with an Idempotency-Key, retried on 5xx), workers are SIGKILLed
mid-job or stalled (SIGSTOP past their lease, then SIGCONT), Redis is killed and restarted
empty, Postgres is stopped for five seconds, the dispatcher is restarted with SIGTERM and the
API is SIGKILLed; the webhook receiver fails a seeded fraction of attempts (500s, and a few
answers too slow, which it has already seen).

At the end every job must be terminal exactly once and within a minute of the last fault, one
job per submission, every output file must exist once and be unchanged since its webhook was
received, and the receiver, deduplicating by `webhook-id`, must hold exactly one verified event
per job. The figures are printed (run with `-s`) and recorded in docs/RELIABILITY.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from standardwebhooks.webhooks import Webhook

from darkroom.identities import Operation
from db.migrate import upgrade_to_head
from db.models import TERMINAL_STATES, Job, JobState, WebhookAttempt, WebhookDelivery
from db.repositories.keys import find_active_key
from db.session import session_factory
from services.responses import output_filename
from tests.chaos.harness import OwnedRedis, Tier, wait_until
from tests.support.instances import OwnedPostgres, owned_postgres
from tests.support.servers import ImageServer, Received, WebhookReceiver
from tests.support.system import darkroom, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

#: The workload and the faults. Runtime is dominated by CHAOS_S plus the drain at the end.
N_JOBS = 50
N_FAULTS = 12
CHAOS_S = 110.0
FAULT_EVERY_S = 5.0
SUBMIT_SPREAD_S = 60.0
SEED = 4
RECEIVER_500_RATE = 0.25
RECEIVER_SLOW_RATE = 0.05
MAX_CONSECUTIVE_FAILURES = 3  # per webhook-id: the schedule below always outlasts them
DRAIN_TIMEOUT_S = 150.0
SUBMIT_PATIENCE_S = 60.0

WEBHOOK_TIMEOUT_S = 2.0
MAX_ATTEMPTS = 5
TIMINGS = {
    "DARKROOM_JOB_LEASE_S": "6",
    "DARKROOM_SWEEP_INTERVAL_S": "0.5",
    "DARKROOM_OUTBOX_GRACE_S": "1",
    "DARKROOM_REPUBLISH_AFTER_S": "10",
    "DARKROOM_WEBHOOK_SCHEDULE_S": "0,0.5,1,1,2,2,3,3,5,5",
    "DARKROOM_WEBHOOK_TIMEOUT_S": str(WEBHOOK_TIMEOUT_S),
    "DARKROOM_JOB_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
}
EXHAUSTED_PREFIX = "The job failed after"
#: A stalled worker stays stopped this long: past its lease, so another worker takes its job.
STALL_S = float(TIMINGS["DARKROOM_JOB_LEASE_S"]) + 3.0
POSTGRES_DOWN_S = 5.0
#: Every job must be terminal this long after the last fault at the latest (the issue's bound).
TERMINAL_AFTER_LAST_FAULT_S = 60.0
#: Clock offsets (libfaketime) of the dispatcher and of the second worker against the database.
DISPATCHER_SKEW = "-0.5"
WORKER_SKEW = "+0.3"
FAKETIME_LIBS = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))


# --- the database ---------------------------------------------------------------------------


@pytest.fixture
def chaos_pg() -> Iterator[OwnedPostgres]:
    """A Postgres cluster of this test's own, which it stops and starts (never the shared one)."""
    with owned_postgres(free_port()) as cluster:
        yield cluster


@pytest.fixture
def chaos_db(chaos_pg: OwnedPostgres) -> str:
    """The migrated database on that cluster: the sweeper sweeps every row of its database, so
    it must not meet jobs other tests left behind."""
    url = chaos_pg.create_database("chaos")
    upgrade_to_head(url)
    return url


def skewed(env: dict[str, str], offset: str) -> dict[str, str]:
    """`env` for a process whose wall clock is `offset` seconds off (monotonic time is not)."""
    if not FAKETIME_LIBS:
        pytest.fail("libfaketime is missing: run scripts/system-deps.sh (Debian's faketime)")
    return {
        **env,
        "LD_PRELOAD": str(FAKETIME_LIBS[0]),
        "FAKETIME": offset,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


# --- the receiver ---------------------------------------------------------------------------


@dataclass
class FlakyReceiverPolicy:
    """Decides each webhook answer from a seeded RNG; never fails one id more than 3 times in
    a row, so every delivery succeeds well within the retry schedule."""

    rng: random.Random = field(default_factory=lambda: random.Random(SEED))
    lock: threading.Lock = field(default_factory=threading.Lock)
    streak: dict[str, int] = field(default_factory=dict)
    answers: Counter[str] = field(default_factory=Counter)
    processed: Counter[str] = field(default_factory=Counter)  # 200s, in time or late, per id
    #: Called with each body the receiver keeps (a 200, in time or late).
    on_kept: Callable[[bytes], None] | None = None

    def __call__(self, got: Received) -> tuple[int, dict[str, str]]:
        message_id = got.headers.get("webhook-id", "")
        with self.lock:
            roll = self.rng.random()
            streak = self.streak.get(message_id, 0)
            if streak < MAX_CONSECUTIVE_FAILURES and roll < RECEIVER_500_RATE:
                kind = "500"
            elif streak < MAX_CONSECUTIVE_FAILURES and roll < (
                RECEIVER_500_RATE + RECEIVER_SLOW_RATE
            ):
                kind = "slow"
            else:
                kind = "200"
            self.streak[message_id] = 0 if kind == "200" else streak + 1
            self.answers[kind] += 1
            if kind != "500":
                self.processed[message_id] += 1
        if kind != "500" and self.on_kept is not None:
            self.on_kept(got.body)
        if kind == "500":
            return 500, {}
        if kind == "slow":
            # Seen and kept by the receiver, but answered after the dispatcher gave up: the
            # dispatcher must retry, and the receiver must absorb the duplicate by webhook-id.
            time.sleep(WEBHOOK_TIMEOUT_S + 1.0)
        return 200, {}


# --- the outputs' bytes when their webhook arrived ------------------------------------------


@dataclass
class OutputHashes:
    """Hashes each success's output files, downloaded from the API, as soon as the receiver
    has kept its webhook; a stale run that rewrote a file afterwards would change its hash.

    Downloads happen in a thread of their own (the receiver must answer at once), retried while
    the API is being restarted.
    """

    at_webhook: dict[str, str] = field(default_factory=dict)  # link -> sha256
    pending: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def kept(self, body: bytes) -> None:
        payload = json.loads(body)
        if payload.get("status") != "success":
            return
        output = payload["output"]
        links = [output] if isinstance(output, str) else list(output)
        with self.lock:
            self.pending.extend(link for link in links if link not in self.at_webhook)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="output-hashes", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(30)

    def settled(self) -> bool:
        with self.lock:
            return not self.pending

    def _run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self.stop.wait(0.1):
                with self.lock:
                    batch, self.pending = self.pending, []
                for link in batch:
                    if link not in self.at_webhook:
                        self.at_webhook[link] = self._hash(client, link)

    def _hash(self, client: httpx.Client, link: str) -> str:
        deadline = time.monotonic() + SUBMIT_PATIENCE_S
        while time.monotonic() < deadline:
            try:
                response = client.get(link)
                if response.status_code == 200:
                    return hashlib.sha256(response.content).hexdigest()
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.errors.append(f"{link}: not downloadable for {SUBMIT_PATIENCE_S}s")
        return ""

    def changed(self) -> list[str]:
        """The links whose bytes differ now from what they were when the webhook arrived."""
        with httpx.Client(timeout=5) as client:
            return [
                link
                for link, digest in self.at_webhook.items()
                if self._hash(client, link) != digest
            ]


# --- the workload ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Submission:
    path: str
    body: dict[str, Any]
    track_id: str


def workload(images: ImageServer, hook: str, key: str) -> list[Submission]:
    """N_JOBS tiny jobs over the four submit endpoints, 64x64, 2-3 steps, 1-2 samples."""
    rng = random.Random(SEED)
    red, blue, green = images.url("/red.png"), images.url("/blue.png"), images.url("/green.jpg")
    plan = []
    for index in range(N_JOBS):
        common: dict[str, Any] = {
            "key": key,
            "webhook": hook,
            "track_id": f"chaos-{index}",
            "seed": rng.randrange(2**31),
            "width": 64,
            "height": 64,
            "guidance_scale": 5,
        }
        steps = rng.randint(2, 3)
        samples = rng.choice((1, 1, 1, 2))
        kind = index % 4
        if kind == 0:
            path = "/api/v5/pix2pix"
            body = {"init_image": red, "prompt": "make it blue", "steps": steps}
            body["samples"] = samples
        elif kind == 1:
            path = "/api/v1/enterprise/img2img"
            body = {"init_image": blue, "prompt": "paper", "num_inference_steps": steps}
            body |= {"samples": samples, "strength": 0.7}
        elif kind == 2:
            path = "/api/v5/img_mixer"
            body = {"init_image": f"{red},{blue}", "init_image_weights": "0.5,0.7"}
            body |= {"prompt": "rose man", "steps": steps, "samples": samples}
        else:
            path = "/api/v6/image_editing/img_mixer"
            body = {"init_image": [red, green], "prompt": "a field", "steps": steps}
        plan.append(Submission(path, {**common, **body}, str(common["track_id"])))
    return plan


#: What a submit answers for a stored job: "processing", or, when a retry with the same
#: Idempotency-Key replays a job that has finished meanwhile (its first answer was lost to a
#: fault), that job as it is now.
ACCEPTED_STATES = ("processing", "success")


def _accepted(answer: Any) -> bool:
    return isinstance(answer, dict) and answer.get("status") in ACCEPTED_STATES and "id" in answer


@dataclass
class Submitter:
    """Submits the plan spread over the chaos window, retrying through API and DB outages.

    Only answers that reached the client count as acknowledged; a retry after a lost answer
    may create a second job for the same track_id, which must be processed all the same.
    """

    base_url: str
    plan: list[Submission]
    spread_s: float
    acknowledged: dict[int, Submission] = field(default_factory=dict)
    retries: int = 0
    errors: list[str] = field(default_factory=list)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="submitter", daemon=True)
        self.thread.start()

    def join(self, timeout: float) -> None:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the submitter did not finish in time"

    def _run(self) -> None:
        started = time.monotonic()
        with httpx.Client(timeout=10) as client:
            for index, submission in enumerate(self.plan):
                due = started + index * self.spread_s / len(self.plan)
                time.sleep(max(0.0, due - time.monotonic()))
                self._submit(client, submission)

    def _submit(self, client: httpx.Client, submission: Submission) -> None:
        deadline = time.monotonic() + SUBMIT_PATIENCE_S
        last = ""
        while time.monotonic() < deadline:
            try:
                # The same Idempotency-Key on every retry: a submission stored before its
                # answer was lost (API killed, database cut mid-commit) is found, not repeated.
                response = client.post(
                    self.base_url + submission.path,
                    json=submission.body,
                    headers={"Idempotency-Key": submission.track_id},
                )
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}"
            else:
                if response.status_code == 200 and _accepted(response.json()):
                    self.acknowledged[int(response.json()["id"])] = submission
                    return
                last = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code < 500:
                    self.errors.append(f"{submission.track_id}: {last}")
                    return
            self.retries += 1
            time.sleep(0.3)
        self.errors.append(f"{submission.track_id}: gave up after {SUBMIT_PATIENCE_S}s ({last})")


# --- watching terminal transitions ----------------------------------------------------------


@dataclass
class TerminalWatch:
    """Polls job states; a job seen terminal must never be seen in another state afterwards."""

    db_url: str
    api_key_id: int
    first_terminal: dict[int, JobState] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="terminal-watch", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(10)

    def _run(self) -> None:
        while not self.stop.wait(0.3):
            try:
                self.poll()
            except OperationalError:
                continue  # the database is down: one of the faults; the next poll catches up
            except Exception as exc:
                self.violations.append(f"watch query failed: {exc!r}")

    def poll(self) -> None:
        with session_factory(self.db_url)() as session:
            rows = session.execute(
                select(Job.id, Job.state).where(Job.api_key_id == self.api_key_id)
            ).all()
        for job_id, state in rows:
            seen = self.first_terminal.get(job_id)
            if seen is None and state in TERMINAL_STATES:
                self.first_terminal[job_id] = state
            elif seen is not None and state != seen:
                self.violations.append(f"job {job_id} went {seen} -> {state}")


# --- the system -----------------------------------------------------------------------------


@dataclass
class Figures:
    """What the run did; printed at the end and copied into docs/RELIABILITY.md."""

    worker_kills: int = 0
    worker_kills_mid_job: int = 0
    redis_restarts: int = 0
    dispatcher_restarts: int = 0
    dispatcher_hard_kills: int = 0
    api_restarts: int = 0
    postgres_restarts: int = 0
    worker_stalls: int = 0
    worker_stalls_mid_job: int = 0
    skipped_faults: int = 0
    unexpected_exits: list[str] = field(default_factory=list)


class System:
    """API, two workers and the dispatcher on the test's own Redis; every process killable."""

    def __init__(
        self,
        env: dict[str, str],
        logs: Path,
        redis_server: OwnedRedis,
        postgres: OwnedPostgres,
        port: int,
    ):
        self.env = env
        self.logs = logs
        self.redis = redis_server
        self.postgres = postgres
        self.port = port
        self.api = Tier("api", ["api", "--port", str(port)], env, logs)
        self.dispatcher = Tier("dispatcher", ["dispatcher"], skewed(env, DISPATCHER_SKEW), logs)
        self.workers = [
            Tier("worker1", ["worker"], env, logs),
            Tier("worker2", ["worker"], skewed(env, WORKER_SKEW), logs),
        ]
        self.figures = Figures()
        self.last_fault_at = time.monotonic()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tiers(self) -> list[Tier]:
        return [self.api, self.dispatcher, *self.workers]

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(tier.tail(lines) for tier in [*self.tiers(), self.redis])

    def start(self) -> None:
        for tier in self.tiers():
            tier.start()
        self.wait_api()
        for worker in self.workers:
            wait_until(f"{worker.name} ready", worker.celery_ready, 90, self.log_tails)
        wait_until("dispatcher ready", self.dispatcher.celery_ready, 60, self.log_tails)

    def wait_api(self) -> None:
        def healthy() -> bool:
            try:
                return httpx.get(self.base_url + "/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until("api healthy", healthy, 60, self.log_tails)

    def close(self) -> None:
        for tier in self.tiers():
            tier.close()

    def check_alive(self) -> None:
        """Tiers must only die when this test kills them; restart and record any other exit."""
        for tier in self.tiers():
            if not tier.alive():
                self.figures.unexpected_exits.append(f"{tier.name} (start #{tier.starts})")
                tier.start()

    # The faults.

    def kill_worker(self, rng: random.Random) -> None:
        """SIGKILL a worker, preferably inside a job, and start its replacement at once.

        A replacement needs ~10-20 s to import torch here: wait up to 8 s for both workers to
        consume, so that the kills land on running jobs rather than on starting processes.
        """
        deadline = time.monotonic() + 8
        while not all(w.alive() and w.celery_ready() for w in self.workers):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        ready = [w for w in self.workers if w.alive() and w.celery_ready()]
        if not ready:
            self.figures.skipped_faults += 1
            return
        deadline = time.monotonic() + 4
        busy = [worker for worker in ready if worker.running_job()]
        while not busy and time.monotonic() < deadline:
            time.sleep(0.1)
            busy = [worker for worker in ready if worker.running_job()]
        victim = rng.choice(busy or ready)
        victim.kill()
        self.figures.worker_kills += 1
        self.figures.worker_kills_mid_job += bool(busy)
        self.note(f"SIGKILL {victim.name}{' mid-job' if busy else ' (idle)'}")
        victim.start()

    def claims_refused(self) -> Counter[str]:
        """Job messages a worker received but did not run (`busy`, `terminal`: duplicates)."""
        text = "".join(w.log_path.read_text(errors="replace") for w in self.workers)
        return Counter(re.findall(r"not run here: (\w+)", text))

    def note(self, event: str) -> None:
        self.last_fault_at = time.monotonic()
        print(f"  [{time.strftime('%H:%M:%S')}] {event}", flush=True)

    def stall_worker(self) -> None:
        """SIGSTOP a worker inside a job past its lease, then SIGCONT: another worker takes the
        job meanwhile, and the stale run, fenced, must change nothing when it wakes."""
        ready = [w for w in self.workers if w.alive() and w.celery_ready()]
        deadline = time.monotonic() + 4
        busy = [worker for worker in ready if worker.running_job()]
        while ready and not busy and time.monotonic() < deadline:
            time.sleep(0.1)
            busy = [worker for worker in ready if worker.running_job()]
        if not ready:
            self.figures.skipped_faults += 1
            return
        victim = (busy or ready)[0]
        os.kill(victim.pid, signal.SIGSTOP)
        time.sleep(STALL_S)
        os.kill(victim.pid, signal.SIGCONT)
        self.figures.worker_stalls += 1
        self.figures.worker_stalls_mid_job += bool(busy)
        self.note(f"SIGSTOP {victim.name}{' mid-job' if busy else ' (idle)'} {STALL_S:.0f} s")

    def restart_postgres(self) -> None:
        """Stop the database (a fast shutdown cuts every session), POSTGRES_DOWN_S without it."""
        self.postgres.stop()
        time.sleep(POSTGRES_DOWN_S)
        self.postgres.start()
        self.figures.postgres_restarts += 1
        self.note(f"postgres stopped, down {POSTGRES_DOWN_S:.0f} s, restarted")

    def restart_redis(self) -> None:
        """Kill the broker; two seconds without it; back empty (no persistence)."""
        self.redis.kill()
        time.sleep(2)
        self.redis.start_and_wait()
        self.figures.redis_restarts += 1
        self.note("redis killed, down 2 s, restarted empty")

    def restart_dispatcher(self) -> None:
        """SIGTERM (warm shutdown: attempts in flight finish), then a new dispatcher."""
        clean = self.dispatcher.terminate()
        self.figures.dispatcher_restarts += 1
        self.figures.dispatcher_hard_kills += not clean
        self.note(f"dispatcher SIGTERM ({'clean' if clean else 'needed SIGKILL'}), restarted")
        self.dispatcher.start()

    def restart_api(self) -> None:
        """SIGKILL the API while submissions go on; the client retries until it is back."""
        self.api.kill()
        time.sleep(0.5)
        self.api.start()
        self.figures.api_restarts += 1
        self.wait_api()
        self.note("api SIGKILLed and restarted")


def run_chaos(system: System, submitter: Submitter) -> None:
    """The fault schedule: N_FAULTS faults about FAULT_EVERY_S apart, worker kills most often.

    Bounded twice: by the count, and by CHAOS_S (a worker kill may first wait for workers).
    """
    rng = random.Random(SEED)
    faults = ["worker", "api", "stall", "redis", "worker", "postgres", "dispatcher"]
    deadline = time.monotonic() + CHAOS_S
    for step in range(N_FAULTS):
        if time.monotonic() >= deadline:
            break
        time.sleep(FAULT_EVERY_S * rng.uniform(0.6, 1.4))
        system.check_alive()
        fault = faults[step % len(faults)]
        if fault == "worker":
            system.kill_worker(rng)
        elif fault == "redis":
            system.restart_redis()
        elif fault == "dispatcher":
            system.restart_dispatcher()
        elif fault == "stall":
            system.stall_worker()
        elif fault == "postgres":
            system.restart_postgres()
        else:
            system.restart_api()
    system.check_alive()
    submitter.join(timeout=SUBMIT_PATIENCE_S + 30)
    for worker in system.workers:
        wait_until(f"{worker.name} ready", worker.celery_ready, 90, system.log_tails)


# --- the checks -----------------------------------------------------------------------------


def drained(db_url: str, api_key_id: int) -> bool:
    """Every job terminal and every job's webhook delivered."""
    with session_factory(db_url)() as session:
        states = session.scalars(select(Job.state).where(Job.api_key_id == api_key_id)).all()
        deliveries = session.scalars(
            select(WebhookDelivery.state).join(Job).where(Job.api_key_id == api_key_id)
        ).all()
    return (
        all(state in TERMINAL_STATES for state in states)
        and len(deliveries) == len(states)
        and all(state == "delivered" for state in deliveries)
    )


def expected_links(job: Job, public_url: str) -> list[str]:
    """The job's links: public names, the same whichever run won (the route maps them)."""
    return [f"{public_url}/outputs/{output_filename(job, out.index)}" for out in job.outputs]


def check_everything(
    session: Session,
    *,
    api_key_id: int,
    secret: str,
    submitter: Submitter,
    posts: list[Received],
    outputs_dir: Path,
    public_url: str,
) -> dict[str, int]:
    """Every assertion of the issue; the figures they produce."""
    jobs = session.scalars(select(Job).where(Job.api_key_id == api_key_id).order_by(Job.id)).all()
    by_id = {job.id: job for job in jobs}
    acknowledged = submitter.acknowledged
    assert len(acknowledged) == N_JOBS, f"acknowledged {len(acknowledged)} of {N_JOBS}"
    missing = sorted(set(acknowledged) - set(by_id))
    assert not missing, f"acknowledged jobs not in the database: {missing}"
    # One job per submission: a retried submission carries its Idempotency-Key, so a job the
    # client never heard of (the API died before answering) is found again, not stored twice.
    track_ids = Counter(job.track_id for job in jobs)
    assert len(jobs) == N_JOBS, (
        f"duplicated submissions: {[t for t, n in track_ids.items() if n > 1]}"
    )

    # Terminal exactly once: one terminal state, one delivery row (created only by the winner).
    not_terminal = [job.id for job in jobs if job.state not in TERMINAL_STATES]
    assert not not_terminal, f"jobs not terminal: {not_terminal}"
    failed = [job for job in jobs if job.state == JobState.FAILED]
    for job in failed:
        assert (job.error or "").startswith(EXHAUSTED_PREFIX), (job.id, job.error)
    assert len(failed) <= 1, f"{len(failed)} jobs exhausted their {MAX_ATTEMPTS} attempts"
    deliveries = {
        d.job_id: d
        for d in session.scalars(
            select(WebhookDelivery).where(WebhookDelivery.job_id.in_(list(by_id)))
        )
    }
    assert sorted(i for i in deliveries if i is not None) == sorted(by_id), (
        "every job has exactly one delivery row"
    )

    # Outputs: `samples` rows per success, each file present once, nothing half-written kept.
    files = {path.name for path in outputs_dir.iterdir()}
    recorded: set[str] = set()
    for job in jobs:
        names = [out.filename for out in job.outputs]
        if job.state == JobState.SUCCESS:
            assert len(names) == job.params["samples"], (job.id, names)
            assert [out.index for out in job.outputs] == list(range(len(names)))
        else:
            assert names == [], (job.id, names)
        recorded.update(names)
    assert recorded <= files, f"recorded outputs missing on disk: {sorted(recorded - files)}"
    failed_prefixes = tuple(job.file_prefix for job in failed)
    temp = {name for name in files if name.startswith(".tmp-") and name.endswith(".part")}
    stray = files - recorded - temp
    # Each run stores under `<prefix>-<index>-<attempt>-<random>.png`: an unrecorded file is
    # one of a run killed before it recorded (an earlier attempt), or of a job that failed.
    attempts = {job.file_prefix: job.attempts for job in jobs}
    superseded = {
        name
        for name in stray
        if (run := name.split("-")) and len(run) == 4 and int(run[2]) < attempts.get(run[0], 0)
    }
    stray -= superseded
    assert all(name.startswith(failed_prefixes) for name in stray) if stray else True, stray

    # Webhooks: verified, one stable id per job, byte-identical bodies, one event after dedupe.
    hook = Webhook(secret)
    posts_by_id: dict[str, list[Received]] = defaultdict(list)
    for post in posts:
        hook.verify(post.body, post.headers)
        posts_by_id[post.headers["webhook-id"]].append(post)
    events: dict[int, dict[str, Any]] = {}
    for message_id, copies in posts_by_id.items():
        assert len({copy.body for copy in copies}) == 1, f"{message_id}: bodies differ"
        payload: dict[str, Any] = json.loads(copies[0].body)
        assert payload["id"] not in events, f"job {payload['id']} has two webhook-ids"
        events[payload["id"]] = payload
        assert deliveries[payload["id"]].message_id == message_id
    assert sorted(events) == sorted(by_id), "dedupe by webhook-id: exactly one event per job"
    for job_id, payload in events.items():
        job = by_id[job_id]
        assert payload["status"] == job.state.value, (job_id, payload["status"], job.state)
        if job.state == JobState.SUCCESS:
            links = expected_links(job, public_url)
            # pix2pix keeps the hosted API's quirk: `output` is the first link, as a string.
            expected = links[0] if job.operation == Operation.PIX2PIX else links
            assert payload["output"] == expected, job_id

    attempt_rows = Counter(
        message_id
        for (message_id,) in session.execute(
            select(WebhookDelivery.message_id)
            .join(WebhookAttempt)
            .where(WebhookDelivery.job_id.in_(list(by_id)))
        )
    )
    losses = set(acknowledged) - {job.id for job in jobs if job.state in TERMINAL_STATES}
    losses |= set(acknowledged) - set(events)
    return {
        "losses": len(losses),
        "jobs in database": len(jobs),
        "jobs failed (attempts exhausted)": len(failed),
        "jobs run more than once": sum(job.attempts > 1 for job in jobs),
        "max attempts of one job": max(job.attempts for job in jobs),
        "output files": len(recorded),
        "orphan temp files": len(temp),
        "webhook attempts (db rows)": sum(attempt_rows.values()),
        "webhook POSTs received": len(posts),
        "unique webhook-ids": len(posts_by_id),
        "attempt rows == POSTs per id": int(
            all(attempt_rows[mid] == len(copies) for mid, copies in posts_by_id.items())
        ),
    }


# --- the test -------------------------------------------------------------------------------


def all_terminal(db_url: str, api_key_id: int, expected: int) -> bool:
    """Every one of the `expected` jobs is terminal (False while the database is down)."""
    try:
        with session_factory(db_url)() as session:
            states = session.scalars(select(Job.state).where(Job.api_key_id == api_key_id)).all()
    except OperationalError:
        return False
    return len(states) == expected and all(state in TERMINAL_STATES for state in states)


def test_nothing_lost_under_faults(
    tmp_path: Path,
    chaos_pg: OwnedPostgres,
    chaos_db: str,
    image_server: ImageServer,
    receiver: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    began = time.monotonic()
    hashes = OutputHashes()
    policy = FlakyReceiverPolicy(on_kept=hashes.kept)
    receiver.respond = policy
    assert receiver.server is not None
    # A "slow" answer goes to a client that gave up: keep the broken pipe out of the output.
    monkeypatch.setattr(receiver.server.httpd, "handle_error", lambda *_args: None)

    logs = tmp_path / "logs"
    logs.mkdir()
    redis_server = OwnedRedis(free_port(), tmp_path / "redis")
    redis_server.start_and_wait()
    port = free_port()
    suffix = uuid.uuid4().hex[:8]
    data_dir = tmp_path / "data"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        # Two workers share two cores: one torch thread each, not two fighting over both.
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "DARKROOM_DATABASE_URL": chaos_db,
        "DARKROOM_BROKER_URL": redis_server.url,
        "DARKROOM_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "DARKROOM_MODEL_PRESET": "tiny",
        "DARKROOM_URL_ALLOWLIST": "127.0.0.1/32",
        "DARKROOM_DATA_DIR": str(data_dir),
        "DARKROOM_JOB_QUEUE": f"chaos.jobs.{suffix}",
        "DARKROOM_WEBHOOK_QUEUE": f"chaos.webhooks.{suffix}",
        **TIMINGS,
    }
    key = json.loads(darkroom(env, "keys", "create", "--name", "chaos").strip().splitlines()[-1])
    with session_factory(chaos_db)() as session:
        key_row = find_active_key(session, key["key"])
        assert key_row is not None
        api_key_id = key_row.id

    system = System(env, logs, redis_server, chaos_pg, port)
    watch = TerminalWatch(chaos_db, api_key_id)
    try:
        system.start()
        started_chaos = time.monotonic()
        submitter = Submitter(
            system.base_url, workload(image_server, receiver.url, key["key"]), SUBMIT_SPREAD_S
        )
        watch.start()
        hashes.start()
        submitter.start()
        run_chaos(system, submitter)
        chaos_s = time.monotonic() - started_chaos
        assert not submitter.errors, submitter.errors
        terminal_s = (time.monotonic() - system.last_fault_at) + wait_until(
            "every job terminal",
            lambda: all_terminal(chaos_db, api_key_id, N_JOBS),
            TERMINAL_AFTER_LAST_FAULT_S,
            system.log_tails,
        )
        assert terminal_s <= TERMINAL_AFTER_LAST_FAULT_S, f"terminal {terminal_s:.0f}s after"
        drain_s = wait_until(
            "every job terminal and its webhook delivered",
            lambda: drained(chaos_db, api_key_id),
            DRAIN_TIMEOUT_S,
            system.log_tails,
        )
        watch.poll()
        watch.close()
        assert not watch.violations, watch.violations
        wait_until("outputs hashed", hashes.settled, 60, system.log_tails)
        hashes.close()
        assert not hashes.errors, hashes.errors
        assert len(hashes.at_webhook) >= 1, "no output was hashed at its webhook"
        changed = hashes.changed()
        assert not changed, f"files changed after their webhook was sent: {changed}"
        # A tier that died on its own was restarted by check_alive, as a process manager would;
        # see test_dispatcher_survives_a_broker_restart_mid_attempt for the known cause.
        with session_factory(chaos_db)() as session:
            checked = check_everything(
                session,
                api_key_id=api_key_id,
                secret=key["webhook_secret"],
                submitter=submitter,
                posts=receiver.snapshot(),
                outputs_dir=data_dir / "outputs",
                public_url=system.base_url,
            )
    finally:
        watch.close()
        hashes.close()
        system.close()
        redis_server.close()

    figures = system.figures
    posts = checked["webhook POSTs received"]
    table = {
        "jobs acknowledged": len(submitter.acknowledged),
        **{k: v for k, v in checked.items() if k.startswith("jobs ")},
        "submit retries (client)": submitter.retries,
        "worker kills (SIGKILL)": figures.worker_kills,
        "  of which mid-job": figures.worker_kills_mid_job,
        "redis restarts": figures.redis_restarts,
        "dispatcher restarts (SIGTERM)": figures.dispatcher_restarts,
        "  of which needed SIGKILL": figures.dispatcher_hard_kills,
        "api restarts (SIGKILL)": figures.api_restarts,
        "postgres restarts (5 s down)": figures.postgres_restarts,
        f"worker stalls (SIGSTOP {STALL_S:.0f} s)": figures.worker_stalls,
        "  of which stalled mid-job": figures.worker_stalls_mid_job,
        "faults skipped (no ready worker)": figures.skipped_faults,
        "tiers that exited on their own": len(figures.unexpected_exits),
        **{k: v for k, v in checked.items() if not k.startswith("jobs ")},
        "receiver failures injected (500)": policy.answers["500"],
        "receiver failures injected (slow)": policy.answers["slow"],
        "duplicates absorbed (POSTs - ids)": posts - checked["unique webhook-ids"],
        "  of which already processed": sum(n - 1 for n in policy.processed.values() if n > 1),
        "job messages refused by the claim": sum(system.claims_refused().values()),
        "losses": checked["losses"],
        "chaos window (s)": round(chaos_s),
        "all terminal after the last fault (s)": round(terminal_s),
        "outputs hashed at their webhook, unchanged": len(hashes.at_webhook),
        "drain after chaos (s)": round(drain_s),
        "total runtime (s)": round(time.monotonic() - began),
    }
    width = max(len(name) for name in table)
    print("\nchaos figures\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in table.items()))
    print("  (orphan temp files: SIGKILL debris of a write in progress, never an output)")


# --- a known fault, pinned down -------------------------------------------------------------


def test_dispatcher_survives_a_broker_restart_mid_attempt(
    tmp_path: Path, chaos_db: str, receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis restarts while a webhook attempt is in flight: the dispatcher must keep running."""
    from db.repositories import jobs as job_repo
    from db.repositories import webhooks as webhook_repo
    from db.repositories.keys import create_key

    def slow(_got: Received) -> tuple[int, dict[str, str]]:
        time.sleep(5)
        return 200, {}

    receiver.respond = slow
    assert receiver.server is not None
    monkeypatch.setattr(receiver.server.httpd, "handle_error", lambda *_args: None)
    logs = tmp_path / "logs"
    logs.mkdir()
    redis_server = OwnedRedis(free_port(), tmp_path / "redis")
    redis_server.start_and_wait()
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "DARKROOM_DATABASE_URL": chaos_db,
        "DARKROOM_BROKER_URL": redis_server.url,
        "DARKROOM_URL_ALLOWLIST": "127.0.0.1/32",
        "DARKROOM_DATA_DIR": str(tmp_path / "data"),
        "DARKROOM_WEBHOOK_QUEUE": f"chaos.webhooks.{uuid.uuid4().hex[:8]}",
        "DARKROOM_WEBHOOK_TIMEOUT_S": "10",
        "DARKROOM_SWEEP_INTERVAL_S": "0.5",
    }
    with session_factory(chaos_db)() as session:
        key = create_key(session, "chaos-pin")
        spec = {"operation": "pix2pix", "prompt": "x", "init_images": [], "steps": 1}
        job = job_repo.create_job(
            session,
            job_repo.NewJob(key.row.id, Operation.PIX2PIX, "v5", spec, {}, None, receiver.url),
        )
        delivery = webhook_repo.create_delivery(
            session, job_id=job.id, url=receiver.url, payload='{"id": 1}'
        )
        delivery.enqueued_at = None  # the sweeper publishes it on its first pass
        session.commit()
    dispatcher = Tier("dispatcher", ["dispatcher"], env, logs)
    try:
        dispatcher.start()
        wait_until("an attempt in flight", lambda: bool(receiver.snapshot()), 60, dispatcher.tail)
        redis_server.kill()
        time.sleep(2)
        redis_server.start_and_wait()
        time.sleep(6)
        assert dispatcher.alive(), f"the dispatcher exited\n{dispatcher.tail(60)}"
    finally:
        dispatcher.close()
        redis_server.close()
