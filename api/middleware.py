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
