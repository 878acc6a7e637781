"""API tier: submissions per second and latency, beside two baselines measured in the same run.

    python -m benchmarks.api_tier [--quick] [--out results/api_tier.json]

Three cases, each a closed loop at the same concurrency, their rounds interleaved so that a
noisy neighbour hurts all three alike:

- `health`: GET /health on the same API process (HTTP, uvicorn, FastAPI; no database);
- `submit`: POST /api/v5/pix2pix: parse, authenticate, admit, insert, commit, publish the id,
  mark it enqueued, commit, answer with an eta;
- `raw`: what a submission must do at minimum, from Python threads: insert the same job row,
  commit, send_task to Redis;
- `fetch`: POST /api/v5/fetch/{id} on queued jobs (what polling clients send for every job):
  authenticate, read the job, answer with its eta; its goal is at least 0.8x `health`.

The API runs in the production profile (Postgres and Redis on 127.0.0.1) as `darkroom api`, one
process, as deploy/ runs it (`--api-workers N` uses uvicorn's workers instead). No worker runs:
the per-key limits are lifted so that nothing is throttled, and before each case the benchmark
empties the queue (fails the queued rows, drops the ids), as workers would keep it short:
admission counts the queued jobs on every submission, so a backlog growing over the run would
slow the later rounds and not the earlier ones.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
from celery import Celery
from sqlalchemy import func, or_, select, update

from api.schemas import Pix2PixRequest
from benchmarks._load import Sample, run_async, run_threads, summary
from benchmarks._services import log_folder, new_key, production_settings, running_api
from benchmarks.report import Report
from darkroom.queue import RUN_JOB_TASK, make_celery, send
from darkroom.settings import Settings
from db.models import Job, JobState, utcnow
from db.repositories import jobs
from db.session import session_scope

SUBMIT_PATH = "/api/v5/pix2pix"
#: A valid pix2pix body; its image is never fetched, as no worker runs.
BODY: dict[str, Any] = {
    "prompt": "make it snow",
    "init_image": "http://127.0.0.1:9/bench.png",
    "steps": 20,
    "seed": 7,
}
WARMUP = 20
#: Marks the raw loop's rows, to tell them from the API's in the checks.
RAW_TRACK_ID = "bench-raw"
#: Marks the jobs the fetch case polls (stored, never sent to the queue).
POLLED_TRACK_ID = "bench-polled"
CASES = ("health", "submit", "raw", "fetch")
#: Queued jobs the fetch case polls, in turn (created after each drain, before the case).
POLLED_JOBS = 20
#: The goals of docs/PERFORMANCE.md: fetch rate over /health's, submit p99 over /health's.
FETCH_RATE_GOAL = 0.8
SUBMIT_P99_GOAL = 3.0


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; the JSON record it wrote."""
    args = _parser().parse_args(argv)
    if args.quick:
        args.count, args.rounds = 40, 1
    report = Report("api_tier", {key: value for key, value in vars(args).items() if key != "out"})
    with production_settings() as settings, log_folder() as logs:
        drain = Drain(settings)
        samples = _measure(settings, logs, args, drain)
        report.checks = _checks(settings, args, drain)
    _fill(report, {case: summary(runs) for case, runs in samples.items()})
    return report.emit(args.out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.api_tier", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few requests: a smoke test")
    parser.add_argument("--out", type=Path, default=Path("results/api_tier.json"))
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--count", type=int, default=2000, help="requests per case and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--api-workers", type=int, default=1, help="uvicorn worker processes")
    return parser


@dataclass
class Drain:
    """Empties the run's queue between cases, counting what it found there for the checks."""

    settings: Settings
    ids_queued: int = 0
    api_jobs_not_marked_enqueued: int = 0

    def __call__(self) -> None:
        ours = (RAW_TRACK_ID, POLLED_TRACK_ID)
        from_api = or_(Job.track_id.is_(None), Job.track_id.not_in(ours))
        queued = Job.state == JobState.QUEUED
        unmarked = select(func.count(Job.id)).where(from_api, queued, Job.enqueued_at.is_(None))
        drained = {"state": JobState.FAILED, "error": "drained", "finished_at": utcnow()}
        with session_scope(self.settings.resolved_database_url) as session:
            self.api_jobs_not_marked_enqueued += session.scalar(unmarked) or 0
            session.execute(update(Job).where(queued).values(**drained))
        client = redis.Redis.from_url(self.settings.resolved_broker_url)
        try:
            self.ids_queued += client.llen(self.settings.job_queue)
            client.delete(self.settings.job_queue)
        finally:
            client.close()


def _measure(
    settings: Settings, logs: Path, args: argparse.Namespace, drain: Drain
) -> dict[str, list[Sample]]:
    """Every case's samples: a warm-up each, then the rounds, interleaved, each case started
    on an empty queue."""
    key = new_key(settings)
    broker = make_celery(settings)
    body = {**BODY, "key": key.plaintext}
    samples: dict[str, list[Sample]] = {case: [] for case in CASES}
    raw = _raw_submit(settings, broker, key.row.id)
    with running_api(settings, logs, workers=args.api_workers) as base_url:

        def fetch(count: int) -> Sample:
            polled = [_raw_job(settings, key.row.id, POLLED_TRACK_ID) for _ in range(POLLED_JOBS)]
            paths = [f"/api/v5/fetch/{job_id}" for job_id in polled]
            auth = {"key": key.plaintext}
            return asyncio.run(_http(base_url, "POST", paths, auth, count, args))

        runners: dict[str, Callable[[int], Sample]] = {
            "health": lambda n: asyncio.run(_http(base_url, "GET", "/health", None, n, args)),
            "submit": lambda n: asyncio.run(_http(base_url, "POST", SUBMIT_PATH, body, n, args)),
            "raw": lambda n: run_threads(raw, n, args.concurrency),
            "fetch": fetch,
        }
        for run in runners.values():
            run(WARMUP)
        for _round in range(args.rounds):
            for case, run in runners.items():
                drain()
                samples[case].append(run(args.count))
        drain()
    return samples


async def _http(
    base_url: str,
    method: str,
    path: str | list[str],
    body: dict[str, Any] | None,
    count: int,
    args: argparse.Namespace,
) -> Sample:
    """`count` requests at the run's concurrency over keep-alive connections (to `path`, or to
    each of a list of paths in turn)."""
    limits = httpx.Limits(max_connections=args.concurrency)
    paths = itertools.cycle([path] if isinstance(path, str) else path)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:

        async def call() -> bool:
            try:
                response = await client.request(method, next(paths), json=body)
            except httpx.TransportError:  # counted: a refused or cut connection is a failure
                return False
            if body is None:
                return response.status_code == 200
            return response.status_code == 200 and response.json()["status"] == "processing"

        return await run_async(call, count, args.concurrency)


def _raw_submit(settings: Settings, broker: Celery, api_key_id: int) -> Callable[[], bool]:
    """One minimal submission: insert the job row the API would store, commit, send its id."""

    def call() -> bool:
        return send(broker, RUN_JOB_TASK, _raw_job(settings, api_key_id, RAW_TRACK_ID))

    return call


def _raw_job(settings: Settings, api_key_id: int, track_id: str) -> int:
    """Insert and commit the queued job row the API would store; its id."""
    spec = Pix2PixRequest.model_validate(BODY).to_spec()
    new = jobs.NewJob(
        api_key_id=api_key_id,
        operation=spec.operation,
        endpoint="v5",
        params=spec.to_row(),
        meta={},
        track_id=track_id,
        webhook_url=None,
    )
    with session_scope(settings.resolved_database_url) as session:
        return jobs.create_job(session, new).id


def _checks(settings: Settings, args: argparse.Namespace, drain: Drain) -> dict[str, Any]:
    """Jobs stored and ids queued, against what the run sent."""
    with session_scope(settings.resolved_database_url) as session:
        stored = session.scalar(
            select(func.count(Job.id)).where(Job.track_id.is_distinct_from(POLLED_TRACK_ID))
        )
    return {
        "jobs_sent": 2 * (WARMUP + args.count * args.rounds),
        "jobs_stored": stored,
        "ids_queued": drain.ids_queued,
        "api_jobs_not_marked_enqueued": drain.api_jobs_not_marked_enqueued,
    }


def _fill(report: Report, figures: dict[str, dict[str, Any]]) -> None:
    """One row per case, with the submit rate as a fraction of that case's rate."""
    what = {
        "health": "GET /health, same API process",
        "submit": f"POST {SUBMIT_PATH}",
        "raw": "insert + commit + send_task (Python threads)",
        "fetch": "POST /api/v5/fetch/{id} of queued jobs (polling)",
    }
    submit_rate = figures["submit"]["per_s"]
    for case, row in figures.items():
        ratio = submit_rate / row["per_s"] if row["per_s"] else None
        report.add(case=case, what=what[case], **row, submit_ratio=ratio)
    raw_ratio = submit_rate / figures["raw"]["per_s"] if figures["raw"]["per_s"] else 0.0
    verdict = "met" if raw_ratio >= 0.5 else "NOT met"
    report.notes.append(
        f"submit / raw insert+enqueue = {raw_ratio:.2f} (goal >= 0.5: {verdict}); per_s is the "
        "median over rounds, p50/p99 over every request of the case"
    )
    health = figures["health"]
    goals = _goals(figures["fetch"], figures["submit"], health)
    report.checks["goals"] = goals
    for name, goal in goals.items():
        verdict = f"goal {goal['goal']}: {goal['verdict']}"
        report.notes.append(f"{name} = {goal['value']:.2f} ({verdict})")


def _goals(
    fetch: dict[str, Any], submit: dict[str, Any], health: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The issue's goals, each measured against /health in this run."""
    fetch_rate = fetch["per_s"] / health["per_s"] if health["per_s"] else 0.0
    submit_rate = submit["per_s"] / health["per_s"] if health["per_s"] else 0.0
    submit_p99 = submit["p99_ms"] / health["p99_ms"] if health["p99_ms"] else float("inf")
    return {
        "fetch rate / health rate": _goal(fetch_rate, FETCH_RATE_GOAL, at_least=True),
        "submit p99 / health p99": _goal(submit_p99, SUBMIT_P99_GOAL, at_least=False),
        "submit rate / health rate": _goal(submit_rate, 0.5, at_least=True),
    }


def _goal(value: float, goal: float, *, at_least: bool) -> dict[str, Any]:
    met = value >= goal if at_least else value <= goal
    return {
        "value": round(value, 3),
        "goal": f"{'>=' if at_least else '<='} {goal}",
        "verdict": "met" if met else "NOT met",
    }


if __name__ == "__main__":
    main()
