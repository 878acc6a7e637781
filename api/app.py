"""The API tier: HTTP only. It stores jobs and publishes their ids; it never imports torch."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from types import ModuleType

import anyio.to_thread
from fastapi import FastAPI

from api.auth import key_cache_for
from api.errors import MAX_BODY_BYTES, SafeJSONResponse, install_error_handlers
from api.intake import GroupCommit
from api.middleware import AnswerBytesLimit, BodyLimit, InFlightLimit
from api.routes import (
    cancel,
    dashboard,
    enterprise_models,
    enterprise_server,
    events,
    fetch,
    health,
    metrics,
    openai_edits,
    outputs,
    submit,
    v7,
)
from api.submission import store_jobs
from api.waiting import JobWaiter, listening
from darkroom.queue import make_celery
from darkroom.settings import Settings, get_settings
from db.session import PoolLimits, configure_pool


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI application for `settings` (default: from the environment)."""
    settings = settings or get_settings()
    # Sized with the thread limiter (see `lifespan`): docs/OPERATIONS.md "Sizing the API".
    configure_pool(
        PoolLimits(settings.db_pool_size, settings.db_pool_overflow, settings.db_pool_timeout_s)
    )
    app = FastAPI(
        title="Darkroom",
        summary="Self-hosted image editing with the hosted img_mixer / pix2pix / img2img API.",
        version="0.1.0",
        lifespan=lifespan,
        default_response_class=SafeJSONResponse,
    )
    app.state.settings = settings
    app.state.broker = make_celery(settings)
    app.state.waiter = JobWaiter.from_settings(settings)
    app.state.key_cache = key_cache_for(settings)
    app.state.poll_reads = None  # opened by `lifespan`, on the event loop that uses it
    app.state.intake = GroupCommit(partial(store_jobs, settings, app.state.broker))
    install_error_handlers(app)
    # The last added runs first: a request over the in-flight limit is refused at once.
    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)
    waiter: JobWaiter = app.state.waiter
    app.add_middleware(InFlightLimit, limit=settings.api_max_in_flight, parked=lambda: waiter.waits)
    app.add_middleware(AnswerBytesLimit, limit=settings.api_max_answer_bytes)
    routers: tuple[ModuleType, ...] = (submit, v7, fetch, cancel, outputs, health, metrics)
    routers += (dashboard, enterprise_server)
    routers += (enterprise_models,)
    routers += (events,)
    routers += (openai_edits,)
    for module in routers:
        app.include_router(module.router)
    return app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Set the thread limiter explicitly (anyio's default of 40 is per event loop, and the pool
    is sized against it), open the polls' async reads, then listen for job ends until
    shutdown."""
    settings: Settings = app.state.settings
    anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
    reads = fetch.PollReads.for_settings(settings)
    app.state.poll_reads = reads
    try:
        async with listening(app):
            yield
    finally:
        app.state.poll_reads = None
        if reads is not None:
            await reads.pool.close()
