"""Loopback HTTP servers for tests: an image host and a webhook receiver (127.0.0.1 only)."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image


def png(width: int, height: int, color: tuple[int, int, int]) -> bytes:
    """A solid-colour PNG with a diagonal stripe, so images differ in structure too."""
    image = Image.new("RGB", (width, height), color)
    for i in range(min(width, height)):
        image.putpixel((i, i), (255 - color[0], 255 - color[1], 255 - color[2]))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 with an ephemeral port, run in a daemon thread."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class ImageServer(_Server):
    """Serves fixed bytes at fixed paths; counts the requests it saw."""

    def __init__(self, files: dict[str, tuple[bytes, str]]) -> None:
        self.files = files
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                found = server.files.get(self.path)
                if found is None:
                    self.send_error(404)
                    return
                body, content_type = found
                self.send_response(200)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        super().__init__(Handler)

    def url(self, path: str) -> str:
        return self.base_url + path


@dataclass
class Received:
    """One webhook POST as the receiver saw it."""

    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class WebhookReceiver:
    """Records every POST; `respond` picks each answer (status, headers), by default 200."""

    respond: Callable[[Received], tuple[int, dict[str, str]]] = lambda _r: (200, {})
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: _Server | None = None

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                got = Received(
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    self.rfile.read(length),
                )
                with receiver.lock:
                    receiver.received.append(got)
                status, headers = receiver.respond(got)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = _Server(Handler)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.base_url + "/hook"

    def snapshot(self) -> list[Received]:
        with self.lock:
            return list(self.received)


def response_head(status: int = 200, headers: dict[str, str] | None = None) -> bytes:
    """An HTTP/1.1 response head, for ScriptedServer."""
    lines = [f"HTTP/1.1 {status} Scripted"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class ScriptedServer:
    """Answers every connection with fixed bytes, `head` then `body`, dripping either part one
    byte every `gap` seconds when asked: a hostile image host or webhook receiver (loopback).

    Counts connections, and the most it was serving at once.
    """

    def __init__(
        self,
        head: bytes,
        body: bytes = b"",
        *,
        drip_head: bool = False,
        drip_body: bool = False,
        gap: float = 0.5,
    ) -> None:
        self.head, self.body, self.gap = head, body, gap
        self.drip_head, self.drip_body = drip_head, drip_body
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.connections = 0
        self.active = 0
        self.most_active = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}{path}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.sock.close()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self.lock:
            self.connections += 1
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            with conn:
                _read_request(conn)
                self._send(conn, self.head, self.drip_head)
                self._send(conn, self.body, self.drip_body)
        except OSError:
            pass  # the client gave up
        finally:
            with self.lock:
                self.active -= 1

    def _send(self, conn: socket.socket, data: bytes, drip: bool) -> None:
        if not drip:
            conn.sendall(data)
            return
        for index in range(len(data)):
            if self.stopping.wait(self.gap):
                return
            conn.sendall(data[index : index + 1])


def _read_request(conn: socket.socket) -> None:
    """Read a request's head and its Content-Length body (enough for GET and small POSTs)."""
    conn.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    deadline = time.monotonic() + 5
    while len(rest) < length and time.monotonic() < deadline:
        chunk = conn.recv(65536)
        if not chunk:
            return
        rest += chunk
