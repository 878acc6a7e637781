"""Live progress: `GET /api/v1/jobs/{id}/events`, a job's events as server-sent events.

`queued` (its place in the queue) while it waits, `progress` (step k of n) while it runs, then
`success` or `failed` with its webhook's payload, and the stream ends. Authenticated like a
fetch: the key in `Authorization: Bearer` or in `?key=` (EventSource cannot send headers; the
access log redacts it, darkroom.logs).

Bounded per process: at most `events_max_streams` streams at once (then 503), each at most
`events_max_s` (then `event: timeout`). A stream holds no database connection between reads:
each read is one short session in one thread-pool hop, every `events_poll_s`, and the job's end
(the JobWaiter's notification) wakes it at once. While sync-wait slots are free a stream takes
one and counts as a parked wait, so streams do not crowd the in-flight limit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import suppress

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.auth import keyed
from api.deps import SettingsDep, presented_key
from api.errors import BUSY_MESSAGE, BUSY_RETRY_S, ApiError, error_response
from api.waiting import JobWaiter, get_waiter
from darkroom.settings import Settings
from db.models import ApiKey
from db.session import session_scope
from services.job_events import JobEvent, read_event

router = APIRouter(tags=["progress"])


class StreamCount:
    """Streams this process serves now (the event loop's thread only: no lock)."""

    def __init__(self) -> None:
        self.open = 0


def _streams(request: Request) -> StreamCount:
    app_state = request.app.state
    if not hasattr(app_state, "event_streams"):
        app_state.event_streams = StreamCount()
    streams: StreamCount = app_state.event_streams
    return streams


@router.get(
    "/api/v1/jobs/{job_id}/events",
    summary="A job's progress as server-sent events",
    response_class=StreamingResponse,
)
async def job_events(job_id: int, request: Request, settings: SettingsDep) -> Response:
    """`event: queued` / `progress` / `success` / `failed`, each with a JSON `data` line."""
    presented = presented_key(request, {"key": request.query_params.get("key")})

    def first(session: Session, key: ApiKey) -> tuple[JobEvent, int]:
        event = read_event(session, settings, job_id, key.id)
        if event is None:
            raise ApiError(404, f"No request with id {job_id}.")
        return event, key.id

    event, key_id = await keyed(request, presented, first)
    streams, waiter = _streams(request), get_waiter(request)
    if streams.open >= settings.events_max_streams:
        return error_response(503, BUSY_MESSAGE, retry_header=BUSY_RETRY_S)
    body = _stream(settings, waiter, streams, event, job_id, key_id)
    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(body, media_type="text/event-stream", headers=headers)


async def _stream(
    settings: Settings,
    waiter: JobWaiter,
    streams: StreamCount,
    event: JobEvent,
    job_id: int,
    key_id: int,
) -> AsyncIterator[str]:
    """The events of one job until it ends or the stream's time is up."""
    streams.open += 1
    try:
        # A sync-wait slot makes the stream a parked request, outside the in-flight limit;
        # when none is free it streams all the same, counted in flight like any request.
        with waiter.slot(), waiter.subscribe(job_id) as woken:
            async for chunk in _events(settings, woken, event, job_id, key_id):
                yield chunk
    finally:
        streams.open -= 1


async def _events(
    settings: Settings, woken: asyncio.Event, event: JobEvent, job_id: int, key_id: int
) -> AsyncIterator[str]:
    """Each change of the job's event; a heartbeat comment when quiet; a timeout at the end."""
    yield f"retry: {int(settings.events_poll_s * 4000)}\n\n"
    started = last_sent = time.monotonic()
    yield event.encode()
    while not event.terminal:
        if time.monotonic() - started >= settings.events_max_s:
            yield f'event: timeout\ndata: {{"id":{job_id}}}\n\n'
            return
        with suppress(TimeoutError):
            await asyncio.wait_for(woken.wait(), settings.events_poll_s)
        woken.clear()
        latest = await run_in_threadpool(_read, settings, job_id, key_id)
        if latest is None:  # deleted meanwhile
            return
        if latest != event:
            event, last_sent = latest, time.monotonic()
            yield event.encode()
        elif time.monotonic() - last_sent >= settings.events_heartbeat_s:
            last_sent = time.monotonic()
            yield ": keep-alive\n\n"


def _read(settings: Settings, job_id: int, key_id: int) -> JobEvent | None:
    """The job's event, in one short session closed before returning."""
    with session_scope(settings.resolved_database_url) as session:
        return read_event(session, settings, job_id, key_id)
