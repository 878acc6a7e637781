"""Pure ASGI middleware that keeps one API process responsive under load and hostile clients.

`BodyLimit` counts a request body's bytes as they are received and refuses the body (413,
connection closed) as soon as it passes the limit, chunked bodies included: the process never
holds more than the limit plus one received chunk.

`InFlightLimit` bounds the requests in progress: past the bound a request is answered 503 with
Retry-After at once, instead of queueing for a thread or a connection until its client gives
up. Liveness (`/health`) is never counted or refused, so that a busy process still answers it.
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
    have a bound of their own)."""

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
        if self.in_flight - self.parked() >= self.limit:
            busy = error_response(503, BUSY_MESSAGE, retry_header=BUSY_RETRY_S)
            await busy(scope, receive, send)
            return
        self.in_flight += 1  # one event loop per process: no lock needed
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


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
