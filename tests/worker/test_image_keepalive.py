"""Init-image fetches keep their connections (outbound.thread_client): a thread's second fetch
from a host reuses the first one's connection, and another host name never does, even at the
same address (its TLS would have been verified for the first name)."""

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
    """A loopback HTTP/1.1 server (keep-alive) that serves one PNG and counts connections."""

    def __init__(self, body: bytes) -> None:
        self.connections = 0
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                outer.connections += 1
                super().setup()

            def do_GET(self) -> None:
                outer.requests += 1
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


@pytest.fixture
def server() -> Iterator[KeepAliveServer]:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 30, 10)).save(buffer, format="PNG")
    running = KeepAliveServer(buffer.getvalue())
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
