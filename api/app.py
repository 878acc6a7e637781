"""The API tier: HTTP only. It stores jobs and publishes their ids; it never imports torch."""

from __future__ import annotations

from functools import partial

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.intake import GroupCommit
from api.routes import cancel, dashboard, fetch, health, metrics, outputs, submit
from api.submission import store_jobs
from api.waiting import JobWaiter, listening
from darkroom.queue import make_celery
from darkroom.settings import Settings, get_settings


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI application for `settings` (default: from the environment)."""
    settings = settings or get_settings()
    app = FastAPI(
        title="Darkroom",
        summary="Self-hosted image editing with the hosted img_mixer / pix2pix / img2img API.",
        version="0.1.0",
        lifespan=listening,
    )
    app.state.settings = settings
    app.state.broker = make_celery(settings)
    app.state.waiter = JobWaiter.from_settings(settings)
    app.state.intake = GroupCommit(partial(store_jobs, settings, app.state.broker))
    install_error_handlers(app)
    for module in (submit, fetch, cancel, outputs, health, metrics, dashboard):
        app.include_router(module.router)
    return app
