"""Dispatcher: webhook deliveries per second to a loopback receiver, beside plain POSTs.

    python -m benchmarks.dispatcher [--quick] [--out results/dispatcher.json]

Each round creates `--count` finished jobs with their pending deliveries directly in the
database (as a worker's success does, through darkroom.outcomes), then publishes their ids and
times until the receiver has all of them; `darkroom dispatcher` (its thread pool at
DARKROOM_WEBHOOK_CONCURRENCY) claims, signs, POSTs and records each one. The baseline sends
the same payloads from a plain httpx client at the same concurrency, nothing else. Rounds of
the two alternate; rates are medians over rounds.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

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
from benchmarks.report import Report
from darkroom import outcomes
from darkroom.queue import DELIVER_WEBHOOK_TASK, make_celery, send
from darkroom.settings import Settings
from db.models import DeliveryState, Operation, WebhookAttempt, WebhookDelivery
from db.repositories import jobs
from db.repositories.jobs import NewJob, OutputRecord
from db.session import session_scope

WARMUP = 20
#: Rows committed per transaction while preparing a round.
BATCH = 200
ROUND_TIMEOUT_S = 300.0


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; the JSON record it wrote."""
    args = _parser().parse_args(argv)
    if args.quick:
        args.count, args.rounds = 30, 1
    overrides = {} if args.concurrency is None else {"webhook_concurrency": args.concurrency}
    with production_settings(**overrides) as settings, log_folder() as logs:
        args.concurrency = settings.webhook_concurrency
        report = Report("dispatcher", {k: v for k, v in vars(args).items() if k != "out"})
        dispatched, baseline = _measure(settings, logs, args)
        report.checks = _checks(settings)
    _fill(report, summary(dispatched), summary(baseline))
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
    return parser


def _measure(
    settings: Settings, logs: Path, args: argparse.Namespace
) -> tuple[list[Sample], list[Sample]]:
    """Alternate rounds of the dispatcher and the baseline, after a warm-up of each."""
    dispatched, baseline = [], []
    key_id = new_key(settings).row.id
    with (
        Loopback() as receiver,
        started(darkroom_argv("dispatcher"), child_env(settings), logs / "dispatcher.log"),
        httpx.Client(timeout=settings.webhook_timeout_s) as client,
    ):
        url = receiver.url("/hook")
        for count, keep in [(WARMUP, False)] + [(args.count, True)] * args.rounds:
            ids = _create_deliveries(settings, key_id, url, count)
            sample = _dispatch(settings, receiver, ids)
            plain = run_threads(
                _plain_post(client, url, _payloads(settings, ids)), count, args.concurrency
            )
            if keep:
                dispatched.append(sample)
                baseline.append(plain)
    return dispatched, baseline


def _create_deliveries(settings: Settings, key_id: int, url: str, count: int) -> list[int]:
    """`count` successful jobs, each with the pending delivery its success queued."""
    ids: list[int] = []
    for size in _batches(count):
        with session_scope(settings.resolved_database_url) as session:
            for _ in range(size):
                job = jobs.create_job(session, _new_job(key_id, url))
                jobs.claim_job(session, job.id, lease_s=60, max_attempts=1)
                output = OutputRecord(0, f"{job.file_prefix}-0.png", 512, 512, seed=7)
                delivery_id = outcomes.succeed(
                    session, settings, job, outputs=[output], meta={"seed": 7}, generation_time=1.0
                )
                assert delivery_id is not None
                ids.append(delivery_id)
    return ids


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


def _dispatch(settings: Settings, receiver: Loopback, ids: list[int]) -> Sample:
    """Publish `ids`; the time until the receiver has them all and their attempt latencies."""
    broker = make_celery(settings)
    before = receiver.count()
    started_at = time.time()
    for delivery_id in ids:
        if not send(broker, DELIVER_WEBHOOK_TASK, delivery_id):
            raise RuntimeError("the broker refused a delivery id")
    arrivals = receiver.wait_for_count(before + len(ids), ROUND_TIMEOUT_S)
    last = max(arrival.at for arrival in arrivals[before:])
    latencies = _attempt_latencies(settings, ids)
    return Sample(elapsed=last - started_at, latencies=latencies, errors=len(ids) - len(latencies))


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


def _fill(report: Report, dispatched: dict[str, Any], baseline: dict[str, Any]) -> None:
    """The dispatcher's row and the baseline's, with the rate ratio."""
    ratio = dispatched["per_s"] / baseline["per_s"] if baseline["per_s"] else None
    report.add(
        case="dispatcher",
        what="darkroom dispatcher: claim, sign, POST, record",
        **dispatched,
        ratio=ratio,
    )
    report.add(case="baseline", what="plain httpx POST of the same payloads", **baseline, ratio=1.0)
    report.notes.append(
        "per_s: deliveries a second from first publish to last arrival (median over rounds); "
        "p50/p99: one POST's time (the dispatcher's as it recorded it in webhook_attempts)"
    )


if __name__ == "__main__":
    main()
