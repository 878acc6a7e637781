"""One webhook attempt at a time, against a loopback receiver and the real database."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import format_datetime

import pytest
from standardwebhooks.webhooks import Webhook

from darkroom.identities import FailureReason, Operation
from darkroom.settings import Settings
from db.models import DeliveryState, JobState, WebhookDelivery, utcnow
from db.repositories import jobs
from db.repositories.jobs import ClaimOutcome, NewJob, OutputRecord
from db.repositories.keys import IssuedKey
from db.session import session_scope
from services import outcomes
from tests.support.servers import Received, WebhookReceiver
from worker.webhooks import dispatcher
from worker.webhooks.dispatcher import MAX_RETRY_AFTER_S, deliver, next_delay

STEP_S = 0.25  # a little longer than the test schedule's 0.2 s retries


@dataclass(frozen=True)
class Attempt:
    status_code: int | None
    latency_ms: float
    error: str | None
    attempted_at: datetime


@dataclass(frozen=True)
class Snapshot:
    state: DeliveryState
    attempt_count: int
    next_attempt_at: datetime
    last_error: str | None
    message_id: str
    payload: str
    attempts: list[Attempt]


def _delivery(settings: Settings, key: IssuedKey, url: str, *, succeed: bool = False) -> int:
    """A terminal job with `url` as its webhook, and the delivery its outcome queued."""
    with session_scope(settings.resolved_database_url) as session:
        job = jobs.create_job(
            session,
            NewJob(
                api_key_id=key.row.id,
                operation=Operation.IMG2IMG,
                endpoint="v6",
                params={"prompt": "fox", "track_id": "track-7"},
                meta={},
                track_id="track-7",
                webhook_url=url,
            ),
        )
        if succeed:
            outcome, _ = jobs.claim_job(session, job.id, lease_s=60, max_attempts=3)
            assert outcome == ClaimOutcome.CLAIMED
            out = OutputRecord(0, f"{job.file_prefix}-0.png", 64, 64, 42)
            delivery_id = outcomes.succeed(
                session, settings, job, outputs=[out], meta={"seed": 42}, generation_time=0.5
            )
        else:
            delivery_id = outcomes.fail(
                session,
                settings,
                job,
                "The init image was unreadable.",
                reason=FailureReason.REJECTED,
            )
    assert delivery_id is not None
    return delivery_id


def _snapshot(settings: Settings, delivery_id: int) -> Snapshot:
    with session_scope(settings.resolved_database_url) as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None
        return Snapshot(
            state=row.state,
            attempt_count=row.attempt_count,
            next_attempt_at=row.next_attempt_at,
            last_error=row.last_error,
            message_id=row.message_id,
            payload=row.payload,
            attempts=[
                Attempt(a.status_code, a.latency_ms, a.error, a.attempted_at) for a in row.attempts
            ],
        )


def _script(receiver: WebhookReceiver, *answers: tuple[int, dict[str, str]]) -> None:
    """Answer the receiver's requests in order; the last answer repeats."""
    queue = list(answers)

    def respond(_request: Received) -> tuple[int, dict[str, str]]:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    receiver.respond = respond


def test_delivered_signed_on_first_attempt(
    settings: Settings, api_key: IssuedKey, receiver: WebhookReceiver
) -> None:
    delivery_id = _delivery(settings, api_key, receiver.url, succeed=True)
    deliver(delivery_id, settings)

    snap = _snapshot(settings, delivery_id)
    assert snap.state == DeliveryState.DELIVERED
    assert snap.attempt_count == 1
    assert snap.last_error is None
    assert len(snap.attempts) == 1
    assert snap.attempts[0].status_code == 200
    assert snap.attempts[0].error is None
    assert snap.attempts[0].latency_ms > 0

    [got] = receiver.snapshot()
    assert got.path == "/hook"
    assert got.headers["webhook-id"] == snap.message_id
    assert got.headers["content-type"] == "application/json"
    assert got.body.decode() == snap.payload
    payload = Webhook(api_key.row.webhook_secret).verify(got.body, got.headers)
    assert payload["status"] == "success"
    assert payload["track_id"] == "track-7"
    assert payload["meta"] == {"seed": 42}
    with session_scope(settings.resolved_database_url) as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None
        assert row.job is not None
        prefix = row.job.file_prefix
    assert payload["output"] == [f"{settings.public_url}/outputs/{prefix}-0.png"]
    assert got.headers["user-agent"] == dispatcher.USER_AGENT

    forged = dict(got.headers, **{"webhook-id": "msg_forged"})
    with pytest.raises(Exception, match=r"(?i)signature"):
        Webhook(api_key.row.webhook_secret).verify(got.body, forged)

    deliver(delivery_id, settings)  # already delivered: nothing more is sent
    assert len(receiver.snapshot()) == 1
    assert _snapshot(settings, delivery_id).attempt_count == 1


def test_retries_keep_the_same_message_id(
    settings: Settings, api_key: IssuedKey, receiver: WebhookReceiver
) -> None:
    _script(receiver, (500, {}), (500, {}), (200, {}))
    delivery_id = _delivery(settings, api_key, receiver.url)

    deliver(delivery_id, settings)
    snap = _snapshot(settings, delivery_id)
    assert snap.state == DeliveryState.PENDING
    assert snap.last_error == "HTTP 500"
    assert len(receiver.snapshot()) == 1

    for _ in range(2):
        time.sleep(STEP_S)
        deliver(delivery_id, settings)

    snap = _snapshot(settings, delivery_id)
    assert snap.state == DeliveryState.DELIVERED
    assert [a.status_code for a in snap.attempts] == [500, 500, 200]
    got = receiver.snapshot()
    assert len(got) == 3
    assert {r.headers["webhook-id"] for r in got} == {snap.message_id}
    assert {r.body for r in got} == {snap.payload.encode()}
    for request in got:
        body = Webhook(api_key.row.webhook_secret).verify(request.body, request.headers)
        assert body["status"] == "failed"
        assert body["message"] == "The init image was unreadable."


def test_gone_stops_at_once(
    settings: Settings, api_key: IssuedKey, receiver: WebhookReceiver
) -> None:
    _script(receiver, (410, {}))
    delivery_id = _delivery(settings, api_key, receiver.url)
    deliver(delivery_id, settings)
    time.sleep(STEP_S)
    deliver(delivery_id, settings)

    snap = _snapshot(settings, delivery_id)
    assert snap.state == DeliveryState.FAILED
    assert [a.status_code for a in snap.attempts] == [410]
    assert len(receiver.snapshot()) == 1


def test_redirect_is_a_failure_not_followed(
    settings: Settings, api_key: IssuedKey, receiver: WebhookReceiver
) -> None:
    _script(receiver, (302, {"Location": receiver.url + "/moved"}))
    delivery_id = _delivery(settings, api_key, receiver.url)
    deliver(delivery_id, settings)

    snap = _snapshot(settings, delivery_id)
    assert snap.state == DeliveryState.PENDING
    assert [a.status_code for a in snap.attempts] == [302]
    assert snap.last_error == "HTTP 302"
    assert [r.path for r in receiver.snapshot()] == ["/hook"]


def test_timeout_is_recorded(
    settings: Settings, api_key: IssuedKey, receiver: WebhookReceiver
) -> None:
    quick = settings.model_copy(update={"webhook_timeout_s": 0.5})

    def slow(_request: Received) -> tuple[int, dict[str, str]]:
        time.sleep(1.0)
        return 200, {}

    receiver.respond = slow
    delivery_id = _delivery(quick, api_key, receiver.url)
    started = time.monotonic()
    deliver(delivery_id, quick)
    elapsed = time.monotonic() - started

    assert elapsed < 1.0
    snap = _snapshot(quick, delivery_id)
    assert snap.state == DeliveryState.PENDING
    [attempt] = snap.attempts
    assert attempt.error == "timeout"
    assert attempt.status_code is None
    assert attempt.latency_ms >= 450
    assert snap.last_error == "timeout"


def test_schedule_exhausted_fails(
    settings: Settings, api_key: IssuedKey, receiver: WebhookReceiver
) -> None:
    _script(receiver, (503, {}))
    delivery_id = _delivery(settings, api_key, receiver.url)
    tries = len(settings.webhook_schedule_s)
    for _ in range(tries + 1):
        deliver(delivery_id, settings)
        time.sleep(STEP_S)

    snap = _snapshot(settings, delivery_id)
    assert snap.state == DeliveryState.FAILED
    assert snap.attempt_count == tries
    assert [a.status_code for a in snap.attempts] == [503] * tries
    assert len(receiver.snapshot()) == tries


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_retry_after_is_honoured(
    settings: Settings,
    api_key: IssuedKey,
    receiver: WebhookReceiver,
    form: str,
) -> None:
    wait = 120
    value = (
        str(wait)
        if form == "seconds"
        else format_datetime(utcnow() + timedelta(seconds=wait + 2), usegmt=True)
    )
    _script(receiver, (503, {"Retry-After": value}))
    delivery_id = _delivery(settings, api_key, receiver.url)
    before = utcnow()
    deliver(delivery_id, settings)
    after = utcnow()

    snap = _snapshot(settings, delivery_id)
    assert snap.state == DeliveryState.PENDING
    assert snap.next_attempt_at >= before + timedelta(seconds=wait)
    assert snap.next_attempt_at <= after + timedelta(seconds=wait + 3)
    time.sleep(STEP_S)
    deliver(delivery_id, settings)  # the schedule alone would be due by now
    assert len(receiver.snapshot()) == 1


def test_ssrf_refused_without_a_request(
    settings: Settings, api_key: IssuedKey, receiver: WebhookReceiver
) -> None:
    strict = settings.model_copy(update={"url_allowlist": []})
    delivery_id = _delivery(strict, api_key, receiver.url)
    deliver(delivery_id, strict)

    snap = _snapshot(strict, delivery_id)
    [attempt] = snap.attempts
    assert attempt.status_code is None
    assert attempt.error is not None
    assert attempt.error.startswith("refused")
    assert "non-public" in attempt.error
    assert snap.state == DeliveryState.PENDING
    assert receiver.snapshot() == []


def test_connection_refused_is_recorded(settings: Settings, api_key: IssuedKey) -> None:
    with socket.socket() as probe:  # a loopback port with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    delivery_id = _delivery(settings, api_key, f"http://127.0.0.1:{port}/hook")
    deliver(delivery_id, settings)
    [attempt] = _snapshot(settings, delivery_id).attempts
    assert attempt.status_code is None
    assert attempt.error == "connection error: ConnectError"


def test_invalid_port_is_recorded_not_raised(settings: Settings, api_key: IssuedKey) -> None:
    delivery_id = _delivery(settings, api_key, "http://127.0.0.1:99999/hook")
    deliver(delivery_id, settings)
    [attempt] = _snapshot(settings, delivery_id).attempts
    assert attempt.error is not None
    assert attempt.error.startswith("refused")


class _DripServer:
    """Answers 200 at once, then sends its body one byte every `gap` seconds."""

    def __init__(self, length: int, gap: float) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.length, self.gap = length, gap
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(f"HTTP/1.1 200 OK\r\ncontent-length: {self.length}\r\n\r\n".encode())
            try:
                for _ in range(self.length):
                    time.sleep(self.gap)
                    conn.sendall(b"x")
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def test_attempt_is_bounded_by_the_timeout(settings: Settings, api_key: IssuedKey) -> None:
    quick = settings.model_copy(update={"webhook_timeout_s": 0.5})
    server = _DripServer(length=10, gap=0.3)
    try:
        delivery_id = _delivery(quick, api_key, server.url)
        started = time.monotonic()
        deliver(delivery_id, quick)
        elapsed = time.monotonic() - started
    finally:
        server.close()
    assert elapsed < quick.webhook_timeout_s + 1.0


def test_next_delay_follows_the_schedule(settings: Settings) -> None:
    fixed = settings.model_copy(update={"webhook_schedule_s": [0.0, 5.0, 300.0]})
    assert next_delay(0, fixed, None) == 0.0
    assert next_delay(1, fixed, None) == 5.0
    assert next_delay(2, fixed, None) == 300.0
    assert next_delay(3, fixed, None) is None
    assert next_delay(7, fixed, 10.0) is None


def test_next_delay_jitter_bounds(settings: Settings) -> None:
    jittery = settings.model_copy(
        update={"webhook_schedule_s": [0.0, 100.0], "webhook_jitter": 0.1}
    )
    delays = [next_delay(1, jittery, None) for _ in range(500)]
    values = [d for d in delays if d is not None]
    assert len(values) == 500
    assert all(90.0 <= d <= 110.0 for d in values)
    assert len(set(values)) > 1
    assert min(values) < 97
    assert max(values) > 103


def test_next_delay_retry_after(settings: Settings) -> None:
    fixed = settings.model_copy(update={"webhook_schedule_s": [0.0, 5.0, 300.0]})
    assert next_delay(1, fixed, 60.0) == 60.0  # lengthens the wait
    assert next_delay(2, fixed, 60.0) == 300.0  # never shortens it
    assert next_delay(1, fixed, 10 * MAX_RETRY_AFTER_S) == MAX_RETRY_AFTER_S
    assert next_delay(1, fixed, 0.0) == 5.0


def test_payload_is_frozen_at_queue_time(settings: Settings, api_key: IssuedKey) -> None:
    delivery_id = _delivery(settings, api_key, "http://127.0.0.1:9/hook")
    payload = json.loads(_snapshot(settings, delivery_id).payload)
    assert payload["status"] == "failed"
    assert payload["message"] == payload["messege"] == "The init image was unreadable."
    with session_scope(settings.resolved_database_url) as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None
        assert row.job is not None
        assert row.job.state == JobState.FAILED
        assert payload["id"] == row.job_id


def test_a_delivered_attempt_logs_at_debug_and_a_refused_one_at_info(
    settings: Settings,
    api_key: IssuedKey,
    receiver: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Operators still see every attempt that did not deliver at INFO; a delivered one only
    # at DEBUG (its attempt row and the metrics keep it).
    _script(receiver, (500, {}), (200, {}))
    delivery_id = _delivery(settings, api_key, receiver.url)
    with caplog.at_level(logging.DEBUG, logger=dispatcher.__name__):
        deliver(delivery_id, settings)
        time.sleep(STEP_S)
        deliver(delivery_id, settings)

    lines = [r for r in caplog.records if r.getMessage().startswith("webhook attempt")]
    assert [(r.levelno, r.getMessage()) for r in lines] == [
        (logging.INFO, "webhook attempt: 500"),
        (logging.DEBUG, "webhook attempt: 200"),
    ]
    assert _snapshot(settings, delivery_id).state == DeliveryState.DELIVERED
