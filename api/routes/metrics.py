"""Prometheus scrape target of the API tier: its own process metrics plus the system's gauges.

The gauges (queue depth per broker queue, unfinished jobs, webhook deliveries) describe state
that every tier shares, so only the API reads them, at scrape time; workers and dispatchers
export their own counters on ports of their own (see darkroom/metrics.py); the gauges are read
by services/metrics.py.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import REGISTRY
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder

from api.deps import SettingsDep
from api.errors import ApiError
from services.metrics import SystemCollector

router = APIRouter(tags=["metrics"])


class _ScrapeView:
    """This process's registry followed by the app's system gauges, as one collector."""

    def __init__(self, system: SystemCollector) -> None:
        self.system = system

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()
        yield from self.system.collect()


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request, settings: SettingsDep) -> Response:
    """The Prometheus exposition, in the format the scraper asks for (text or OpenMetrics)."""
    if settings.metrics_token and not _bearer_matches(request, settings.metrics_token):
        raise ApiError(401, "Metrics need the bearer token set in DARKROOM_METRICS_TOKEN.")
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    body = encoder(_ScrapeView(_system_collector(request.app)))
    return Response(body, media_type=content_type)


def _system_collector(app: FastAPI) -> SystemCollector:
    """The app's collector, made on first scrape so its Redis connection pool is reused."""
    collector: SystemCollector | None = getattr(app.state, "metrics_collector", None)
    if collector is None:
        collector = SystemCollector(app.state.settings)
        app.state.metrics_collector = collector
    return collector


def _bearer_matches(request: Request, token: str) -> bool:
    """True when the request carries `Authorization: Bearer <token>` (compared in constant time)."""
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(presented.encode(), token.encode())
