"""Queue overhead: what the system adds around the pipeline, one job at a time on an idle system.

    python -m benchmarks.queue_overhead [--quick] [--out results/queue_overhead.json]

Runs the production profile for real: `darkroom api`, `darkroom worker` (the tiny preset, on the
CPU) and `darkroom dispatcher`, with Postgres and Redis on 127.0.0.1, an image and a webhook
receiver on a loopback server. Each job is submitted only after the previous one's webhook has
arrived. Timestamps are wall clock on one machine: the client's submit and the receiver's
arrival, and the job row's `started_at` (the worker's claim), `finished_at` (its success) and
`generation_time` (the diffusion calls alone).

The pipeline's start is not recorded; it lies between the claim and `finished_at` minus
`generation_time` (which also holds writing the PNGs), so both bounds are reported.
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from benchmarks._loopback import Loopback
from benchmarks._services import (
    child_env,
    darkroom_argv,
    log_folder,
    new_key,
    production_settings,
    running_api,
    started,
)
from benchmarks.report import Report, percentile
from darkroom.settings import Settings
from db.models import JobState
from db.repositories import jobs
from db.session import session_scope

IMAGE_PATH = "/input.png"
#: The first jobs load the model and warm the caches: run, not measured.
WARMUP = 2
#: Building the tiny models and importing torch on a busy two-core machine takes a while.
FIRST_JOB_TIMEOUT_S = 300.0
JOB_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Timeline:
    """One job's moments, in seconds since the epoch, and its pipeline time."""

    submitted: float
    answered: float
    claimed: float
    finished: float
    generation: float
    webhook: float

    def intervals(self) -> dict[str, float]:
        """The intervals reported, each in seconds."""
        return {
            "submit answered": self.answered - self.submitted,
            "submit -> claim (pipeline start, lower bound)": self.claimed - self.submitted,
            "submit -> finish - generationTime (pipeline start, upper bound)": (
                self.finished - self.generation - self.submitted
            ),
            "claim -> finish, minus generationTime": (
                self.finished - self.claimed - self.generation
            ),
            "finish -> webhook received": self.webhook - self.finished,
            "generationTime (pipeline)": self.generation,
            "end to end (submit -> webhook)": self.webhook - self.submitted,
            "overhead: end to end - generationTime": self.webhook
            - self.submitted
            - self.generation,
        }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; the JSON record it wrote."""
    args = _parser().parse_args(argv)
    if args.quick:
        args.jobs = 3
    report = Report("queue_overhead", {k: v for k, v in vars(args).items() if k != "out"})
    with production_settings() as settings, log_folder() as logs:
        timelines = _measure(settings, logs, args)
    _fill(report, timelines)
    report.checks = {"jobs_measured": len(timelines), "jobs_asked": args.jobs}
    return report.emit(args.out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.queue_overhead", description=__doc__
    )
    parser.add_argument("--quick", action="store_true", help="three jobs: a smoke test")
    parser.add_argument("--out", type=Path, default=Path("results/queue_overhead.json"))
    parser.add_argument("--jobs", type=int, default=50, help="jobs measured, one at a time")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps of each job")
    parser.add_argument("--gap", type=float, default=0.5, help="idle seconds between jobs")
    return parser


def _measure(settings: Settings, logs: Path, args: argparse.Namespace) -> list[Timeline]:
    """Start the three tiers and a loopback server; time `args.jobs` jobs after the warm-up."""
    env = child_env(settings)
    worker_log, dispatcher_log = logs / "worker.log", logs / "dispatcher.log"
    image = logs / "input.png"
    image.write_bytes(_png())
    with (
        Loopback(files={IMAGE_PATH: image}) as loopback,
        started(darkroom_argv("worker"), env, worker_log),
        started(darkroom_argv("dispatcher"), env, dispatcher_log),
        running_api(settings, logs) as base_url,
    ):
        body = {
            "key": new_key(settings).plaintext,
            "prompt": "make it snow",
            "init_image": loopback.url(IMAGE_PATH),
            "steps": args.steps,
            "webhook": loopback.url("/hook"),
        }
        with httpx.Client(base_url=base_url, timeout=30) as client:
            for _ in range(WARMUP):
                _one_job(client, body, settings, loopback, FIRST_JOB_TIMEOUT_S)
            timelines = []
            for _ in range(args.jobs):
                time.sleep(args.gap)
                timelines.append(_one_job(client, body, settings, loopback, JOB_TIMEOUT_S))
    return timelines


def _one_job(
    client: httpx.Client,
    body: dict[str, Any],
    settings: Settings,
    loopback: Loopback,
    timeout: float,
) -> Timeline:
    """Submit one pix2pix job, wait for its webhook, and read its row."""
    submitted = time.time()
    response = client.post("/api/v5/pix2pix", json=body)
    answered = time.time()
    response.raise_for_status()
    job_id = int(response.json()["id"])
    webhook = loopback.wait_for_job(job_id, timeout).at
    with session_scope(settings.resolved_database_url) as session:
        job = jobs.get_job(session, job_id)
    if job is None or job.state != JobState.SUCCESS:
        raise RuntimeError(f"job {job_id} did not succeed: {job and job.error}")
    claimed, finished, generation = job.started_at, job.finished_at, job.generation_time
    if claimed is None or finished is None or generation is None:
        raise RuntimeError(f"job {job_id} succeeded without its timestamps")
    return Timeline(
        submitted=submitted,
        answered=answered,
        claimed=claimed.timestamp(),
        finished=finished.timestamp(),
        generation=generation,
        webhook=webhook,
    )


def _png() -> bytes:
    """The init image: 64x64, so the tiny pipeline's time stays small beside the overhead."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (40, 90, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


def _fill(report: Report, timelines: list[Timeline]) -> None:
    """One row per interval: its p50 and p99 over the jobs, in milliseconds."""
    names = list(timelines[0].intervals())
    for name in names:
        values = [timeline.intervals()[name] * 1000 for timeline in timelines]
        report.add(
            interval=name,
            p50_ms=percentile(values, 0.5),
            p99_ms=percentile(values, 0.99),
            max_ms=max(values),
        )
    report.notes.append(
        f"{len(timelines)} jobs one at a time; with so few, p99 is close to the slowest job"
    )


if __name__ == "__main__":
    main()
