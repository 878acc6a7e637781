"""Structured logs: the formatter, and real worker and dispatcher processes writing JSON lines
that carry the job id and track_id of the job they were written for."""

from __future__ import annotations

import io
import json
import logging
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from darkroom.identities import FailureReason
from darkroom.logs import JsonFormatter, RedactKeysInAccessLog, job_context, resolve_format
from darkroom.queue import DELIVER_WEBHOOK_TASK, RUN_JOB_TASK, make_celery, send
from darkroom.settings import Settings
from db.models import Job, JobState
from db.repositories import keys
from db.session import session_scope
from services import outcomes
from tests.support.rows import job_row
from tests.support.servers import WebhookReceiver
from tests.support.system import settings_env


def formatted(record_logger: Callable[[logging.Logger], None]) -> dict[str, Any]:
    """The JSON object the formatter writes for what `record_logger` logs."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(f"test.logs.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    record_logger(logger)
    [line] = stream.getvalue().splitlines()
    entry: dict[str, Any] = json.loads(line)
    return entry


def test_lines_inside_a_job_context_carry_its_ids_and_lines_outside_do_not() -> None:
    with job_context(job_id=41, track_id="t-1"), job_context(delivery_id=9, track_id=None):
        inside = formatted(lambda log: log.warning("sent %s", "it"))
    outside = formatted(lambda log: log.info("idle"))

    assert inside["message"] == "sent it"
    assert inside["level"] == "WARNING"
    assert (inside["job_id"], inside["track_id"], inside["delivery_id"]) == (41, "t-1", 9)
    assert "job_id" not in outside
    assert outside["time"].endswith("+00:00")


def test_an_exception_is_kept_inside_its_one_line() -> None:
    def fail(log: logging.Logger) -> None:
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("it failed")

    entry = formatted(fail)
    assert "ValueError: boom" in entry["exception"]


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_auto_means_text_on_a_terminal_and_json_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", _Stream(tty=True))
    assert resolve_format("auto") == "text"
    monkeypatch.setattr(sys, "stderr", _Stream(tty=False))
    assert resolve_format("auto") == "json"
    assert resolve_format("text") == "text"


@contextmanager
def tier(command: str, env: dict[str, str], log_path: Path) -> Iterator[None]:
    """`darkroom <command>` logging to `log_path`; SIGTERM when the block ends.

    Logs go to stderr. Stdout is kept apart: Celery writes its shutdown notices there itself,
    as plain text, bypassing logging.
    """
    with log_path.open("wb") as log, log_path.with_suffix(".out").open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", command], env=env, stdout=out, stderr=log
        )
    try:
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def json_lines(log_path: Path) -> list[dict[str, Any]]:
    """Every line the process logged; each must be one JSON object."""
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]


def wait_until(what: str, check: Callable[[], bool], log_path: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what}: not after {timeout}s\n{log_path.read_text()[-3000:]}")


def tier_env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    return {
        **settings_env(settings, tmp_path / "data"),
        "PYTHONUNBUFFERED": "1",
        "DARKROOM_LOG_FORMAT": "json",
    }


@pytest.mark.slow
def test_the_dispatcher_writes_json_lines_with_job_track_and_delivery_ids(
    tmp_path: Path, settings: Settings, own_pg_url: str, receiver: WebhookReceiver
) -> None:
    settings = settings.model_copy(update={"database_url": own_pg_url})  # the sweeper runs
    with session_scope(own_pg_url) as session:
        key_id = keys.create_key(session, "logs").row.id
        job = job_row(session, key_id, track_id="track-d", webhook=receiver.url)
        job_id = job.id
        delivery_id = outcomes.fail(
            session, settings, job, "The image could not be read.", reason=FailureReason.REJECTED
        )
    assert delivery_id is not None
    log_path = tmp_path / "dispatcher.log"
    # An attempt that did not deliver is logged at INFO (a delivered one only at DEBUG).
    receiver.respond = lambda _request: (503, {})

    with tier("dispatcher", tier_env(settings, tmp_path), log_path):
        assert send(make_celery(settings), DELIVER_WEBHOOK_TASK, delivery_id)
        wait_until("webhook received", lambda: bool(receiver.snapshot()), log_path)
        wait_until("attempt logged", lambda: "webhook attempt" in log_path.read_text(), log_path)

    lines = json_lines(log_path)
    [attempt, *_retries] = [line for line in lines if line["message"] == "webhook attempt: 503"]
    assert attempt["level"] == "INFO"
    assert attempt["job_id"] == job_id
    assert attempt["track_id"] == "track-d"
    assert attempt["delivery_id"] == delivery_id
    assert any(" ready." in line["message"] for line in lines)


@pytest.mark.slow
def test_the_worker_writes_json_lines_with_job_and_track_ids(
    tmp_path: Path, settings: Settings
) -> None:
    with session_scope(settings.resolved_database_url) as session:
        key_id = keys.create_key(session, "logs").row.id
        job_id = job_row(session, key_id, track_id="track-w", params={"not": "a job spec"}).id
    log_path = tmp_path / "worker.log"

    def failed() -> bool:
        with session_scope(settings.resolved_database_url) as session:
            job = session.get(Job, job_id)
            return job is not None and job.state == JobState.FAILED

    with tier("worker", tier_env(settings, tmp_path), log_path):
        assert send(make_celery(settings), RUN_JOB_TASK, job_id)
        wait_until("job failed", failed, log_path)
        wait_until("task logged", lambda: "succeeded" in log_path.read_text(), log_path)

    lines = json_lines(log_path)
    [unreadable] = [line for line in lines if "unreadable parameters" in line["message"]]
    assert unreadable["job_id"] == job_id
    assert unreadable["track_id"] == "track-w"
    assert "ValidationError" in unreadable["exception"]
    [done] = [line for line in lines if "succeeded in" in line["message"]]
    assert done["job_id"] == job_id  # Celery's own line about the task


def test_keys_in_query_strings_never_reach_the_access_log() -> None:
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/outputs/ab-0.png?size=1&key=dk_secret123&x=2", "1.1", 200),
        None,
    )
    assert RedactKeysInAccessLog().filter(record)
    line = record.getMessage()
    assert "dk_secret123" not in line
    assert "/outputs/ab-0.png?size=1&key=[redacted]&x=2" in line
