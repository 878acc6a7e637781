"""Saturation: can the system keep a generator busy? A full queue through every tier.

    python -m benchmarks.saturation [--quick] [--out results/saturation.json]

The production profile for real: `darkroom api`, `darkroom worker` and `darkroom dispatcher`,
Postgres and Redis on 127.0.0.1, a loopback server that serves a 512x512 init image and receives
the webhooks. The worker's generator is the benchmark-only fake (worker/bench_generator.py,
enabled by two settings set in the worker's environment only): each pipeline call returns
ready 512x512 images after `--generator-ms` (50), so what shows is the system's own cost
around the call: claiming, fetching and decoding init images, encoding and storing PNGs,
recording, publishing webhooks.

Each case: `--jobs` (256) img2img jobs are submitted through the API (the queue is full before
the worker starts), then a worker with `DARKROOM_MAX_BATCH=--batch` (8) runs them all, and the
dispatcher delivers their webhooks. Cases, interleaved over `--rounds` (2): `pipelined` (the
default worker) and `serial` (`DARKROOM_WORKER_PIPELINE=false`, the worker before issue 15).

The window is from the first generator call's start to the last job's `finished_at`. Columns:
`jobs_per_s` (jobs / window), `busy` (the generator's busy time / window; goal >= 0.9 at 50 ms
and batch 8), `overhead_ms_per_job` (the window's idle time / jobs: the per-job cost on the
critical path), `gap_ms_p50` (the median pause between two generator calls), `batch_mean`
(jobs per call), `to_webhooks_s` (first call to the last webhook's arrival). Figures are
medians over rounds; `ratio` is pipelined / serial jobs per second in the same run.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
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
from benchmarks.report import Report, median
from darkroom.settings import Settings
from db.models import Job, JobState
from db.session import session_scope

IMAGE_PATH = "/input.png"
SIDE = 512
SUBMIT_THREADS = 8
#: Starting a worker (importing torch, building the tiny models the first time) on a busy
#: machine, plus running every job.
CASE_TIMEOUT_S = 600.0
CASES = ("pipelined", "serial")
#: Options that are not parameters of the measurement.
SKIPPED = ("out", "keep_logs")


@dataclass(frozen=True)
class CaseResult:
    """One case's figures."""

    case: str
    jobs: int
    window_s: float
    busy_s: float
    calls: int
    gaps_s: list[float]
    to_webhooks_s: float

    def row(self) -> dict[str, float]:
        """The figures reported for this case."""
        return {
            "jobs_per_s": self.jobs / self.window_s,
            "busy": self.busy_s / self.window_s,
            "overhead_ms_per_job": (self.window_s - self.busy_s) / self.jobs * 1000,
            "gap_ms_p50": median(self.gaps_s) * 1000 if self.gaps_s else 0.0,
            "batch_mean": self.jobs / self.calls,
            "to_webhooks_s": self.to_webhooks_s,
        }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; the JSON record it wrote."""
    args = _parser().parse_args(argv)
    if args.quick:
        args.jobs, args.rounds = 24, 1
    report = Report("saturation", {k: v for k, v in vars(args).items() if k not in SKIPPED})
    load_before = os.getloadavg()
    with production_settings(max_batch=args.batch) as settings, log_folder() as logs:
        results = _measure(settings, logs, args)
    _fill(report, results, args)
    report.notes.append(
        f"load average before {_load(load_before)}, after {_load(os.getloadavg())} "
        "(1, 5, 15 min): compare the ratio of one run, not absolute figures"
    )
    return report.emit(args.out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.saturation", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="24 jobs, one round: a smoke test")
    parser.add_argument("--out", type=Path, default=Path("results/saturation.json"))
    parser.add_argument("--jobs", type=int, default=256, help="jobs per case")
    parser.add_argument("--batch", type=int, default=8, help="DARKROOM_MAX_BATCH")
    parser.add_argument("--generator-ms", type=int, default=50, help="one pipeline call, ms")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both cases")
    parser.add_argument("--keep-logs", type=Path, help="copy the processes' logs here")
    return parser


def _measure(settings: Settings, logs: Path, args: argparse.Namespace) -> list[CaseResult]:
    """Start the API, the dispatcher and the loopback server; run each case in each round."""
    image = logs / "input.png"
    image.write_bytes(_png())
    results = []
    with (
        Loopback(files={IMAGE_PATH: image}) as loopback,
        started(darkroom_argv("dispatcher"), child_env(settings), logs / "dispatcher.log"),
        running_api(settings, logs) as base_url,
    ):
        body = {
            "key": new_key(settings).plaintext,
            "prompt": "make it snow",
            "init_image": loopback.url(IMAGE_PATH),
            "width": SIDE,
            "height": SIDE,
            "samples": 1,
            "steps": 20,
            "safety_checker": "no",
            "webhook": loopback.url("/hook"),
        }
        for round_index in range(args.rounds):
            for case in CASES:
                name = f"{case}-{round_index}"
                results.append(_case(settings, logs, args, loopback, base_url, body, name))
    return results


def _case(
    settings: Settings,
    logs: Path,
    args: argparse.Namespace,
    loopback: Loopback,
    base_url: str,
    body: dict[str, Any],
    name: str,
) -> CaseResult:
    """Fill the queue, run a worker until every job's webhook has arrived, read the figures."""
    ids = _submit(base_url, body, args.jobs)
    delivered_before = loopback.count()
    spans_log = logs / f"generator-{name}.log"
    env = child_env(
        settings,
        DARKROOM_WORKER_PIPELINE=str(name.startswith("pipelined")).lower(),
        DARKROOM_BENCH_FAKE_GENERATOR="true",
        DARKROOM_BENCH_FAKE_GENERATOR_MS=str(args.generator_ms),
        DARKROOM_BENCH_GENERATOR_LOG=str(spans_log),
    )
    with started(darkroom_argv("worker"), env, logs / f"worker-{name}.log"):
        arrivals = loopback.wait_for_count(delivered_before + len(ids), CASE_TIMEOUT_S)
    if args.keep_logs is not None:
        args.keep_logs.mkdir(parents=True, exist_ok=True)
        for log in (logs / f"worker-{name}.log", spans_log):
            shutil.copy(log, args.keep_logs / log.name)
    finished = _finished_at(settings, ids)
    spans = _spans(spans_log)
    first = spans[0][0]
    gaps = [later[0] - earlier[1] for earlier, later in pairwise(spans)]
    return CaseResult(
        case=name.rsplit("-", 1)[0],
        jobs=len(ids),
        window_s=max(finished) - first,
        busy_s=sum(end - start for start, end, _count in spans),
        calls=len(spans),
        gaps_s=gaps,
        to_webhooks_s=max(arrival.at for arrival in arrivals[delivered_before:]) - first,
    )


def _submit(base_url: str, body: dict[str, Any], count: int) -> list[int]:
    """Submit `count` img2img jobs from a few threads; their ids."""
    with httpx.Client(base_url=base_url, timeout=60) as client:

        def one(_index: int) -> int:
            response = client.post("/api/v1/enterprise/img2img", json=body)
            response.raise_for_status()
            return int(response.json()["id"])

        with ThreadPoolExecutor(max_workers=SUBMIT_THREADS) as pool:
            return list(pool.map(one, range(count)))


def _finished_at(settings: Settings, ids: list[int]) -> list[float]:
    """Each job's `finished_at` (wall clock); every job must have succeeded."""
    with session_scope(settings.resolved_database_url) as session:
        query = session.query(Job.id, Job.state, Job.finished_at, Job.error)
        rows = query.filter(Job.id.in_(ids)).all()
    failed = [(row.id, row.state, row.error) for row in rows if row.state != JobState.SUCCESS]
    if failed or len(rows) != len(ids):
        raise RuntimeError(f"{len(failed)} jobs did not succeed, e.g. {failed[:3]}")
    return [row.finished_at.timestamp() for row in rows if row.finished_at is not None]


def _spans(path: Path) -> list[tuple[float, float, int]]:
    """The generator's calls: (start, end, requests), in order."""
    spans = []
    for line in path.read_text().splitlines():
        start, end, count = line.split()
        spans.append((float(start), float(end), int(count)))
    if not spans:
        raise RuntimeError(f"the generator never ran (see {path.parent})")
    return sorted(spans)


def _png() -> bytes:
    """A 512x512 init image with a photograph's texture (gradients and noise), so that its
    decoding and the outputs' PNG encoding cost what real images cost."""
    noise = Image.effect_noise((SIDE, SIDE), 24).convert("RGB")
    gradient = Image.linear_gradient("L").resize((SIDE, SIDE)).convert("RGB")
    image = Image.blend(gradient, noise, 0.3)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _fill(report: Report, results: list[CaseResult], args: argparse.Namespace) -> None:
    """One row per case: the medians of its rounds; pipelined / serial in `ratio`."""
    medians: dict[str, dict[str, float]] = {}
    for case in CASES:
        rows = [result.row() for result in results if result.case == case]
        medians[case] = {key: median([row[key] for row in rows]) for key in rows[0]}
    serial_rate = medians["serial"]["jobs_per_s"]
    for case in CASES:
        figures = medians[case]
        report.add(case=case, **figures, ratio=figures["jobs_per_s"] / serial_rate)
    busy = medians["pipelined"]["busy"]
    report.checks = {
        "jobs_per_case": args.jobs,
        "cases_run": len(results),
        "jobs_succeeded": sum(result.jobs for result in results),
        "rounds_jobs_per_s": {
            case: [result.row()["jobs_per_s"] for result in results if result.case == case]
            for case in CASES
        },
        # Paired by round (the two cases ran back to back): less exposed to the load's drift.
        "ratio_per_round": [
            pipelined.row()["jobs_per_s"] / serial.row()["jobs_per_s"]
            for pipelined, serial in zip(results[::2], results[1::2], strict=True)
        ],
        "goal_busy": {"value": busy, "goal": ">= 0.9", "met": busy >= 0.9},
    }
    report.notes.append(
        f"generator {args.generator_ms} ms per call, batch {args.batch}, {args.jobs} jobs per "
        f"case, {args.rounds} rounds; busy goal >= 0.9: {'met' if busy >= 0.9 else 'not met'}"
    )


def _load(values: tuple[float, float, float]) -> str:
    return ", ".join(f"{value:.2f}" for value in values)


if __name__ == "__main__":
    main()
