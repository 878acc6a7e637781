"""Pure ASGI middleware that keeps one API process responsive under load and hostile clients.

`BodyLimit` counts a request body's bytes as they are received and refuses the body (413,
connection closed) as soon as it passes the limit, chunked bodies included: the process never
holds more than the limit plus one received chunk.

`InFlightLimit` bounds the requests in progress: past the bound a request is answered 503 with
Retry-After at once, instead of queueing for a thread or a connection until its client gives
up. Liveness (`/health`) is never counted or refused, so that a busy process still answers it.

`AnswerBytesLimit` bounds the bytes of large answers being written at once: an answer sent in
one piece stays in memory until its client has read most of it, and a fetch of a `base64: yes`
job answers its PNGs inline (~15 MB for four 1024x1024 samples), so a few hundred slow readers
would otherwise hold gigabytes.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import BUSY_MESSAGE, BUSY_RETRY_S, TOO_LARGE, error_response

#: Paths that are neither counted nor refused: they cost no thread and no connection.
UNCOUNTED = frozenset({"/health"})


class InFlightLimit:
    """At most `limit` requests in progress at once, not counting UNCOUNTED paths nor the
    `parked()` requests that are in a sync wait (those hold no thread and no connection, and
    have a bound of their own).

    A request counts only while the server works on it: from its arrival, or, when it has a
    body, from the body's last byte (a client sending a body slowly costs a connection, bounded
    by the body deadline, not a place here), until its answer starts (writing the answer to a
    slow reader costs no thread; the write deadline bounds it). Otherwise a few hundred clients
    that dribble bodies or never read their answers would hold every place, and every other
    client would be told the server is busy."""

    def __init__(self, app: ASGIApp, limit: int, parked: Callable[[], int] = lambda: 0) -> None:
        self.app = app
        self.limit = limit
        self.parked = parked
        #: Requests now in progress; for tests and operators.
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNCOUNTED:
            await self.app(scope, receive, send)
            return
        place = _Place(self)
        if not _has_body(scope):
            if not place.take():
                busy = error_response(503, BUSY_MESSAGE, retry_header=BUSY_RETRY_S)
                await busy(scope, receive, send)
                return
            receive_then = receive
        else:

            async def receive_then() -> Message:
                message = await receive()
                body_done = message["type"] == "http.request" and not message.get("more_body")
                if body_done and not place.take():
                    raise ServiceBusy()
                return message

        async def send_then(message: Message) -> None:
            if message["type"] == "http.response.start":
                place.give_back()
            await send(message)

        try:
            await self.app(scope, receive_then, send_then)
        finally:
            place.give_back()


class _Place:
    """One request's place in an InFlightLimit: taken at most once, given back at most once."""

    def __init__(self, limit: InFlightLimit) -> None:
        self.limit = limit
        self.held = False

    def take(self) -> bool:
        """Take a place if one is free (one event loop per process: no lock needed)."""
        limit = self.limit
        if limit.in_flight - limit.parked() >= limit.limit:
            return False
        limit.in_flight += 1
        self.held = True
        return True

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self.limit.in_flight -= 1


def _has_body(scope: Scope) -> bool:
    """Whether the request announces a body (a length above zero, or chunks)."""
    headers = Headers(scope=scope)
    if "transfer-encoding" in headers:
        return True
    length = headers.get("content-length", "0").strip()
    return not (length.isdigit() and int(length) == 0)


class ServiceBusy(HTTPException):
    """Raised from `receive` when a body is complete and no place is free: a 503 with
    Retry-After in the error shape, like a request refused on arrival."""

    def __init__(self) -> None:
        super().__init__(503, BUSY_MESSAGE, headers={"Retry-After": str(BUSY_RETRY_S)})


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a body passes the limit; answered by api.errors as a 413 in
    the error shape (an HTTPException, so FastAPI's own body parsing passes it on too)."""

    def __init__(self) -> None:
        super().__init__(413, TOO_LARGE)


class BodyLimit:
    """Request bodies of at most `max_bytes`, counted while they are read."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            refusal = error_response(413, TOO_LARGE)
            refusal.headers["connection"] = "close"  # the body is never read
            await refusal(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        await self.app(scope, limited_receive, send)


#: An answer sent in one piece at least this large counts against `AnswerBytesLimit`; smaller
#: ones (every job shape without base64 outputs) are never held back.
LARGE_ANSWER_BYTES = 1024 * 1024
#: The pieces a large answer is written in (the server's write buffer pauses at 64 KiB).
ANSWER_PIECE_BYTES = 256 * 1024


def _declares_large(start: Message) -> bool:
    """Whether an answer's start declares a body of LARGE_ANSWER_BYTES or more. Streams
    (server-sent events, files) declare no length, or are passed on at once all the same."""
    length = Headers(raw=start.get("headers", [])).get("content-length", "")
    return length.isdigit() and int(length) >= LARGE_ANSWER_BYTES


async def _send_in_pieces(send: Send, body: bytes) -> None:
    """`body` as several body messages, each written once the previous one has drained."""
    view = memoryview(body)
    for offset in range(0, len(body), ANSWER_PIECE_BYTES):
        piece = bytes(view[offset : offset + ANSWER_PIECE_BYTES])
        more = offset + ANSWER_PIECE_BYTES < len(body)
        await send({"type": "http.response.body", "body": piece, "more_body": more})


class AnswerBytesLimit:
    """At most `limit` bytes of large answers (`LARGE_ANSWER_BYTES` and more, in one piece)
    being written at once. Past it such an answer is dropped and the client told 503 with
    Retry-After; an answer larger than `limit` alone still goes out when no other is being
    written. Streamed answers (output files) hold one chunk at a time and are not counted.
    An answer counts from its start until its last piece is written: it goes out in pieces of
    `ANSWER_PIECE_BYTES`, because the server waits for a slow reader only between two writes
    (one piece of 15 MB would be queued at once, and the answer would count for no time while
    staying in memory). The write deadline (`GuardedH11Protocol`) bounds the wait."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        #: Bytes of large answers being written now; for tests and operators.
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held = 0
        start: Message | None = None

        async def send_counted(message: Message) -> None:
            nonlocal held, start
            if message["type"] == "http.response.start" and _declares_large(message):
                start = message  # sent with the body, once a place for it is reserved
                return
            if start is not None:
                first, start = start, None
                body = message.get("body", b"")
                if not message.get("more_body") and len(body) >= LARGE_ANSWER_BYTES:
                    if not self._reserve(len(body)):
                        busy = error_response(503, BUSY_MESSAGE, retry_header=BUSY_RETRY_S)
                        await busy(scope, receive, send)
                        return
                    held = len(body)
                    await send(first)
                    await _send_in_pieces(send, body)
                    return
                await send(first)
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
            if start is not None:  # an answer that ended without a body message
                await send(start)
        finally:
            self.in_flight -= held

    def _reserve(self, size: int) -> bool:
        """Count `size` more bytes if the limit allows (the event loop's thread alone calls
        this: no lock)."""
        if self.in_flight and self.in_flight + size > self.limit:
            return False
        self.in_flight += size
        return True
