"""Hostile servers against every outbound fetch: dripping heads and bodies, encoding bombs, and
images at the pixel limits. Every server is on loopback; see darkroom/outbound.py."""

from __future__ import annotations

import base64
import gzip
import io
import struct
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from darkroom.identities import Operation
from darkroom.jobspec import JobSpec
from darkroom.limits import MAX_PIXELS, MAX_REQUEST_PIXELS
from darkroom.queue import make_celery
from darkroom.settings import Settings
from db.models import DeliveryState, Job, WebhookDelivery, utcnow
from db.repositories import webhooks
from db.repositories.keys import IssuedKey
from db.session import session_scope
from tests.support.rows import failed_with_delivery, queued_job
from tests.support.servers import ImageServer, ScriptedServer, WebhookReceiver, response_head
from worker.images import ImageInputError, decode_image, fetch_image, fetch_images
from worker.webhooks.dispatcher import deliver, lease_seconds

MIB = 1024 * 1024
DEADLINE_S = 1.5
SLACK_S = 1.0  # scheduling on a shared two-core machine; a drip would take far longer
GAP_S = 0.5  # one byte every half second: each read well inside any per-read timeout
BOMB_MIB = 256  # what each bomb inflates to: far beyond every cap used below
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- builders -----------------------------------------------------------------------------


def zero_bomb(mebibytes: int, coding: str) -> bytes:
    """`mebibytes` MiB of zeros as one valid gzip or zlib (HTTP deflate) stream, built from one
    compressed MiB repeated, so the zeros are never all in memory."""
    wbits = 31 if coding == "gzip" else 15
    chunk = bytes(MIB)
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    first = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    end = compressor.flush(zlib.Z_FINISH)
    check = 0 if coding == "gzip" else 1
    for _ in range(mebibytes):
        check = zlib.crc32(chunk, check) if coding == "gzip" else zlib.adler32(chunk, check)
    if coding == "gzip":
        trailer = struct.pack("<II", check, (mebibytes * MIB) & 0xFFFFFFFF)
    else:
        trailer = struct.pack(">I", check)
    return first + again * (mebibytes - 1) + end[: -len(trailer)] + trailer


def encode(data: bytes, coding: str) -> bytes:
    return gzip.compress(data) if coding == "gzip" else zlib.compress(data)


def bomb(codings: list[str]) -> bytes:
    """A body for `Content-Encoding: <codings>` that decodes to BOMB_MIB MiB of zeros."""
    body = zero_bomb(BOMB_MIB, codings[0])
    for coding in codings[1:]:
        body = encode(body, coding)
    return body


def png_of(width: int, height: int) -> bytes:
    """A 1-bit PNG: a few kB however many pixels it has."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG's signature, IHDR and an empty IDAT: it opens, and fails only if decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + data))
    return struct.pack(">I", len(data)) + kind + data + crc


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture
def serve() -> Iterator[Callable[..., ScriptedServer]]:
    """Start ScriptedServers for a test and stop them after it."""
    started: list[ScriptedServer] = []

    def start(*args: Any, **kwargs: Any) -> ScriptedServer:
        server = ScriptedServer(*args, **kwargs)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def peak_traced(call: Callable[[], object]) -> tuple[object, int]:
    """What `call` returned (or raised) and the peak of Python memory allocated meanwhile."""
    tracemalloc.start()
    try:
        try:
            result: object = call()
        except Exception as exc:
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- init images: time ----------------------------------------------------------------------


def quick(settings: Settings) -> Settings:
    return settings.model_copy(update={"image_fetch_timeout_s": DEADLINE_S})


@pytest.mark.parametrize("part", ["head", "body"])
def test_a_dripping_image_server_is_cut_off_at_the_deadline(
    settings: Settings, serve: Callable[..., ScriptedServer], part: str
) -> None:
    body = png_of(64, 64)
    head = response_head(200, {"content-type": "image/png", "content-length": str(len(body))})
    server = serve(head, body, drip_head=part == "head", drip_body=part == "body", gap=GAP_S)

    started = time.monotonic()
    with pytest.raises(ImageInputError) as caught:
        fetch_image(server.url("/slow.png"), quick(settings))
    elapsed = time.monotonic() - started

    assert DEADLINE_S - 0.1 <= elapsed < DEADLINE_S + SLACK_S
    assert str(caught.value) == (
        f"Unable to fetch image from provided URL: no complete answer within {DEADLINE_S:g} s"
    )


def test_the_deadline_covers_every_redirect(
    settings: Settings, serve: Callable[..., ScriptedServer]
) -> None:
    slow = serve(response_head(200, {"content-length": "10"}), b"x" * 10, drip_body=True, gap=0.4)
    hop = serve(response_head(302, {"location": slow.url("/img"), "content-length": "0"}))

    started = time.monotonic()
    with pytest.raises(ImageInputError, match="no complete answer within"):
        fetch_image(hop.url("/start"), quick(settings))
    assert time.monotonic() - started < DEADLINE_S + SLACK_S


def _tiny_runtime(settings: Settings, data_dir: Path) -> Any:
    """A GPU worker's runtime (CPU, tiny models) on the test database."""
    from worker.jobs import WorkerRuntime
    from worker.models.cache import ModelCache
    from worker.models.tiny import ensure_tiny_models

    shared = quick(settings).model_copy(update={"data_dir": data_dir})
    ensure_tiny_models(shared.tiny_models_dir)
    return WorkerRuntime(
        settings=shared, broker=make_celery(shared), cache=ModelCache(2, device="cpu")
    )


def _new_job(settings: Settings, key: IssuedKey, init_image: str) -> int:
    spec = JobSpec(
        operation=Operation.PIX2PIX,
        prompt="make it blue",
        steps=2,
        guidance_scale=7.0,
        seed=7,
        samples=1,
        init_images=[init_image],
    )
    return queued_job(settings, key.row.id, spec=spec)


def _state(settings: Settings, job_id: int) -> tuple[str, str | None]:
    with session_scope(settings.resolved_database_url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.state.value, job.error


def test_a_worker_fails_the_dripping_job_then_runs_the_next(
    settings: Settings,
    api_key: IssuedKey,
    image_server: ImageServer,
    serve: Callable[..., ScriptedServer],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    import torch

    from worker.jobs import run_job

    torch.set_num_threads(1)
    runtime = _tiny_runtime(settings, tmp_path_factory.mktemp("tiny"))
    body = png_of(64, 64)
    head = response_head(200, {"content-type": "image/png", "content-length": str(len(body))})
    dripping = serve(head, body, drip_body=True, gap=GAP_S)
    stalled = _new_job(runtime.settings, api_key, dripping.url("/drip.png"))
    honest = _new_job(runtime.settings, api_key, image_server.url("/red.png"))

    started = time.monotonic()
    run_job(stalled, runtime)
    assert time.monotonic() - started < DEADLINE_S + SLACK_S + 1.0  # + recording the failure
    run_job(honest, runtime)

    state, message = _state(runtime.settings, stalled)
    assert state == "failed"
    assert message is not None
    assert "no complete answer within 1.5 s" in message
    assert _state(runtime.settings, honest)[0] == "success"


# --- init images: bytes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "codings",
    [["gzip"], ["gzip", "gzip"], ["deflate", "deflate"], ["deflate", "gzip"]],
    ids=",".join,
)
def test_an_encoding_bomb_image_is_refused_without_inflating(
    settings: Settings, serve: Callable[..., ScriptedServer], codings: list[str]
) -> None:
    body = bomb(codings)
    assert len(body) < 300 * 1024
    headers = {"content-encoding": ", ".join(codings), "content-length": str(len(body))}
    server = serve(response_head(200, headers), body)
    small = settings.model_copy(update={"image_max_bytes": MIB})

    result, peak = peak_traced(lambda: fetch_image(server.url("/bomb.png"), small))

    assert isinstance(result, ImageInputError)
    assert str(result).endswith(f"the image is larger than {MIB} bytes")
    assert peak < 8 * MIB  # the cap (1 MiB), a few pieces, and the test's own bytes


def test_stacked_encodings_past_the_limit_are_refused_before_decoding(
    settings: Settings, serve: Callable[..., ScriptedServer]
) -> None:
    codings = ["gzip"] * 8
    body = bomb(codings)
    headers = {"content-encoding": ", ".join(codings), "content-length": str(len(body))}
    server = serve(response_head(200, headers), body)

    with pytest.raises(ImageInputError, match="more than 2 content encodings are stacked"):
        fetch_image(server.url("/deep.png"), settings)


@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw-deflate"])
def test_an_honestly_compressed_image_still_decodes(
    settings: Settings, serve: Callable[..., ScriptedServer], coding: str
) -> None:
    picture = png_of(40, 24)
    if coding == "raw-deflate":  # what some servers send as "deflate"
        packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        body, coding = packer.compress(picture) + packer.flush(), "deflate"
    else:
        body = encode(picture, coding)
    headers = {"content-encoding": coding, "content-length": str(len(body))}
    server = serve(response_head(200, headers), body)

    assert fetch_image(server.url("/fine.png"), settings).size == (40, 24)


def test_an_unsupported_encoding_is_refused(
    settings: Settings, serve: Callable[..., ScriptedServer]
) -> None:
    server = serve(
        response_head(200, {"content-encoding": "br", "content-length": "4"}), b"\0\0\0\0"
    )
    with pytest.raises(ImageInputError, match="'br' is not supported"):
        fetch_image(server.url("/br.png"), settings)


# --- init images: pixels --------------------------------------------------------------------


def test_exactly_40_megapixels_is_accepted() -> None:
    assert MAX_PIXELS == 8000 * 5000
    assert decode_image(png_of(8000, 5000)).size == (8000, 5000)


def test_one_pixel_more_is_refused_from_the_header() -> None:
    assert MAX_PIXELS + 1 == 754717 * 53
    with pytest.raises(ImageInputError, match="too many pixels"):
        decode_image(png_of(754717, 53))
    # With no pixel data at all, the refusal can only have come from the header: decoding
    # would have said "damaged".
    with pytest.raises(ImageInputError, match="too many pixels"):
        decode_image(png_header_only(754717, 53))
    with pytest.raises(ImageInputError, match="damaged"):
        decode_image(png_header_only(8000, 5000))


def test_a_request_s_images_are_capped_together_before_any_is_decoded(settings: Settings) -> None:
    quarter = MAX_REQUEST_PIXELS // 4  # 20 MP each: four of them are exactly the total
    side = 5000
    assert side * (quarter // side) == quarter
    at_limit = [data_uri(png_header_only(side, quarter // side))] * 4
    one_more = [*at_limit[:3], data_uri(png_header_only(side + 1, quarter // side))]

    # At the limit the headers pass and decoding starts (and finds no pixel data) ...
    with pytest.raises(ImageInputError, match="damaged"):
        fetch_images(at_limit, settings)
    # ... one row more and nothing is decoded at all.
    with pytest.raises(ImageInputError, match="too many pixels together"):
        fetch_images(one_more, settings)
    small = [data_uri(png_of(32, 16))] * 4
    assert [image.size for image in fetch_images(small, settings)] == [(32, 16)] * 4


# --- webhooks -------------------------------------------------------------------------------


def _attempts(settings: Settings, delivery_id: int) -> list[tuple[int | None, str | None, str]]:
    with session_scope(settings.resolved_database_url) as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None
        return [(a.status_code, a.error, a.response_excerpt or "") for a in row.attempts]


def test_a_receiver_dripping_its_headers_is_a_timeout_and_holds_one_slot(
    settings: Settings,
    api_key: IssuedKey,
    serve: Callable[..., ScriptedServer],
) -> None:
    quick_hooks = settings.model_copy(update={"webhook_timeout_s": DEADLINE_S})
    head = response_head(200, {"content-length": "2", "x-padding": "p" * 40})
    server = serve(head, b"ok", drip_head=True, gap=0.2)  # a byte every 0.2 s, for ~13 s
    delivery_id = failed_with_delivery(quick_hooks, api_key.row.id, server.url("/hook"))

    elapsed: list[float] = []

    def attempt() -> None:
        started = time.monotonic()
        deliver(delivery_id, quick_hooks)
        elapsed.append(time.monotonic() - started)

    worker = threading.Thread(target=attempt)
    worker.start()
    time.sleep(0.5)
    # Meanwhile, the sweeper would not republish it, and a second message would not run it.
    with session_scope(quick_hooks.resolved_database_url) as session:
        republish = webhooks.due_delivery_ids(session, republish_before=utcnow() + timedelta(1))
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None
        assert row.lease_until is not None
        lease_left = (row.lease_until - utcnow()).total_seconds()
    assert delivery_id not in republish
    assert lease_left > DEADLINE_S  # the lease outlives the attempt's deadline
    assert lease_seconds(quick_hooks) > DEADLINE_S + 30
    second = time.monotonic()
    deliver(delivery_id, quick_hooks)
    assert time.monotonic() - second < 0.5
    worker.join(timeout=10)

    assert elapsed
    assert elapsed[0] < DEADLINE_S + SLACK_S
    assert _attempts(quick_hooks, delivery_id) == [(None, "timeout", "")]
    assert (server.connections, server.most_active) == (1, 1)


@pytest.mark.parametrize(
    "codings", [["gzip", "gzip"], ["deflate", "deflate"], ["gzip"] * 8, ["br"]], ids=",".join
)
def test_a_bomb_reply_to_a_webhook_is_truncated_without_inflating(
    settings: Settings,
    api_key: IssuedKey,
    serve: Callable[..., ScriptedServer],
    codings: list[str],
) -> None:
    body = b"\0" * 16 if codings == ["br"] else bomb(codings)
    headers = {"content-encoding": ", ".join(codings), "content-length": str(len(body))}
    server = serve(response_head(200, headers), body)
    delivery_id = failed_with_delivery(settings, api_key.row.id, server.url("/hook"))

    result, peak = peak_traced(lambda: deliver(delivery_id, settings))
    assert result is None

    [(status, error, excerpt)] = _attempts(settings, delivery_id)
    assert (status, error) == (200, None)
    if len(codings) > 2:
        assert excerpt == "[more than 2 content encodings are stacked]"
    elif codings == ["br"]:
        assert excerpt == "[the content encoding 'br' is not supported]"
    else:
        assert excerpt == "\ufffd" * 500  # zeros; Postgres text cannot hold NUL
    assert peak < 4 * MIB
    with session_scope(settings.resolved_database_url) as session:
        row = session.get(WebhookDelivery, delivery_id)
        assert row is not None
        assert row.state == DeliveryState.DELIVERED


def test_webhooks_ask_for_identity_and_read_a_plain_answer(
    settings: Settings, api_key: IssuedKey, receiver: WebhookReceiver
) -> None:
    delivery_id = failed_with_delivery(settings, api_key.row.id, receiver.url)
    deliver(delivery_id, settings)

    [got] = receiver.snapshot()
    assert got.headers["accept-encoding"] == "identity"
    assert _attempts(settings, delivery_id) == [(200, None, "ok")]
