"""How the API is served: uvicorn with deadlines and limits that uvicorn lacks.

uvicorn (h11) has a keep-alive timeout but no deadline on reading a request: a client that
sends its headers one byte at a time (slowloris) holds a connection, and a file descriptor,
for as long as it likes. `GuardedH11Protocol` closes a connection whose request head is not
complete within `header_timeout_s` of its first byte (or of the connection, for the first
request), restarting the clock for each request of a keep-alive connection, and one whose body
is not complete within `body_timeout_s`. It also refuses connections past `max_connections`
(503 and close), so descriptors run out neither for the process nor for `/health`, and one
whose client stops reading its answer (the socket's buffer full, writing paused) for
`write_timeout_s`: without it a client that pipelines requests and never reads holds its
connection, and its answers' memory, for ever. At start
the process raises its open-files soft limit to the hard limit. The figures and how they are
sized together are in docs/OPERATIONS.md ("Sizing the API").
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
from dataclasses import dataclass
from typing import Any, ClassVar

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from api.errors import BUSY_MESSAGE, BUSY_RETRY_S
from darkroom.settings import Settings

log = logging.getLogger(__name__)

#: Descriptors kept for what is not a client connection: database and broker connections,
#: the listener, log files, output files being streamed.
FD_RESERVE = 256


@dataclass(frozen=True)
class ConnectionLimits:
    """Deadlines on reading each request and on a stalled response, and the cap on open
    connections."""

    header_timeout_s: float
    body_timeout_s: float
    max_connections: int
    write_timeout_s: float = 30.0


def _busy_response() -> bytes:
    """A complete HTTP/1.1 503 in the error shape, for a connection refused before any request
    was read (h11 cannot answer before a request, so the bytes are written as they are)."""
    body = b'{"status":"error","message":"' + BUSY_MESSAGE.encode() + b'"}'
    head = (
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        f"retry-after: {BUSY_RETRY_S}\r\nconnection: close\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


BUSY_RESPONSE = _busy_response()

#: After answering a request whose body is still arriving: how long, and how much of the
#: rest, is read and dropped before the connection is closed.
LINGER_S = 2.0
LINGER_BYTES = 64 * 1024 * 1024  # more than socket buffers hold in flight


class _LingeringTransport(asyncio.Transport):
    """The connection's transport as uvicorn sees it; its `close` goes through the protocol,
    which lingers when the client is still sending a body (see GuardedH11Protocol.close)."""

    def __init__(self, real: asyncio.Transport, protocol: GuardedH11Protocol) -> None:
        super().__init__()
        self.real = real
        self._protocol = protocol

    def close(self) -> None:
        self._protocol.close()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self.real.is_closing()

    def write(self, data: bytes | bytearray | memoryview[int]) -> None:
        self.real.write(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.real.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self.real.pause_reading()

    def resume_reading(self) -> None:
        self.real.resume_reading()

    def is_reading(self) -> bool:
        return self.real.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.real.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.real.get_protocol()

    def get_write_buffer_size(self) -> int:
        return self.real.get_write_buffer_size()

    def abort(self) -> None:
        self.real.abort()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a read deadline per request and a cap on connections.

    The deadline is armed when a request's first byte is awaited or arrives, moved to the body
    deadline once h11 has parsed the head, and cancelled once the request is read; waiting for
    the application (a sync wait) is never cut short.
    """

    limits: ClassVar[ConnectionLimits] = ConnectionLimits(10.0, 60.0, 4096)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._write_deadline: asyncio.TimerHandle | None = None
        self._reading: object = None  # the h11 state the deadline is for: IDLE or SEND_BODY
        self._real: asyncio.Transport | None = None
        #: Answered and closing, while the client may still be sending (see `close`).
        self.lingering = False
        self._linger_left = LINGER_BYTES

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._real = transport
        super().connection_made(_LingeringTransport(transport, self))
        if len(self.connections) > self.limits.max_connections:
            transport.write(BUSY_RESPONSE)
            transport.close()
            return
        self._follow_request()

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self._linger_left -= len(data)  # read only to be dropped
            if self._linger_left <= 0 and self._real is not None:
                self._real.close()
            return
        super().data_received(data)
        self._follow_request()

    def close(self) -> None:
        """Close the connection. When the answer comes before the client has sent its whole
        body (a 413 stops reading it), closing at once would make the kernel reset the
        connection, and a reset can drop the answer before the client reads it: so send the
        answer and a FIN, and drop what still arrives for up to LINGER_S or LINGER_BYTES."""
        real = self._real
        if real is None or real.is_closing() or self.lingering:
            return
        if self.conn.their_state is not h11.SEND_BODY or not real.can_write_eof():
            real.close()
            return
        self.lingering = True
        self._disarm()
        real.write_eof()
        real.resume_reading()
        self.loop.call_later(LINGER_S, real.close)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # A pipelined request may have been parsed; otherwise uvicorn's keep-alive timeout
        # runs until the next request's first byte.
        if self.conn.their_state is not h11.IDLE:
            self._follow_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._stop_write_deadline()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The client stopped taking bytes: its answer must move again within the deadline."""
        super().pause_writing()
        if self._write_deadline is None:
            timeout_s = self.limits.write_timeout_s
            self._write_deadline = self.loop.call_later(timeout_s, self._write_timed_out)

    def resume_writing(self) -> None:
        self._stop_write_deadline()
        super().resume_writing()

    def _stop_write_deadline(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def _write_timed_out(self) -> None:
        self._write_deadline = None
        self.logger.debug("closing a connection: its client stopped reading the answer")
        if self._real is not None:
            self._real.abort()  # the buffered answer is dropped: nobody is reading it

    def _follow_request(self) -> None:
        """Arm, move or cancel the read deadline for the state h11 is now in."""
        state = self.conn.their_state
        if state is h11.IDLE and self.timeout_keep_alive_task is None:
            self._arm(h11.IDLE, self.limits.header_timeout_s)
        elif state is h11.SEND_BODY:
            self._arm(h11.SEND_BODY, self.limits.body_timeout_s)
        elif state is not h11.IDLE:
            self._disarm()

    def _arm(self, reading: object, timeout_s: float) -> None:
        if self._reading is reading and self._deadline is not None:
            return  # this part of the request is already on the clock: bytes do not reset it
        self._disarm()
        self._reading = reading
        self._deadline = self.loop.call_later(timeout_s, self._read_timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._reading = None, None

    def _read_timed_out(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            part = "head" if self._reading is h11.IDLE else "body"
            self.logger.debug("closing a connection: its request %s was too slow", part)
            if self._real is not None:
                self._real.close()  # no lingering for a client this slow


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """The protocol class with `limits` (uvicorn builds one instance per connection)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard limit; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %s: %s", soft, exc)
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_limits(settings: Settings, open_files: int) -> ConnectionLimits:
    """The limits from `settings`, with the connection cap kept below the open-files limit."""
    room = max(open_files - FD_RESERVE, 1) if open_files != resource.RLIM_INFINITY else None
    cap = settings.api_max_connections if room is None else min(settings.api_max_connections, room)
    return ConnectionLimits(
        settings.api_header_timeout_s,
        settings.api_body_timeout_s,
        cap,
        settings.api_write_timeout_s,
    )


def server_config(app: FastAPI, settings: Settings, host: str, port: int) -> uvicorn.Config:
    """uvicorn's configuration for the API process."""
    limits = connection_limits(settings, raise_open_files_limit())
    log.info(
        "serving with at most %d connections, %d requests in flight, %d threads",
        limits.max_connections,
        settings.api_max_in_flight,
        settings.api_threads,
    )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(limits),
        timeout_keep_alive=math.ceil(settings.api_keep_alive_s),
        backlog=settings.api_backlog,
        log_level=settings.log_level.lower(),
        log_config=None,  # uvicorn's loggers then reach the root handler (JSON lines or text)
    )


def serve(app: FastAPI, settings: Settings, host: str, port: int) -> None:
    """Serve `app` until SIGINT or SIGTERM."""
    uvicorn.Server(server_config(app, settings, host, port)).run()
