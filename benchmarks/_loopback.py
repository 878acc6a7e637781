"""A loopback HTTP server for benchmarks: serves fixed files and records every POST's arrival.

It runs in a child process of its own (asyncio, HTTP/1.1 keep-alive), so that neither the
dispatcher nor the baseline's sender threads share an interpreter lock with it, and it stays
well ahead of either. Each POST becomes one line on the child's stdout ("<unix time> <id>",
the id of the webhook payload or -1), which a thread of the parent collects.

Bodies must come with a content-length (no chunked encoding): httpx sends one for both senders.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

STARTUP_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Arrival:
    """One POST: when it arrived (wall clock, comparable with database timestamps), and the
    `id` of its webhook payload (-1 when it had none)."""

    at: float
    job_id: int


@dataclass
class Loopback:
    """The child server: serves `files` (URL path -> local file, as image/png) on GET."""

    files: dict[str, Path] = field(default_factory=dict)
    arrivals: list[Arrival] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)
    port: int = 0

    def __enter__(self) -> Loopback:
        served = [f"{path}={file}" for path, file in self.files.items()]
        argv = [sys.executable, "-m", "benchmarks._loopback", *served]
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.port = _read_port(self.process)
        self.reader = threading.Thread(target=self._collect, args=(self.process.stdout,))
        self.reader.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=STARTUP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.reader.join(timeout=STARTUP_TIMEOUT_S)

    def url(self, path: str) -> str:
        """The full URL of `path` on this server."""
        return f"http://127.0.0.1:{self.port}{path}"

    def _collect(self, lines: IO[str]) -> None:
        for line in lines:
            at, job_id = line.split()
            with self.changed:
                self.arrivals.append(Arrival(float(at), int(job_id)))
                self.changed.notify_all()

    def count(self) -> int:
        """POSTs received so far."""
        with self.changed:
            return len(self.arrivals)

    def wait_for_count(self, count: int, timeout: float) -> list[Arrival]:
        """Block until `count` POSTs have arrived in all (TimeoutError after `timeout` s)."""
        with self.changed:
            if not self.changed.wait_for(lambda: len(self.arrivals) >= count, timeout):
                raise TimeoutError(f"{len(self.arrivals)} of {count} POSTs arrived")
            return list(self.arrivals)

    def wait_for_job(self, job_id: int, timeout: float) -> Arrival:
        """The first POST whose payload is job `job_id`'s webhook."""
        with self.changed:
            if not self.changed.wait_for(lambda: _first(self.arrivals, job_id), timeout):
                raise TimeoutError(f"no webhook for job {job_id} in {timeout:.0f}s")
            found = _first(self.arrivals, job_id)
        assert found is not None
        return found


def _first(arrivals: list[Arrival], job_id: int) -> Arrival | None:
    return next((arrival for arrival in arrivals if arrival.job_id == job_id), None)


def _read_port(process: subprocess.Popen[str]) -> int:
    """The port the child announces on its first line."""
    assert process.stdout is not None
    first = process.stdout.readline()
    if not first.startswith("port "):
        process.kill()
        raise RuntimeError(f"the loopback server did not start: {first!r}")
    return int(first.split()[1])


# The child process.


def _job_id(body: bytes) -> int:
    """The `id` of a webhook payload, or -1."""
    try:
        value = json.loads(body).get("id")
    except (ValueError, AttributeError):
        return -1
    return value if isinstance(value, int) else -1


def _response(status: int, body: bytes, content_type: str) -> bytes:
    reason = {200: "OK", 404: "Not Found"}[status]
    head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\n"
    return f"{head}content-length: {len(body)}\r\n\r\n".encode() + body


async def _serve(files: dict[str, bytes]) -> None:
    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                request_line, *header_lines = head.split("\r\n")
                method, path, _version = request_line.split(" ", 2)
                headers = {
                    name.strip().lower(): value.strip()
                    for name, _, value in (line.partition(":") for line in header_lines if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                writer.write(_answer(method, path, body, files))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", 0)
    print(f"port {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def _answer(method: str, path: str, body: bytes, files: dict[str, bytes]) -> bytes:
    """Record a POST (one stdout line) and answer it; serve a GET from `files`."""
    if method == "POST":
        print(f"{time.time()} {_job_id(body)}", flush=True)
        return _response(200, b"ok", "text/plain")
    found = files.get(path)
    if found is None:
        return _response(404, b"not found", "text/plain")
    return _response(200, found, "image/png")


def _main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(description="loopback server (see benchmarks._loopback)")
    parser.add_argument("files", nargs="*", help="PATH=FILE: serve FILE's bytes at PATH")
    args = parser.parse_args(argv)
    pairs = (item.split("=", 1) for item in args.files)
    files = {path: Path(file).read_bytes() for path, file in pairs}
    asyncio.run(_serve(files))


if __name__ == "__main__":
    _main(sys.argv[1:])
