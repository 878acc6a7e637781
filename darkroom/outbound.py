"""Outbound HTTP to URLs that clients give us: one overall deadline, a cap on decoded bytes.

Init-image downloads (GPU workers) and webhook attempts (the dispatcher) talk to servers that
may be hostile. httpx's timeouts bound each socket operation, not the exchange: a server that
drips its head or its body a byte at a time, each byte inside the read timeout, holds the caller
for as long as it likes. And httpx decodes every layer of a stacked `Content-Encoding` with no
size limit, so 1.8 kB of `gzip, gzip` inflates to gigabytes before any size check runs. Hence:

- `deadline(seconds)` starts an overall deadline for the current thread. A transport kept by
  `thread_transport` (or a client made by `new_client`) connects, does TLS, writes and reads
  through a network backend whose every socket operation waits at most the time left, so a
  dripping head is cut off, not only a dripping body. Requests also get a per-request timeout
  no longer than the time left.
- `send` (through a kept transport: webhooks, init images) and `stream` (through a client:
  model downloads) ask for `Accept-Encoding: identity`; `read_body` reads the raw bytes and
  undoes at most MAX_ENCODINGS gzip/deflate layers itself, a piece at a time, refusing (or
  truncating) once the raw bytes, any layer's output or the decoded total passes the caller's
  cap.

DNS resolution happens in the SSRF guard (`darkroom.urlguard`), before any of this, and is
bounded by the system resolver's own timeouts, not by the deadline.
"""

from __future__ import annotations

import contextlib
import functools
import ssl
import threading
import time
import typing
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import httpcore
import httpx

from darkroom.urlguard import PinnedRequest

#: Content codings stacked deeper than this are refused: nobody needs `gzip, gzip, gzip`.
MAX_ENCODINGS = 2
#: The most one inflate call may produce; layers hand each other pieces of at most this size.
PIECE_BYTES = 64 * 1024
#: Allowance above the caller's cap for the raw bytes and intermediate layers (gzip framing,
#: incompressible data that grew a little when compressed, a piece of read-ahead).
SLACK_BYTES = 64 * 1024
#: Writes go out in pieces so that each one waits at most the time left.
WRITE_PIECE_BYTES = 64 * 1024

_GZIP_WBITS = 16 + zlib.MAX_WBITS
_deadline: ContextVar[float | None] = ContextVar("outbound_deadline", default=None)


class OutboundError(Exception):
    """An exchange was cut short on our side; the message is safe to show the client."""


class DeadlineExceededError(OutboundError, TimeoutError):
    """The overall deadline passed."""


class TooLargeError(OutboundError):
    """The body, raw or decoded, is larger than the caller accepts."""


class BadEncodingError(OutboundError):
    """The body's content coding is unknown, stacked too deep, or its data is corrupt."""


# --- the deadline -------------------------------------------------------------------------


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Everything outbound in this block, on this thread, ends within `seconds` in total."""
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def time_left() -> float | None:
    """Seconds until the current deadline (negative once passed); None outside `deadline`."""
    expires = _deadline.get()
    return None if expires is None else expires - time.monotonic()


def check_deadline() -> None:
    """Raise DeadlineExceededError if the current deadline has passed."""
    left = time_left()
    if left is not None and left <= 0:
        raise DeadlineExceededError("the remote server took too long to answer")


def _clamp(timeout: float | None, expired: type[Exception]) -> float | None:
    """The per-operation timeout, shortened to the time left; `expired` once none is left."""
    left = time_left()
    if left is None:
        return timeout
    if left <= 0:
        raise expired("the overall deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A network stream whose every operation waits at most the time left to the deadline.

    With `coalesce`, small writes are held until the next read (or a write that would pass
    WRITE_PIECE_BYTES): httpcore writes a request's head and its body separately, and on a
    webhook's small POST the second send (a TCP segment, a wakeup of the receiver) cost ~6% of
    the attempt's CPU. The request goes out whole before its answer is awaited, as before.
    """

    def __init__(self, inner: httpcore.NetworkStream, *, coalesce: bool = False) -> None:
        self._inner = inner
        self._coalesce = coalesce
        self._held = b""

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._held:
            held, self._held = self._held, b""
            # As httpcore does with a failed request write: read anyway, since a server may
            # have answered (an early error response) before closing its side.
            with contextlib.suppress(httpcore.WriteError):
                self._write(held, timeout)
        return self._inner.read(max_bytes, _clamp(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if self._coalesce and len(self._held) + len(buffer) <= WRITE_PIECE_BYTES:
            self._held += buffer
            return
        if self._held:
            held, self._held = self._held, b""
            self._write(held, timeout)
        self._write(buffer, timeout)

    def _write(self, buffer: bytes, timeout: float | None) -> None:
        for start in range(0, len(buffer), WRITE_PIECE_BYTES):
            piece = buffer[start : start + WRITE_PIECE_BYTES]
            self._inner.write(piece, _clamp(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        # CPython bounds a whole handshake by the socket timeout, so this bounds TLS too.
        wait = _clamp(timeout, httpcore.ConnectTimeout)
        inner = self._inner.start_tls(ssl_context, server_hostname, wait)
        return _DeadlineStream(inner, coalesce=self._coalesce)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's own sync backend, its connections wrapped in `_DeadlineStream` (coalescing
    writes with `coalesce`)."""

    def __init__(self, *, coalesce: bool = False) -> None:
        self._inner = httpcore.SyncBackend()
        self._coalesce = coalesce

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        wait = _clamp(timeout, httpcore.ConnectTimeout)
        stream = self._inner.connect_tcp(host, port, wait, local_address, socket_options)
        return _DeadlineStream(stream, coalesce=self._coalesce)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        wait = _clamp(timeout, httpcore.ConnectTimeout)
        stream = self._inner.connect_unix_socket(path, wait, socket_options)
        return _DeadlineStream(stream, coalesce=self._coalesce)

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """The TLS context httpx makes by default (certifi, or SSL_CERT_FILE / SSL_CERT_DIR), made
    once per process: loading the CA bundle cost ~37 ms, paid by every init-image fetch when each
    client made its own. A client-side context is safe to share between threads."""
    return httpx.create_ssl_context(trust_env=True)


class _DeadlineTransport(httpx.HTTPTransport):
    """httpx's transport (its exception mapping included) over the deadline-aware backend."""

    def __init__(self, limits: httpx.Limits, *, coalesce: bool = False) -> None:
        context = _tls_context()
        super().__init__(verify=context, limits=limits, trust_env=False)
        # httpx offers no way to choose the network backend, so the pool it built is replaced
        # by the same pool (same TLS context and limits, no retries) over ours.
        self._pool = httpcore.ConnectionPool(
            ssl_context=context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_DeadlineBackend(coalesce=coalesce),
        )


def new_client(
    timeout: float, max_connections: int | None = None, keepalive_s: float = 5.0
) -> httpx.Client:
    """A client whose requests honour `deadline`; redirects are never followed by httpx.

    `timeout` bounds each operation as usual; inside `deadline` the time left bounds it too.
    Environment proxies are not used: a request must reach the address the guard checked.
    Idle connections are kept `keepalive_s` (httpx's default: 5 s).
    """
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=None,
        keepalive_expiry=keepalive_s,
    )
    return httpx.Client(
        transport=_DeadlineTransport(limits),
        timeout=timeout,
        follow_redirects=False,
        trust_env=False,
    )


#: Transports one thread keeps for `thread_transport` (one per host); the least recently used
#: goes.
THREAD_TRANSPORTS = 8
#: How long a kept connection may idle before it is closed instead of reused: below the shortest
#: common server keep-alive timeouts (Apache's 5 s), so that a server rarely closes one just as
#: a request goes out on it (httpx does not retry that request).
KEEPALIVE_S = 2.0
_threads = threading.local()


def thread_transport(target: PinnedRequest) -> httpx.BaseTransport:
    """A transport (a connection pool over the deadline-aware backend, writes coalesced) that
    this thread keeps for `target`'s host, for `send`, so that its connections stay open
    between requests (keep-alive: no TCP or TLS handshake per webhook or init image).

    One per host name, never one for all: httpcore pools connections by address, and a
    connection whose TLS was verified for one host name must not carry a request for another
    host that resolved to the same address. Per thread: the deadline is per thread, and this
    keeps a busy host from queueing on one pool (one shared pool's lock was a fifth of the
    dispatcher's time).
    """
    key = (target.url.partition(":")[0], target.host_header)
    transports: OrderedDict[tuple[str, str], httpx.BaseTransport]
    transports = _threads.__dict__.setdefault("transports", OrderedDict())
    transport = transports.pop(key, None)
    if transport is None:
        limits = httpx.Limits(
            max_connections=None, max_keepalive_connections=None, keepalive_expiry=KEEPALIVE_S
        )
        transport = _DeadlineTransport(limits, coalesce=True)
    transports[key] = transport
    while len(transports) > THREAD_TRANSPORTS:
        transports.popitem(last=False)[1].close()
    return transport


# --- one request ----------------------------------------------------------------------------

#: The headers an httpx.Client adds to every request, which `send` adds itself (a caller's own
#: headers win: the dispatcher names itself). Some image hosts refuse a request without a
#: User-Agent, so the client's is kept.
_CLIENT_HEADERS = {
    "accept": "*/*",
    "connection": "keep-alive",
    "user-agent": f"python-httpx/{httpx.__version__}",
}


@contextmanager
def send(
    method: str,
    target: PinnedRequest,
    *,
    timeout: float,
    headers: dict[str, str],
    content: str | bytes | None = None,
) -> Iterator[httpx.Response]:
    """`stream` straight through this thread's kept transport for `target`'s host
    (`thread_transport`), without an httpx.Client: how webhook attempts and init-image fetches
    go out.

    The same request on the wire, the same per-request timeouts (`timeout` for each operation,
    shortened to the time left) and the same errors (httpx's); what is skipped is the client's
    machinery these requests never use: merging defaults, the cookie jar (every answer's
    cookies were parsed into it), auth and redirect handling (the image fetch follows redirects
    itself, each hop checked by the guard; webhooks never follow them), event hooks. That was
    a quarter of a webhook attempt's CPU against a loopback receiver.
    """
    sent = {**_CLIENT_HEADERS, **headers, "host": target.host_header, "accept-encoding": "identity"}
    timeouts = _request_timeout(httpx.Timeout(timeout)).as_dict()
    request = httpx.Request(
        method,
        target.url,
        headers=sent,
        content=content,
        extensions={**target.extensions, "timeout": timeouts},
    )
    response = thread_transport(target).handle_request(request)
    try:
        yield response
    finally:
        response.close()


@contextmanager
def stream(
    client: httpx.Client,
    method: str,
    target: PinnedRequest,
    *,
    headers: dict[str, str] | None = None,
    content: str | bytes | None = None,
) -> Iterator[httpx.Response]:
    """One request at the guard's checked address, under the current deadline.

    The body comes back undecoded (read it with `read_body`); `identity` is asked for so that
    honest servers do not compress at all.
    """
    sent = {**(headers or {}), "host": target.host_header, "accept-encoding": "identity"}
    with client.stream(
        method,
        target.url,
        headers=sent,
        content=content,
        extensions=target.extensions,
        timeout=_request_timeout(client.timeout),
    ) as response:
        yield response


def _request_timeout(base: httpx.Timeout) -> httpx.Timeout:
    """The client's timeouts, each shortened to the time left (a plain client gets this too)."""
    left = time_left()
    if left is None:
        return base
    if left <= 0:
        raise DeadlineExceededError("the remote server took too long to answer")

    def cap(value: float | None) -> float:
        return left if value is None else min(value, left)

    return httpx.Timeout(
        connect=cap(base.connect), read=cap(base.read), write=cap(base.write), pool=cap(base.pool)
    )


# --- the body -------------------------------------------------------------------------------


def read_body(response: httpx.Response, max_bytes: int, *, truncate: bool = False) -> bytes:
    """The decoded body: TooLargeError past `max_bytes`, or with `truncate` its first `max_bytes`.

    Reads raw bytes and decodes them here (see `_Decoder`); the deadline is checked between
    reads as well as inside them.
    """
    declared = response.headers.get("content-length", "")
    if not truncate and declared.isdigit() and int(declared) > max_bytes + SLACK_BYTES:
        raise TooLargeError(f"the body is larger than {max_bytes} bytes")
    decoder = _Decoder(response.headers.get_list("content-encoding", split_commas=True), max_bytes)
    body = bytearray()
    try:
        for raw in response.iter_raw():
            check_deadline()
            for piece in decoder.feed(raw):
                body += piece
                if len(body) > max_bytes:
                    raise TooLargeError(f"the body is larger than {max_bytes} bytes")
    except TooLargeError:
        if not truncate:
            raise
    return bytes(body[:max_bytes])


class _Decoder:
    """Undoes a stack of content codings a piece at a time, every layer's output capped.

    Each layer is a zlib inflater asked for at most PIECE_BYTES per call, and each piece goes
    straight on to the next layer, so memory stays at a few pieces per layer whatever the
    compression ratio. The raw bytes and every layer's running total may not pass the cap
    plus SLACK_BYTES: this stops a layer that inflates into data the next layer then turns
    into nothing (empty deflate blocks), which the final size alone would never catch.
    """

    def __init__(self, encodings: list[str], max_bytes: int) -> None:
        codings = [name.strip().lower() for name in encodings]
        codings = [name for name in codings if name not in ("", "identity")]
        if len(codings) > MAX_ENCODINGS:
            raise BadEncodingError(f"more than {MAX_ENCODINGS} content encodings are stacked")
        # Content-Encoding lists codings in the order they were applied: undo the last first.
        self._layers = [_Inflater(name) for name in reversed(codings)]
        self._cap = max_bytes + SLACK_BYTES
        self._raw = 0

    def feed(self, raw: bytes) -> Iterator[bytes]:
        """The decoded pieces that `raw`, the next raw bytes of the body, yields."""
        self._raw += len(raw)
        if self._raw > self._cap:
            raise TooLargeError(f"the body is larger than {self._cap} bytes")
        yield from self._through(raw, 0)

    def _through(self, data: bytes, depth: int) -> Iterator[bytes]:
        if depth == len(self._layers):
            yield data
            return
        layer = self._layers[depth]
        for piece in layer.feed(data):
            if layer.produced > self._cap:
                raise TooLargeError(f"the decoded body is larger than {self._cap} bytes")
            yield from self._through(piece, depth + 1)


class _Inflater:
    """One gzip or deflate layer that never makes more than PIECE_BYTES in one call."""

    def __init__(self, coding: str) -> None:
        if coding not in ("gzip", "x-gzip", "deflate"):
            raise BadEncodingError(f"the content encoding {coding!r} is not supported")
        self._coding = coding
        self._inflater: typing.Any = None  # zlib's decompressobj type is not importable
        self._pending = b""  # deflate: bytes held until its first two say zlib or raw
        self.produced = 0

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Inflate `data` piece by piece; bytes after the end of the stream are ignored."""
        if self._inflater is None:
            data = self._start(data)
            if self._inflater is None:
                return
        while not self._inflater.eof:
            try:
                piece = self._inflater.decompress(data, PIECE_BYTES)
            except zlib.error:
                raise BadEncodingError(f"the {self._coding} data is corrupt") from None
            data = self._inflater.unconsumed_tail
            self.produced += len(piece)
            if piece:
                yield piece
            if not data and len(piece) < PIECE_BYTES:
                return  # input used up and nothing left buffered inside zlib

    def _start(self, data: bytes) -> bytes:
        """Make the inflater once the coding's format is known; the input to feed it."""
        if self._coding != "deflate":
            self._inflater = zlib.decompressobj(_GZIP_WBITS)
            return data
        # HTTP's deflate is zlib-wrapped, but some servers send raw deflate: the zlib header's
        # first two bytes tell them apart (method 8 and a checksum divisible by 31).
        data = self._pending + data
        if len(data) < 2:
            self._pending = data
            return b""
        wrapped = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
        self._inflater = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        return data
