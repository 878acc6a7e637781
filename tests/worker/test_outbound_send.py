"""Webhook POSTs through `outbound.send`: a kept transport, one write per small request."""

from __future__ import annotations

import httpcore
import httpx
import pytest

from darkroom import outbound
from darkroom.urlguard import check_url
from tests.support.servers import WebhookReceiver


class _Recording(httpcore.NetworkStream):
    """A network stream that records what is written and read, in order."""

    def __init__(self, *, fail_writes: bool = False) -> None:
        self.events: list[tuple[str, bytes]] = []
        self.fail_writes = fail_writes

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self.events.append(("read", b""))
        return b"answer"

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if self.fail_writes:
            raise httpcore.WriteError("the peer closed")
        self.events.append(("write", buffer))

    def close(self) -> None:
        self.events.append(("close", b""))


def test_a_coalescing_stream_sends_head_and_body_in_one_write_before_reading() -> None:
    inner = _Recording()
    stream = outbound._DeadlineStream(inner, coalesce=True)
    stream.write(b"POST / HTTP/1.1\r\n\r\n")
    stream.write(b"{}")
    assert inner.events == []
    assert stream.read(100) == b"answer"
    assert inner.events == [("write", b"POST / HTTP/1.1\r\n\r\n{}"), ("read", b"")]


def test_a_plain_stream_writes_at_once() -> None:
    inner = _Recording()
    stream = outbound._DeadlineStream(inner)
    stream.write(b"head")
    stream.write(b"body")
    assert inner.events == [("write", b"head"), ("write", b"body")]


def test_a_large_write_is_not_held() -> None:
    inner = _Recording()
    stream = outbound._DeadlineStream(inner, coalesce=True)
    stream.write(b"head")
    body = b"x" * (outbound.WRITE_PIECE_BYTES + 1)
    stream.write(body)
    assert [event for event, _ in inner.events] == ["write", "write", "write"]
    assert b"".join(data for _, data in inner.events) == b"head" + body


def test_a_held_write_that_fails_still_lets_the_answer_be_read() -> None:
    # As httpcore does for a request write that fails: a server may have answered first.
    inner = _Recording(fail_writes=True)
    stream = outbound._DeadlineStream(inner, coalesce=True)
    stream.write(b"head")
    assert stream.read(100) == b"answer"


def test_a_held_write_honours_the_deadline() -> None:
    stream = outbound._DeadlineStream(_Recording(), coalesce=True)
    stream.write(b"head")
    with outbound.deadline(-1.0), pytest.raises(httpcore.WriteTimeout):
        stream.read(100)


def test_send_posts_with_the_client_s_headers_and_keeps_the_connection(
    receiver: WebhookReceiver,
) -> None:
    target = check_url(receiver.url, ["127.0.0.1/32"]).pinned()
    transport = outbound.thread_transport(target)
    assert outbound.thread_transport(target) is transport
    with (
        outbound.deadline(5.0),
        outbound.send("POST", target, timeout=5.0, headers={"x-a": "1"}, content="{}") as response,
    ):
        assert response.status_code == 200
        assert outbound.read_body(response, 10) == b"ok"
    [got] = receiver.snapshot()
    assert got.body == b"{}"
    assert got.headers["x-a"] == "1"
    assert got.headers["host"] == target.host_header
    assert got.headers["accept-encoding"] == "identity"
    assert got.headers["accept"] == "*/*"
    assert got.headers["user-agent"] == httpx.Client().headers["user-agent"]
    assert got.headers["content-length"] == "2"
