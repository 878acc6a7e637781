"""Saturation: can the system keep a generator busy? A full queue through every tier.

    python -m benchmarks.saturation [--quick] [--generator-ms 50,200] [--out FILE.json]

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
default worker) and `serial` (`DARKROOM_WORKER_PIPELINE=false`, the worker before issue 15),
at each generator time in `--generator-ms` (a comma-separated sweep, e.g. `50,200`: at which
time per call does the system keep the generator busy 0.9 on this machine?).

The window is from the first generator call's start to the last job's `finished_at`. Columns:
`jobs_per_s` (jobs / window), `busy` (the generator's busy time / window; goal >= 0.9 at 50 ms
and batch 8), `busy_at_t` (calls x T / window: what `busy` would be had every call lasted
exactly T; a call lasts longer when its thread waits for the interpreter lock after the sleep,
which `call_ms_p50`, the median call, shows), `overhead_ms_per_job` (the window's idle time /
jobs: the per-job cost on the critical path), `gap_ms_p50` (the median pause between two
generator calls), `batch_mean` (jobs per call), `to_webhooks_s` (first call to the last
webhook's arrival), `cpu_ms_per_job` (the CPU time of the system's own processes in the window,
per job) against `budget_ms_per_job` (what busy 0.9 allows: all cores for T / (0.9 x batch) per
job). Figures are medians over rounds; `ratio` is pipelined / serial jobs per second at the
same time.

The CPU budget table then splits `cpu_ms_per_job` by process (benchmarks/_cpu.py samples /proc
through the run): the worker, the API, the dispatcher, this database's Postgres backends (from
`pg_stat_activity`), the loopback server, this process, and the rest of the machine (other
users; the shared Redis server's work for the run is in there too). Its last rows are stage
costs measured here, in this process, one thread: fetching and decoding the init image from the
loopback server as the worker does, and encoding one 512x512 output at the run's
DARKROOM_PNG_COMPRESS_LEVEL.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from benchmarks._cpu import MACHINE, OTHERS, POSTGRES, SELF, CpuSampler, run_sampler
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
from worker import png
from worker.images import fetch_image

IMAGE_PATH = "/input.png"
SIDE = 512
SUBMIT_THREADS = 8
#: Starting a worker (importing torch, building the tiny models the first time) on a busy
#: machine, plus running every job.
CASE_TIMEOUT_S = 600.0
CASES = ("pipelined", "serial")
#: Options that are not parameters of the measurement.
SKIPPED = ("out", "keep_logs")
#: The busy fraction the goal asks for; the CPU budget per job follows from it.
GOAL_BUSY = 0.9
#: The run's own processes, found among this process's children by their command lines.
MARKERS = {
    "worker": "cli.main worker",
    "api": "cli.main api",
    "dispatcher": "cli.main dispatcher",
    "loopback server": "benchmarks._loopback",
}
PROCESSES = (*MARKERS, POSTGRES, SELF)
#: Repetitions of each in-process stage measurement (fetch + decode, encode).
STAGE_REPEATS = 15


@dataclass(frozen=True)
class CaseResult:
    """One case's figures."""

    case: str
    generator_ms: int
    jobs: int
    window_s: float
    busy_s: float
    calls_s: list[float]
    gaps_s: list[float]
    to_webhooks_s: float
    cpu_s: dict[str, float]

    @property
    def label(self) -> str:
        return f"{self.case} {self.generator_ms} ms"

    def row(self) -> dict[str, float]:
        """The figures reported for this case."""
        return {
            "jobs_per_s": self.jobs / self.window_s,
            "busy": self.busy_s / self.window_s,
            "busy_at_t": len(self.calls_s) * self.generator_ms / 1000 / self.window_s,
            "call_ms_p50": median(self.calls_s) * 1000,
            "overhead_ms_per_job": (self.window_s - self.busy_s) / self.jobs * 1000,
            "gap_ms_p50": median(self.gaps_s) * 1000 if self.gaps_s else 0.0,
            "batch_mean": self.jobs / len(self.calls_s),
            "to_webhooks_s": self.to_webhooks_s,
            "cpu_ms_per_job": sum(self.cpu_s.get(name, 0.0) for name in PROCESSES)
            / self.jobs
            * 1000,
        }

    def cpu_ms_per_job(self) -> dict[str, float]:
        """Each process group's CPU in the window, per job (ms)."""
        return {name: seconds / self.jobs * 1000 for name, seconds in self.cpu_s.items()}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; the JSON record it wrote."""
    args = _parser().parse_args(argv)
    if args.quick:
        # 64, not fewer: the window must hold enough of the database's work to show in
        # /proc's 10 ms ticks (24 jobs were 2-5 ticks of Postgres CPU, sometimes none).
        args.jobs, args.rounds = 64, 1
    report = Report("saturation", {k: v for k, v in vars(args).items() if k not in SKIPPED})
    load_before = os.getloadavg()
    with production_settings(max_batch=args.batch) as settings, log_folder() as logs:
        results, stages = _measure(settings, logs, args)
    _fill(report, results, args)
    _budget(report, results, stages, args)
    report.notes.append(
        f"load average before {_load(load_before)}, after {_load(os.getloadavg())} "
        "(1, 5, 15 min): compare the ratio of one run, not absolute figures"
    )
    return report.emit(args.out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.saturation", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="64 jobs, one round: a smoke test")
    parser.add_argument("--out", type=Path, default=Path("results/saturation.json"))
    parser.add_argument("--jobs", type=int, default=256, help="jobs per case")
    parser.add_argument("--batch", type=int, default=8, help="DARKROOM_MAX_BATCH")
    parser.add_argument(
        "--generator-ms",
        type=_milliseconds,
        default=[50],
        help="one pipeline call, ms; several (50,200) sweep them",
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds of both cases")
    parser.add_argument("--keep-logs", type=Path, help="copy the processes' logs here")
    return parser


def _milliseconds(value: str) -> list[int]:
    times = [int(part) for part in value.split(",") if part.strip()]
    if not times or min(times) <= 0:
        raise argparse.ArgumentTypeError("positive milliseconds, comma-separated")
    return times


def _measure(
    settings: Settings, logs: Path, args: argparse.Namespace
) -> tuple[list[CaseResult], dict[str, float]]:
    """Start the API, the dispatcher and the loopback server; run each case in each round.
    Also the in-process stage costs (ms)."""
    image = logs / "input.png"
    image.write_bytes(_png())
    results = []
    with (
        Loopback(files={IMAGE_PATH: image}) as loopback,
        started(darkroom_argv("dispatcher"), child_env(settings), logs / "dispatcher.log"),
        running_api(settings, logs) as base_url,
        run_sampler(settings.resolved_database_url, MARKERS) as sampler,
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
        stages = _stages(settings, loopback.url(IMAGE_PATH))
        for round_index in range(args.rounds):
            for generator_ms in args.generator_ms:
                for case in CASES:
                    name = f"{case}-{generator_ms}-{round_index}"
                    run = _Run(settings, logs, args, loopback, base_url, body, sampler)
                    results.append(_case(run, case, generator_ms, name))
    return results, stages


def _stages(settings: Settings, url: str) -> dict[str, float]:
    """CPU ms (one thread, median) of the worker's image stages, run here on the same image."""
    fetched = fetch_image(url, settings)  # the first fetch opens the kept connection
    output = fetched.resize((SIDE, SIDE))

    def cpu_ms(call: Any) -> float:
        times = []
        for _ in range(STAGE_REPEATS):
            start = time.process_time()
            call()
            times.append(time.process_time() - start)
        return median(times) * 1000

    return {
        "stage: fetch + decode init image": cpu_ms(lambda: fetch_image(url, settings)),
        "stage: encode output PNG": cpu_ms(lambda: png.encode(output, settings.png_compress_level)),
    }


@dataclass(frozen=True)
class _Run:
    """What every case of a run shares."""

    settings: Settings
    logs: Path
    args: argparse.Namespace
    loopback: Loopback
    base_url: str
    body: dict[str, Any]
    sampler: CpuSampler


def _case(run: _Run, case: str, generator_ms: int, name: str) -> CaseResult:
    """Fill the queue, run a worker until every job's webhook has arrived, read the figures."""
    ids = _submit(run.base_url, run.body, run.args.jobs)
    delivered_before = run.loopback.count()
    spans_log = run.logs / f"generator-{name}.log"
    env = child_env(
        run.settings,
        DARKROOM_WORKER_PIPELINE=str(case == "pipelined").lower(),
        DARKROOM_BENCH_FAKE_GENERATOR="true",
        DARKROOM_BENCH_FAKE_GENERATOR_MS=str(generator_ms),
        DARKROOM_BENCH_GENERATOR_LOG=str(spans_log),
    )
    with started(darkroom_argv("worker"), env, run.logs / f"worker-{name}.log"):
        arrivals = run.loopback.wait_for_count(delivered_before + len(ids), CASE_TIMEOUT_S)
    if run.args.keep_logs is not None:
        run.args.keep_logs.mkdir(parents=True, exist_ok=True)
        for log in (run.logs / f"worker-{name}.log", spans_log):
            shutil.copy(log, run.args.keep_logs / log.name)
    finished = _finished_at(run.settings, ids)
    spans = _spans(spans_log)
    first = spans[0][0]
    gaps = [later[0] - earlier[1] for earlier, later in pairwise(spans)]
    return CaseResult(
        case=case,
        generator_ms=generator_ms,
        jobs=len(ids),
        window_s=max(finished) - first,
        busy_s=sum(end - start for start, end, _count in spans),
        calls_s=[end - start for start, end, _count in spans],
        gaps_s=gaps,
        to_webhooks_s=max(arrival.at for arrival in arrivals[delivered_before:]) - first,
        cpu_s=run.sampler.spent(first, max(finished)),
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
    """One row per case and generator time: the medians of its rounds; `ratio` is pipelined /
    serial at the same time."""
    busy_by_ms: dict[int, float] = {}
    for generator_ms in args.generator_ms:
        medians = {case: _medians(results, case, generator_ms) for case in CASES}
        serial_rate = medians["serial"]["jobs_per_s"]
        for case in CASES:
            figures = medians[case]
            ratio = figures["jobs_per_s"] / serial_rate
            budget = _budget_ms(generator_ms, args.batch)
            report.add(
                case=case,
                generator_ms=generator_ms,
                **figures,
                budget_ms_per_job=budget,
                ratio=ratio,
            )
        busy_by_ms[generator_ms] = medians["pipelined"]["busy"]
    busy = busy_by_ms[args.generator_ms[0]]
    reached = [ms for ms, value in sorted(busy_by_ms.items()) if value >= GOAL_BUSY]
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
        "goal_busy": {"value": busy, "goal": f">= {GOAL_BUSY}", "met": busy >= GOAL_BUSY},
        "busy_by_generator_ms": busy_by_ms,
        "goal_reached_at_ms": reached[0] if reached else None,
    }
    report.notes.append(
        f"generator {args.generator_ms} ms per call, batch {args.batch}, {args.jobs} jobs per "
        f"case, {args.rounds} rounds; busy goal >= {GOAL_BUSY} at {args.generator_ms[0]} ms: "
        f"{'met' if busy >= GOAL_BUSY else 'not met'}; first time that meets it: "
        f"{f'{reached[0]} ms' if reached else 'none of those run'}"
    )


def _medians(results: list[CaseResult], case: str, generator_ms: int) -> dict[str, float]:
    rows = [r.row() for r in results if r.case == case and r.generator_ms == generator_ms]
    return {key: median([row[key] for row in rows]) for key in rows[0]}


def _budget_ms(generator_ms: int, batch: int) -> float:
    """CPU ms per job that busy 0.9 leaves, all cores counted, overlap assumed perfect."""
    return (os.cpu_count() or 1) * generator_ms / (GOAL_BUSY * batch)


def _budget(
    report: Report, results: list[CaseResult], stages: dict[str, float], args: argparse.Namespace
) -> None:
    """The CPU budget table: ms per job by process (medians over rounds) for each case and time,
    against the budget; kept in `checks` and printed as a second table in a note."""
    table = Report("cpu", {})
    columns: dict[str, dict[str, float]] = {}
    for generator_ms in args.generator_ms:
        for case in CASES:
            ours = [r for r in results if r.case == case and r.generator_ms == generator_ms]
            per_job = [r.cpu_ms_per_job() for r in ours]
            names = [*PROCESSES, OTHERS, MACHINE]
            column = {n: median([p.get(n, 0.0) for p in per_job]) for n in names}
            column["the run's processes"] = median([r.row()["cpu_ms_per_job"] for r in ours])
            column["budget at busy 0.9"] = _budget_ms(generator_ms, args.batch)
            columns[f"{case} {generator_ms} ms"] = column
    for name in [*PROCESSES, "the run's processes", "budget at busy 0.9", OTHERS, MACHINE]:
        table.add(ms_per_job=name, **{label: column[name] for label, column in columns.items()})
    report.checks["cpu_ms_per_job"] = columns
    report.checks["stages_ms"] = stages
    report.notes.append("CPU time per job in the window, by process (ms):\n" + table.table())
    report.notes.append(
        "stage costs measured in this process (CPU ms, one thread, median): "
        + "; ".join(f"{name.removeprefix('stage: ')} {value:.1f}" for name, value in stages.items())
    )


def _load(values: tuple[float, float, float]) -> str:
    return ", ".join(f"{value:.2f}" for value in values)


if __name__ == "__main__":
    main()
