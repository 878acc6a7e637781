"""The API's edge against hostile clients, measured from outside a real `darkroom api` process:
huge chunked bodies, slowloris connections, too many connections, lone UTF-16 surrogates.

Each threat, its defence and the test that proves it are listed in docs/SECURITY.md
("The API edge under hostile clients").
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from api.errors import MAX_BODY_BYTES, SafeJSONResponse
from darkroom.settings import Settings
from db.migrate import upgrade_to_head
from db.models import ApiKey
from db.repositories.jobs import OutputRecord, claim_job
from db.repositories.keys import create_key, revoke_key
from db.session import session_scope
from services.outcomes import succeed
from tests.api.test_fuzz import error_shape_problems
from tests.api.test_submit import IMG2IMG, MIXER_V5, MIXER_V6, PIX2PIX
from tests.support.system import free_port, log_tail, terminate, wait_healthy

HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 3.0
#: Above the slowloris test's 600 connections, so that /health finds room during it.
MAX_CONNECTIONS = 650
KEY_CACHE_S = 1.0
MAX_WAITS = 2
MiB = 1024 * 1024


@dataclass
class ApiProcess:
    """A `darkroom api` process on the embedded profile, and a key it accepts."""

    process: subprocess.Popen[bytes]
    port: int
    key: str
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ps(self) -> psutil.Process:
        return psutil.Process(self.process.pid)

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    def health_s(self, timeout: float = 5.0) -> float:
        """Seconds /health took to answer 200 on a fresh connection (fails otherwise)."""
        started = time.monotonic()
        response = httpx.get(self.base_url + "/health", timeout=timeout)
        assert response.status_code == 200, response.text
        return time.monotonic() - started


@contextmanager
def darkroom_api(workdir: Path, **settings: str) -> Iterator[ApiProcess]:
    """`darkroom api` on SQLite under `workdir` with DARKROOM_<settings>, until the block ends."""
    port = free_port()
    env = {
        **os.environ,
        "DARKROOM_DATA_DIR": str(workdir / "data"),
        "DARKROOM_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "DARKROOM_MODEL_PRESET": "tiny",
        "DARKROOM_URL_ALLOWLIST": "127.0.0.1/32",
        "DARKROOM_LOG_LEVEL": "WARNING",
        "DARKROOM_LOG_FORMAT": "text",
        "DARKROOM_API_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "DARKROOM_API_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        **{f"DARKROOM_{name.upper()}": value for name, value in settings.items()},
    }
    url = Settings(data_dir=workdir / "data").resolved_database_url
    upgrade_to_head(url)  # what `darkroom migrate` does, without starting an interpreter
    with session_scope(url) as session:
        key = create_key(session, "edge").plaintext
    log_path = workdir / "api.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "api", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    api = ApiProcess(process, port, key, log_path)
    try:
        wait_healthy(process, api.base_url, log_path, "darkroom api", timeout=30)
        yield api
    finally:
        terminate(process, timeout=30)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    edge = tmp_path_factory.mktemp("edge")
    limits = {
        "api_max_connections": str(MAX_CONNECTIONS),
        "api_key_cache_s": str(KEY_CACHE_S),
        "sync_wait_max_concurrent": str(MAX_WAITS),
    }
    with darkroom_api(edge, **limits) as running:
        yield running


def read_response(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """What the server sends until it closes the connection or `timeout` passes."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def answered(sock: socket.socket) -> bool:
    """Whether the server has sent something (or closed), without waiting or consuming it
    (poll, not select: a test process may hold descriptors past select's 1024)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def answer_json(raw: bytes) -> Any:
    """The JSON body of a raw HTTP response (content-length framed)."""
    _head, _, body = raw.partition(b"\r\n\r\n")
    return json.loads(body)


# --- bodies: the limit holds while the body is read --------------------------------------------


def test_a_chunked_body_past_the_limit_is_refused_while_it_is_read(api: ApiProcess) -> None:
    """600 MiB announced by no Content-Length: the API stops at the limit (413, closed) and its
    memory does not grow by the body; no key is needed to try."""
    rss_before = api.ps.memory_info().rss
    peak = [rss_before]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.05):
            peak.append(api.ps.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    chunk = b"x" * MiB
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", api.port)) as sock:
        sock.sendall(
            b"POST /api/v5/pix2pix HTTP/1.1\r\nHost: edge\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        sock.settimeout(10)
        try:
            while sent < 600 * MiB:
                if answered(sock):
                    break
                sock.sendall(frame)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_response(sock)
    sampling.set()
    sampler.join()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"connection: close" in answer.lower()
    assert not error_shape_problems(answer_json(answer))
    # Sent: the limit, plus what socket buffers on both sides held when the answer came.
    assert sent <= MAX_BODY_BYTES + 16 * MiB, sent
    grown = max(peak) - rss_before
    assert grown < 80 * MiB, f"API memory grew by {grown / MiB:.0f} MiB"
    api.health_s()


def test_a_declared_length_past_the_limit_is_refused_before_reading(api: ApiProcess) -> None:
    with socket.create_connection(("127.0.0.1", api.port)) as sock:
        sock.sendall(
            b"POST /api/v6/image_editing/fetch/1 HTTP/1.1\r\nHost: edge\r\n"
            + f"content-length: {600 * MiB}\r\n\r\n".encode()
        )
        answer = read_response(sock)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert not error_shape_problems(answer_json(answer))


# --- slow clients: deadlines on reading a request, and a cap on connections ----------------------


def slow_connection(port: int, head: bytes) -> socket.socket:
    """A connection that has sent the first part of a request and will dribble the rest."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    sock.send(head)
    return sock


def dribble(sockets: list[socket.socket], seconds: float) -> set[socket.socket]:
    """Send one header byte per connection every 0.2 s for `seconds`; the ones the server
    closed (by its deadline) are returned."""
    closed: set[socket.socket] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(closed) < len(sockets):
        for sock in sockets:
            if sock in closed:
                continue
            try:
                if sock.recv(4096) == b"":  # non-blocking: b"" only once the server closed
                    closed.add(sock)
                    continue
            except BlockingIOError:
                pass
            except ConnectionResetError:
                closed.add(sock)
                continue
            try:
                sock.send(b"a")
            except (BrokenPipeError, ConnectionResetError):
                closed.add(sock)
        time.sleep(0.2)
    return closed


def test_slowloris_connections_are_closed_after_the_header_deadline(api: ApiProcess) -> None:
    """600 connections each sending its headers a byte at a time: /health keeps answering, each
    is closed once its head has taken HEADER_TIMEOUT_S, and no descriptor is left behind."""
    fds_before = api.ps.num_fds()
    sockets = [
        slow_connection(api.port, b"GET /health HTTP/1.1\r\nHost: edge\r\nX-Slow: ")
        for _ in range(600)
    ]
    try:
        assert api.health_s() < 1.0
        started = time.monotonic()
        closed = dribble(sockets, HEADER_TIMEOUT_S + 8)
        assert api.health_s() < 1.0
        assert len(closed) == len(sockets), f"{len(sockets) - len(closed)} still open"
        assert time.monotonic() - started < HEADER_TIMEOUT_S + 6
    finally:
        for sock in sockets:
            sock.close()
    time.sleep(0.5)
    assert api.ps.num_fds() <= fds_before + 10
    assert "Too many open files" not in api.log_path.read_text(errors="replace")


def test_a_keep_alive_connection_gets_a_new_deadline_for_each_request(api: ApiProcess) -> None:
    """A first request answered, then the next one dribbled: the clock restarts with its first
    byte (uvicorn's own keep-alive timeout stops at that byte)."""
    with socket.create_connection(("127.0.0.1", api.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: edge\r\n\r\n")
        sock.settimeout(5)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.setblocking(False)
        sock.send(b"GET /health HTTP/1.1\r\nX-Slow: ")
        started = time.monotonic()
        assert dribble([sock], HEADER_TIMEOUT_S + 5) == {sock}
        assert HEADER_TIMEOUT_S - 0.5 < time.monotonic() - started < HEADER_TIMEOUT_S + 2


def test_a_body_sent_too_slowly_is_cut_off(api: ApiProcess) -> None:
    with socket.create_connection(("127.0.0.1", api.port)) as sock:
        sock.sendall(b"POST /api/v5/fetch/1 HTTP/1.1\r\nHost: edge\r\ncontent-length: 100\r\n\r\n")
        sock.setblocking(False)
        started = time.monotonic()
        assert dribble([sock], BODY_TIMEOUT_S + 5) == {sock}
        assert time.monotonic() - started < BODY_TIMEOUT_S + 2
    time.sleep(0.2)
    assert "Traceback" not in api.log_path.read_text(errors="replace")  # no log flood per client


def test_connections_past_the_cap_are_refused_with_retry_after(api: ApiProcess) -> None:
    fds_before = api.ps.num_fds()
    held = [socket.create_connection(("127.0.0.1", api.port)) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.3)  # accepted by the server
        with socket.create_connection(("127.0.0.1", api.port)) as extra:
            answer = read_response(extra)
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b"retry-after: 1" in answer.lower()
        assert not error_shape_problems(answer_json(answer))
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.3)
    assert api.health_s() < 1.0
    assert api.ps.num_fds() <= fds_before + 5


# --- places in flight: held only while the server works on a request -----------------------------

IN_FLIGHT = 4
WRITE_TIMEOUT_S = 2.0


def never_reading(port: int, requests: int) -> socket.socket:
    """A connection with a tiny receive buffer that pipelines `requests` GETs of the OpenAPI
    document (~100 KB each) and never reads an answer."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: edge\r\n\r\n" * requests)
    return sock


def test_clients_that_never_read_or_dribble_bodies_hold_no_place_and_are_cut_off(
    tmp_path: Path,
) -> None:
    """Twice IN_FLIGHT clients that never read their answers, and as many sending a body a
    byte at a time: another client is still served (before, each held one of the IN_FLIGHT
    places, the stalled readers with no time limit, and everyone else was told 503), and the
    stalled readers' connections are closed WRITE_TIMEOUT_S after their answers stop moving."""
    settings = {"api_max_in_flight": str(IN_FLIGHT), "api_write_timeout_s": str(WRITE_TIMEOUT_S)}
    with darkroom_api(tmp_path, **settings) as api:
        fds_before = api.ps.num_fds()
        stalled = [never_reading(api.port, 50) for _ in range(2 * IN_FLIGHT)]
        head = b"POST /api/v5/fetch/1 HTTP/1.1\r\nHost: edge\r\ncontent-length: 100\r\n\r\n{"
        dribbling = [slow_connection(api.port, head) for _ in range(2 * IN_FLIGHT)]
        try:
            time.sleep(1.0)  # the answers have filled the stalled readers' buffers
            for _ in range(3):
                answer = raw_post(api, "/api/v5/fetch/999999", {"key": api.key})
                assert answer.status_code == 404, answer.text
            started = time.monotonic()
            while api.ps.num_fds() > fds_before + 2 * IN_FLIGHT + 2:  # the dribblers' remain
                assert time.monotonic() - started < WRITE_TIMEOUT_S + 5, api.ps.num_fds()
                time.sleep(0.2)
        finally:
            for sock in stalled + dribbling:
                sock.close()
        assert api.health_s() < 1.0


def _finished_base64_job(api: ApiProcess, workdir: Path, png_bytes: int) -> int:
    """A `base64: yes` job recorded as succeeded with one output file of `png_bytes` bytes
    (as a worker records one), so that every fetch answers it inline."""
    body = {**IMG2IMG, "key": api.key, "base64": "yes", "init_image": "http://127.0.0.1:9/x.png"}
    job_id = int(raw_post(api, "/api/v1/enterprise/img2img", body).json()["id"])
    settings = Settings(data_dir=workdir / "data")
    settings.outputs_dir.mkdir(parents=True, exist_ok=True)
    (settings.outputs_dir / f"big-{job_id}.png").write_bytes(os.urandom(png_bytes))
    with session_scope(settings.resolved_database_url) as session:
        _outcome, job = claim_job(session, job_id, lease_s=60, max_attempts=3)
        assert job is not None
        output = OutputRecord(0, f"big-{job_id}.png", 512, 512, seed=1)
        succeed(session, settings, job, outputs=[output], meta={}, generation_time=1.0)
    return job_id


def test_large_answers_held_by_slow_readers_are_bounded_in_bytes(tmp_path: Path) -> None:
    """Fetches of a `base64: yes` job (a 12 MB answer, as four 1024x1024 samples make) by
    clients that never read: past DARKROOM_API_MAX_ANSWER_BYTES (two answers' worth) the others
    are told 503 + Retry-After at once instead of each holding its answer in the API's memory
    (the kernel takes up to 4 MB of a socket's answer, the rest stayed in the process); small
    answers are never held back; once the readers go, large answers are served again."""
    limits = {"api_max_answer_bytes": str(26 * MiB), "api_write_timeout_s": "30"}
    with darkroom_api(tmp_path, **limits) as api:
        job_id = _finished_base64_job(api, tmp_path, png_bytes=9 * MiB)
        fetch = f"/api/v1/enterprise/fetch/{job_id}"
        request = (
            f"POST {fetch} HTTP/1.1\r\nHost: edge\r\ncontent-type: application/json\r\n"
            f"content-length: {len(json.dumps({'key': api.key}))}\r\n\r\n"
            + json.dumps({"key": api.key})
        ).encode()
        readers = []
        for _ in range(6):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", api.port))
            sock.sendall(request)
            readers.append(sock)
        try:
            time.sleep(1.5)  # each answer is built; the first ones wait on their readers
            heads = [sock.recv(200) for sock in readers]
            busy = [head for head in heads if head.startswith(b"HTTP/1.1 503")]
            served = [head for head in heads if head.startswith(b"HTTP/1.1 200")]
            assert (len(served), len(busy)) == (2, 4), heads
            small = raw_post(api, "/api/v5/fetch/999999", {"key": api.key})
            assert small.status_code == 404, small.text
        finally:
            for sock in readers:
                sock.close()
        time.sleep(0.5)
        again = raw_post(api, fetch, {"key": api.key})
        assert again.status_code == 200, again.text[:200]
        assert len(again.json()["output"][0]) == 12 * MiB  # 9 MiB in base64


# --- keys: cached for a bounded time --------------------------------------------------------------


def test_a_revoked_key_stops_working_within_the_cache_time(api: ApiProcess) -> None:
    """Polls cost no key query while the key is cached; a revocation (another process) takes
    effect within DARKROOM_API_KEY_CACHE_S."""
    url = Settings(data_dir=api.log_path.parent / "data").resolved_database_url
    with session_scope(url) as session:
        issued = create_key(session, "soon-revoked")
    key = issued.plaintext
    job_id = raw_post(api, "/api/v5/pix2pix", {**PIX2PIX, "key": key}).json()["id"]
    fetch = f"/api/v5/fetch/{job_id}"
    assert raw_post(api, fetch, {"key": key}).status_code == 200
    with session_scope(url) as session:
        row = session.get(ApiKey, issued.row.id)
        assert row is not None
        revoke_key(session, row)
    revoked_at = time.monotonic()
    while raw_post(api, fetch, {"key": key}).status_code == 200:
        assert time.monotonic() - revoked_at < KEY_CACHE_S + 1.0, "revoked key still accepted"
        time.sleep(0.1)
    refused = raw_post(api, fetch, {"key": key})
    assert refused.status_code == 401
    assert refused.json() == {"status": "error", "message": "Invalid Api Key"}


# --- sync waits: bounded per process ----------------------------------------------------------


def test_waits_past_the_bound_answer_at_once(api: ApiProcess) -> None:
    """MAX_WAITS requests wait out their 3 s; the others get the processing answer at once,
    without Preference-Applied."""
    job_id = raw_post(api, "/api/v5/pix2pix", {**PIX2PIX, "key": api.key}).json()["id"]

    def wait() -> tuple[float, httpx.Response]:
        started = time.monotonic()
        response = httpx.post(
            f"{api.base_url}/api/v5/fetch/{job_id}",
            json={"key": api.key},
            headers={"prefer": "wait=3"},
            timeout=10,
        )
        return time.monotonic() - started, response

    with ThreadPoolExecutor(MAX_WAITS + 3) as pool:
        results = list(pool.map(lambda _: wait(), range(MAX_WAITS + 3)))
    waited = [r for s, r in results if s >= 2.9]
    at_once = [r for s, r in results if s < 1.5]
    seconds = [round(s, 2) for s, _ in results]
    assert len(waited) == MAX_WAITS, seconds
    assert len(at_once) == 3, seconds
    assert all(r.headers.get("preference-applied") == "wait=3" for r in waited)
    assert all("preference-applied" not in r.headers for r in at_once)
    assert all(r.json()["status"] == "processing" for _, r in results)


# --- text: lone UTF-16 surrogates are refused where the body is parsed --------------------------

SURROGATE = "x\ud800y"
SUBMITS = [
    ("/api/v5/img_mixer", MIXER_V5),
    ("/api/v6/image_editing/img_mixer", MIXER_V6),
    ("/api/v5/pix2pix", PIX2PIX),
    ("/api/v1/enterprise/img2img", IMG2IMG),
]


def raw_post(api: ApiProcess, path: str, body: dict[str, Any]) -> httpx.Response:
    """POST `body` as JSON with \\uXXXX escapes, the way a client can send a lone surrogate."""
    content = json.dumps(body).encode("ascii")
    headers = {"content-type": "application/json"}
    return httpx.post(api.base_url + path, content=content, headers=headers, timeout=10)


def hostile_value(value: Any) -> Any:
    """The field's value with a lone surrogate in it, in the field's own shape."""
    if isinstance(value, list):
        return [*value[:-1], SURROGATE]
    return SURROGATE


def assert_refused(response: httpx.Response, field: str) -> None:
    assert response.status_code == 422, (field, response.status_code, response.text)
    answer = response.json()
    assert not error_shape_problems(answer), answer
    assert list(answer["message"]) == [field], answer


@pytest.mark.parametrize(("path", "example"), SUBMITS)
def test_a_lone_surrogate_in_any_submit_field_is_a_422_naming_it(
    api: ApiProcess, path: str, example: dict[str, Any]
) -> None:
    """Every string field of the reference example (and key, webhook, track_id), while another
    client's valid submissions go on unaffected."""
    valid = {**PIX2PIX, "key": api.key}
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(raw_post, api, "/api/v5/pix2pix", valid) for _ in range(12)]
        for field in sorted({*example, "key", "webhook", "track_id"}):
            body = {**example, "key": api.key, field: hostile_value(example.get(field))}
            assert_refused(raw_post(api, path, body), field)
        for future in others:
            answer = future.result()
            assert answer.status_code == 200, answer.text
            assert answer.json()["status"] == "processing"


def test_surrogates_deep_in_a_field_or_in_a_name(api: ApiProcess) -> None:
    nested = {**MIXER_V6, "key": api.key, "init_image": [{"url": "a", SURROGATE: 1}]}
    assert_refused(raw_post(api, "/api/v6/image_editing/img_mixer", nested), "init_image")
    named = raw_post(api, "/api/v5/pix2pix", {**PIX2PIX, "key": api.key, SURROGATE: "x"})
    assert named.status_code == 400, named.text
    assert not error_shape_problems(named.json())


def test_a_lone_surrogate_in_a_fetch_body_is_a_422(api: ApiProcess) -> None:
    job_id = raw_post(api, "/api/v5/pix2pix", {**PIX2PIX, "key": api.key}).json()["id"]
    assert_refused(raw_post(api, f"/api/v5/fetch/{job_id}", {"key": SURROGATE}), "key")
    by_body = {"key": api.key, "request_id": SURROGATE}
    assert_refused(raw_post(api, "/api/v1/enterprise/fetch", by_body), "request_id")
    waited = {"key": api.key, "wait": SURROGATE}
    assert_refused(raw_post(api, f"/api/v6/image_editing/fetch/{job_id}", waited), "wait")
    fetched = raw_post(api, f"/api/v6/image_editing/fetch/{job_id}", {"key": api.key})
    assert fetched.status_code == 200, fetched.text
    assert fetched.json()["status"] == "processing"


def test_an_answer_that_echoes_a_surrogate_still_renders() -> None:
    """The last line of defence: any message holding client text is valid UTF-8 JSON."""
    body = SafeJSONResponse({"status": "error", "message": {"f": [f"bad {SURROGATE}"]}}).body
    assert json.loads(bytes(body).decode("utf-8"))["message"]["f"] == ["bad x\ufffdy"]
