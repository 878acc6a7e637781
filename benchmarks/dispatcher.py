"""Dispatcher: webhook deliveries per second to a loopback receiver, beside plain POSTs.

    python -m benchmarks.dispatcher [--quick] [--processes 1,2] [--out results/dispatcher.json]

Each round creates `--count` finished jobs with their pending deliveries directly in the
database (as a worker's success does, through services.outcomes), then publishes their ids (for
the loop, one message per 8 deliveries, as a worker's batch sends beside it) and times until the
receiver has all of them. Cases, each with its own dispatcher processes:

- `celery x1`: one `darkroom dispatcher` with DARKROOM_WEBHOOK_LOOP=false, one Celery task per
  delivery (claim, sign, POST, record in two transactions): the dispatcher before the loop;
- `loop xN`: N `darkroom dispatcher` processes running the database-driven loop (batched claims
  and records; the published ids only wake it), for each N of `--processes`.

The baseline sends the same payloads from a plain httpx client at the same concurrency
(DARKROOM_WEBHOOK_CONCURRENCY), nothing else, in a round beside each dispatcher round. Rates are
medians over rounds; `ratio` is a case's rate over the median baseline of the same run.

A second table says where the CPU went (benchmarks/_cpu.py samples /proc through the run): CPU
ms per delivery of the dispatcher processes, the loopback receiver, this database's Postgres
backends and this process (which sends the baseline's POSTs), and how busy the whole machine
was (`machine busy`: its CPU time over the round's wall time and all its cores). Two processes
can only scale while the machine has cores to spare.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import ColumnElement, Interval, func, literal, select, update
from sqlalchemy.orm import Session

from benchmarks._cpu import MACHINE, OTHERS, POSTGRES, SELF, CpuSampler, run_sampler
from benchmarks._load import Sample, run_threads, summary
from benchmarks._loopback import Loopback
from benchmarks._services import (
    child_env,
    darkroom_argv,
    log_folder,
    new_key,
    production_settings,
    started,
)
from benchmarks.report import Report, median
from darkroom.identities import Operation
from darkroom.queue import DELIVER_WEBHOOK_TASK, make_celery, send
from darkroom.settings import Settings
from db.clock import DbNow
from db.models import DeliveryState, WebhookAttempt, WebhookDelivery
from db.repositories import jobs
from db.repositories.jobs import NewJob, OutputRecord
from db.session import session_scope
from services import outcomes

WARMUP = 20
#: Rows committed per transaction while preparing a round.
BATCH = 200
ROUND_TIMEOUT_S = 300.0
#: Deliveries recorded per worker transaction (DARKROOM_MAX_BATCH's default): beside the loop a
#: worker sends one message for them all.
WORKER_BATCH = 8
#: The run's own processes, found among this process's children by their command lines.
MARKERS = {"dispatcher": "cli.main dispatcher", "loopback receiver": "benchmarks._loopback"}
GROUPS = (*MARKERS, POSTGRES, SELF, OTHERS, MACHINE)
BUSY = "machine busy"
#: Each kept round's CPU ms per delivery by group (and BUSY, a fraction), per case.
CpuFigures = dict[str, list[dict[str, float]]]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; the JSON record it wrote."""
    args = _parser().parse_args(argv)
    if args.quick:
        args.count, args.rounds, args.processes = 30, 1, "1"
    overrides = {} if args.concurrency is None else {"webhook_concurrency": args.concurrency}
    with production_settings(**overrides) as settings, log_folder() as logs:
        args.concurrency = settings.webhook_concurrency
        report = Report("dispatcher", {k: v for k, v in vars(args).items() if k != "out"})
        with run_sampler(settings.resolved_database_url, MARKERS) as sampler:
            dispatched, baseline, cpu = _measure(settings, logs, args, sampler)
        report.checks = _checks(settings)
    _fill(report, dispatched, baseline)
    _cpu_table(report, cpu)
    return report.emit(args.out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dispatcher", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few deliveries: a smoke test")
    parser.add_argument("--out", type=Path, default=Path("results/dispatcher.json"))
    parser.add_argument("--count", type=int, default=1000, help="deliveries per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--concurrency", type=int, default=None, help="dispatcher threads (default: settings')"
    )
    parser.add_argument(
        "--processes", default="1,2", help="dispatcher processes of the loop cases, e.g. 1,2"
    )
    parser.add_argument(
        "--no-celery", action="store_true", help="leave out the one-task-per-delivery case"
    )
    return parser


def _cases(args: argparse.Namespace) -> list[tuple[str, int, bool]]:
    """(name, processes, loop) of each case to measure."""
    cases = [] if args.no_celery else [("celery x1", 1, False)]
    return cases + [(f"loop x{n}", n, True) for n in map(int, args.processes.split(","))]


def _measure(
    settings: Settings, logs: Path, args: argparse.Namespace, sampler: CpuSampler
) -> tuple[dict[str, list[Sample]], list[Sample], CpuFigures]:
    """Each case's rounds (after a warm-up), each beside a baseline round; the CPU of each."""
    dispatched: dict[str, list[Sample]] = {}
    baseline: list[Sample] = []
    cpu: CpuFigures = {}
    key_id = new_key(settings).row.id
    with Loopback() as receiver, httpx.Client(timeout=settings.webhook_timeout_s) as client:
        url = receiver.url("/hook")
        expected = 0  # POSTs the receiver has had so far
        for case, processes, loop in _cases(args):
            env = child_env(settings, DARKROOM_WEBHOOK_LOOP=str(loop).lower())
            with _dispatchers(processes, env, logs / case.replace(" ", "_")):
                for count, keep in [(WARMUP, False)] + [(args.count, True)] * args.rounds:
                    ids = _create_deliveries(settings, key_id, url, count)
                    sample, window = _dispatch(settings, receiver, ids, expected, celery=not loop)
                    payloads = _payloads(settings, ids)
                    plain_started = time.time()
                    plain = run_threads(_plain_post(client, url, payloads), count, args.concurrency)
                    plain_window = (plain_started, time.time())
                    expected += 2 * count
                    if keep:
                        dispatched.setdefault(case, []).append(sample)
                        baseline.append(plain)
                        cpu.setdefault(case, []).append(_per_delivery(sampler, window, count))
                        cpu.setdefault("baseline", []).append(
                            _per_delivery(sampler, plain_window, count)
                        )
    return dispatched, baseline, cpu


def _per_delivery(sampler: CpuSampler, window: tuple[float, float], count: int) -> dict[str, float]:
    """CPU ms per delivery of each group in `window`, and how busy the machine was in it."""
    spent = sampler.spent(*window)
    figures = {name: seconds * 1000 / count for name, seconds in spent.items()}
    cores_s = sampler.span(*window) * (os.cpu_count() or 1)
    figures[BUSY] = spent.get(MACHINE, 0.0) / cores_s if cores_s > 0 else 0.0
    return figures


@contextmanager
def _dispatchers(count: int, env: dict[str, str], log_stem: Path) -> Iterator[None]:
    """`count` dispatcher processes until the block ends."""
    with ExitStack() as stack:
        for n in range(count):
            log_path = log_stem.with_name(f"{log_stem.name}-{n}.log")
            stack.enter_context(started(darkroom_argv("dispatcher"), env, log_path))
        yield


def _create_deliveries(settings: Settings, key_id: int, url: str, count: int) -> list[int]:
    """`count` successful jobs, each with the pending delivery its success queued, held back
    (due in a day) so that no dispatcher nor sweeper starts on them before `_dispatch`."""
    ids: list[int] = []
    for size in _batches(count):
        with session_scope(settings.resolved_database_url) as session:
            batch = []
            for _ in range(size):
                job = jobs.create_job(session, _new_job(key_id, url))
                jobs.claim_job(session, job.id, lease_s=60, max_attempts=1)
                output = OutputRecord(0, f"{job.file_prefix}-0.png", 512, 512, seed=7)
                delivery_id = outcomes.succeed(
                    session, settings, job, outputs=[output], meta={"seed": 7}, generation_time=1.0
                )
                assert delivery_id is not None
                batch.append(delivery_id)
            _due_at(session, batch, DbNow() + literal(timedelta(days=1), Interval()))
            ids += batch
    return ids


def _due_at(session: Session, ids: list[int], when: ColumnElement[datetime]) -> None:
    """Make `ids` due at `when`, stamped as published then, as a worker's success stamps a
    delivery it publishes: the sweeper sends again only those left unclaimed past
    DARKROOM_LOST_MESSAGE_GRACE_S (it would otherwise resend every one, stamped at creation)."""
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id.in_(ids))
        .values(next_attempt_at=when, enqueued_at=when)
        .execution_options(synchronize_session=False)
    )


def _batches(count: int) -> Iterator[int]:
    """Sizes of the transactions that create `count` rows."""
    for start in range(0, count, BATCH):
        yield min(BATCH, count - start)


def _new_job(key_id: int, url: str) -> NewJob:
    """A job as the API stores it, with `url` as its webhook."""
    return NewJob(
        api_key_id=key_id,
        operation=Operation.PIX2PIX,
        endpoint="v5",
        params={"prompt": "make it snow", "seed": 7, "samples": 1, "track_id": "bench"},
        meta={"seed": 7, "prompt": "make it snow"},
        track_id="bench",
        webhook_url=url,
    )


def _dispatch(
    settings: Settings, receiver: Loopback, ids: list[int], before: int, *, celery: bool
) -> tuple[Sample, tuple[float, float]]:
    """Make `ids` due and publish them (for the loop, one id per WORKER_BATCH, as workers
    do); the time until the receiver has them all (it had `before` POSTs until then) and
    their attempt latencies, and that window (wall clock)."""
    broker = make_celery(settings)
    receiver.wait_for_count(before, ROUND_TIMEOUT_S)  # the last baseline POSTs are counted
    started_at = time.time()
    with session_scope(settings.resolved_database_url) as session:
        _due_at(session, ids, DbNow())
    # One message per batch of successes, as a worker's recording transaction sends beside the
    # loop (services.outbox); a Celery dispatcher needs one per delivery.
    step = 1 if celery else WORKER_BATCH
    for delivery_id in ids[::step]:
        if not send(broker, DELIVER_WEBHOOK_TASK, delivery_id):
            raise RuntimeError("the broker refused a delivery id")
    arrivals = receiver.wait_for_count(before + len(ids), ROUND_TIMEOUT_S)
    last = max(arrival.at for arrival in arrivals[before:])
    latencies = _attempt_latencies(settings, ids)
    sample = Sample(
        elapsed=last - started_at, latencies=latencies, errors=len(ids) - len(latencies)
    )
    return sample, (started_at, last)


def _attempt_latencies(settings: Settings, ids: list[int]) -> list[float]:
    """Each delivered delivery's POST time (seconds) as the dispatcher recorded it.

    The dispatcher records an attempt just after the receiver answers: wait for the records.
    """
    query = (
        select(WebhookAttempt.latency_ms)
        .join(WebhookDelivery)
        .where(WebhookDelivery.id.in_(ids), WebhookDelivery.state == DeliveryState.DELIVERED)
    )
    deadline = time.monotonic() + 30
    while True:
        with session_scope(settings.resolved_database_url) as session:
            latencies = [ms / 1000 for ms in session.scalars(query)]
        if len(latencies) >= len(ids) or time.monotonic() > deadline:
            return latencies
        time.sleep(0.1)


def _payloads(settings: Settings, ids: list[int]) -> list[str]:
    """The frozen payloads of `ids`, for the baseline to send."""
    query = select(WebhookDelivery.payload).where(WebhookDelivery.id.in_(ids))
    with session_scope(settings.resolved_database_url) as session:
        return list(session.scalars(query))


def _plain_post(client: httpx.Client, url: str, payloads: list[str]) -> Callable[[], bool]:
    """One baseline POST per call, taking the payloads in turn."""
    pending = iter(payloads)

    def call() -> bool:
        body = next(pending)  # next() on a list iterator is atomic under the GIL
        response = client.post(url, content=body, headers={"content-type": "application/json"})
        return response.status_code == 200

    return call


def _checks(settings: Settings) -> dict[str, Any]:
    """Deliveries made and attempts recorded: one attempt each, every one delivered."""
    with session_scope(settings.resolved_database_url) as session:
        created = session.scalar(select(func.count(WebhookDelivery.id)))
        delivered = session.scalar(
            select(func.count(WebhookDelivery.id)).where(
                WebhookDelivery.state == DeliveryState.DELIVERED
            )
        )
        attempts = session.scalar(select(func.count(WebhookAttempt.id)))
    return {"deliveries_created": created, "delivered": delivered, "attempts": attempts}


def _fill(report: Report, dispatched: dict[str, list[Sample]], baseline: list[Sample]) -> None:
    """One row per case and the baseline's, with each rate over the baseline's."""
    plain = summary(baseline)
    what = {
        "celery": "one Celery task per delivery: claim, sign, POST, record (before)",
        "loop": "database-driven loop: batched claim, sign, POST, batched record",
    }
    rates: dict[str, float] = {}
    for case, samples in dispatched.items():
        row = summary(samples)
        rates[case] = row["per_s"]
        ratio = row["per_s"] / plain["per_s"] if plain["per_s"] else None
        processes = case.split(" x")[1]
        description = f"{what[case.split()[0]]}, {processes} process(es)"
        report.add(case=case, what=description, **row, ratio=ratio)
    report.add(case="baseline", what="plain httpx POST of the same payloads", **plain, ratio=1.0)
    report.notes.append(
        "per_s: deliveries a second from first publish to last arrival (median over rounds); "
        "p50/p99: one POST's time (the dispatcher's as it recorded it in webhook_attempts); "
        "ratio: over the median baseline of this run (goal for loop x1 >= 0.5)"
    )
    if "loop x1" in rates and "loop x2" in rates and rates["loop x1"]:
        scaling = rates["loop x2"] / rates["loop x1"]
        report.checks["scaling_2_over_1"] = round(scaling, 2)
        report.notes.append(f"two loop processes over one: {scaling:.2f}x")


def _cpu_table(report: Report, cpu: CpuFigures) -> None:
    """CPU ms per delivery by group and the machine's busy fraction (medians over rounds), per
    case; in `checks` and printed as a table in a note."""
    columns = {
        case: {name: median([r.get(name, 0.0) for r in rounds]) for name in (*GROUPS, BUSY)}
        for case, rounds in cpu.items()
    }
    table = Report("cpu", {})
    for name in (*GROUPS, BUSY):
        table.add(ms_per_delivery=name, **{case: column[name] for case, column in columns.items()})
    report.checks["cpu_ms_per_delivery"] = columns
    report.notes.append(
        f"CPU per delivery by process (ms; '{BUSY}': the machine's CPU time over the round's "
        f"wall time on {os.cpu_count()} cores):\n" + table.table()
    )


if __name__ == "__main__":
    main()
