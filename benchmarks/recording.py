"""Recording a batch's successes: one transaction per job against one per batch (issue 15).

    python -m benchmarks.recording [--quick] [--batch 8] [--rounds 30] [--out FILE.json]

Each round claims `--batch` jobs with webhooks (production profile: Postgres, Redis), writes one
small file per job, then records their successes through worker.recording.record_successes:

- `per job`: one call (one transaction) per job, as the worker recorded a batch before;
- `per batch`: one call for the whole batch (`outcomes.succeed_many`).

Both include what a success costs after its files are stored: the fenced UPDATE, the output
rows, the metrics, the notification, the frozen webhook body and its delivery row, the commit,
and the outbox's sends to the broker. The cases alternate within each round (the order too);
times are medians over rounds, with the SQL statements and commits one batch costs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.orm import Session

from benchmarks._services import new_key, production_settings
from benchmarks.report import Report
from darkroom.identities import Operation
from darkroom.queue import make_celery
from db.repositories import jobs
from db.repositories.keys import IssuedKey
from db.session import session_scope
from services.outcomes import RunSuccess
from worker.recording import record_successes
from worker.runtime import WorkerRuntime

HOOK = "http://127.0.0.1:9/hook"  # never called: the deliveries are only created and published
WARMUP_ROUNDS = 2


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; the JSON record it wrote."""
    args = _parser().parse_args(argv)
    if args.quick:
        args.rounds = 4
    with production_settings() as settings:
        runtime = WorkerRuntime(settings=settings, broker=make_celery(settings))
        key = new_key(settings)
        report = Report("recording", {k: v for k, v in vars(args).items() if k != "out"})
        figures = _measure(runtime, key, args.batch, args.rounds)
    per_job = statistics.median(figures["per job"].seconds)
    for case, measured in figures.items():
        batch_s = statistics.median(measured.seconds)
        report.add(
            case=case,
            ms_per_batch=round(batch_s * 1000, 2),
            ms_per_job=round(batch_s * 1000 / args.batch, 2),
            statements_per_batch=measured.statements,
            commits_per_batch=measured.commits,
            ratio=round(batch_s / per_job, 3),
        )
    report.checks = {case: len(m.seconds) for case, m in figures.items()}
    return report.emit(args.out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recording", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few rounds (tests)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("results/recording.json"))
    return parser


class _Measured:
    """One case's batch times, and the statements and commits of its last batch."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.statements = 0
        self.commits = 0


def _measure(
    runtime: WorkerRuntime, key: IssuedKey, batch: int, rounds: int
) -> dict[str, _Measured]:
    def per_job(runs: list[RunSuccess]) -> None:
        for run in runs:
            record_successes(runtime, [run])

    cases: dict[str, Callable[[list[RunSuccess]], None]] = {
        "per job": per_job,
        "per batch": lambda runs: record_successes(runtime, runs),
    }
    figures = {case: _Measured() for case in cases}
    for turn in range(WARMUP_ROUNDS + rounds):
        order = list(cases) if turn % 2 == 0 else list(reversed(cases))
        for case in order:
            runs = [_claimed_run(runtime, key) for _ in range(batch)]
            with _counted() as counts:
                start = time.perf_counter()
                cases[case](runs)
                elapsed = time.perf_counter() - start
            if turn >= WARMUP_ROUNDS:
                figures[case].seconds.append(elapsed)
                figures[case].statements, figures[case].commits = counts
    return figures


def _claimed_run(runtime: WorkerRuntime, key: IssuedKey) -> RunSuccess:
    """A job claimed as a worker claims it, its one output file written."""
    settings = runtime.settings
    with session_scope(settings.resolved_database_url) as session:
        new = jobs.NewJob(key.row.id, Operation.IMG2IMG, "v6", {}, {}, None, HOOK)
        job_id = jobs.create_job(session, new).id
    with session_scope(settings.resolved_database_url) as session:
        _outcome, job = jobs.claim_job(session, job_id, lease_s=60, max_attempts=3)
    assert job is not None
    name = f"{job.file_prefix}-0-{job.attempts}-bench.png"
    runtime.storage.save(name, b"\x89PNG bench")
    output = jobs.OutputRecord(0, name, 512, 512, seed=1)
    return RunSuccess(job, [output], {"W": 512, "H": 512}, 0.05, attempt=job.attempts)


@contextmanager
def _counted() -> Iterator[list[int]]:
    """[statements, commits] sent by this process while the block runs."""
    counts = [0, 0]

    def statement(*_args: Any) -> None:
        counts[0] += 1

    def commit(_session: Session) -> None:
        counts[1] += 1

    event.listen(Engine, "before_cursor_execute", statement)
    event.listen(Session, "after_commit", commit)
    try:
        yield counts
    finally:
        event.remove(Engine, "before_cursor_execute", statement)
        event.remove(Session, "after_commit", commit)


if __name__ == "__main__":
    main()
