"""Init-image fetches keep their connections (outbound.thread_transport): a thread's second fetch
from a host reuses the first one's connection, and another host name never does, even at the
same address (its TLS would have been verified for the first name). A kept connection that the
server closes as the request arrives costs one more try, not the job."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from PIL import Image

from darkroom.settings import Settings
from worker.images import fetch_image


class KeepAliveServer:
    """A loopback HTTP/1.1 server (keep-alive) that serves one PNG and counts connections.
    With `one_per_connection`, it closes a connection, unanswered, on its second request."""

    def __init__(self, body: bytes, one_per_connection: bool = False) -> None:
        self.connections = 0
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            answered = False

            def setup(self) -> None:
                outer.connections += 1
                super().setup()

            def do_GET(self) -> None:
                outer.requests += 1
                if one_per_connection and self.answered:
                    self.close_connection = True
                    return
                self.answered = True
                self.send_response(200)
                self.send_header("content-type", "image/png")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def red_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 30, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def server() -> Iterator[KeepAliveServer]:
    running = KeepAliveServer(red_png())
    yield running
    running.stop()


@pytest.fixture
def closing_server() -> Iterator[KeepAliveServer]:
    running = KeepAliveServer(red_png(), one_per_connection=True)
    yield running
    running.stop()


def test_a_thread_s_fetches_from_one_host_share_a_connection(server: KeepAliveServer) -> None:
    settings = Settings(url_allowlist=["127.0.0.1/32"])
    url = f"http://127.0.0.1:{server.port}/a.png"
    first, second = fetch_image(url, settings), fetch_image(url, settings)
    assert first.getpixel((0, 0)) == second.getpixel((0, 0)) == (200, 30, 10)
    assert (server.requests, server.connections) == (2, 1)


def test_another_host_name_at_the_same_address_gets_its_own_connection(
    server: KeepAliveServer,
) -> None:
    settings = Settings(url_allowlist=["127.0.0.1/32", "::1/128", "localhost"])
    for host in ("127.0.0.1", "localhost", "127.0.0.1", "localhost"):
        fetch_image(f"http://{host}:{server.port}/a.png", settings)
    assert (server.requests, server.connections) == (4, 2)


def test_a_kept_connection_closed_under_the_request_is_retried_once(
    closing_server: KeepAliveServer,
) -> None:
    settings = Settings(url_allowlist=["127.0.0.1/32"])
    url = f"http://127.0.0.1:{closing_server.port}/a.png"
    fetch_image(url, settings)
    assert fetch_image(url, settings).getpixel((0, 0)) == (200, 30, 10)
    # The second fetch went out on the kept connection, was dropped, and went out again.
    assert (closing_server.requests, closing_server.connections) == (3, 2)
