"""The reads behind the API's scrape-time gauges (services.metrics.SystemCollector).

Aggregates only, no rows: a scrape must stay cheap however many jobs exist.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from darkroom.identities import Operation
from db.models import DeliveryState, Job, JobState, WebhookDelivery


@dataclass(frozen=True)
class JobCount:
    """How many jobs are in one (state, operation), and when the oldest of them was created."""

    state: JobState
    operation: Operation
    count: int
    oldest_created_at: datetime | None


def bound_statements(session: Session, seconds: float) -> None:
    """On PostgreSQL, cancel this transaction's queries that run longer than `seconds`."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"SET LOCAL statement_timeout = {int(seconds * 1000)}"))


def job_counts(session: Session, states: Collection[JobState]) -> list[JobCount]:
    """Jobs in `states`, by state and operation, with the oldest creation time of each group."""
    rows = session.execute(
        select(Job.state, Job.operation, func.count(Job.id), func.min(Job.created_at))
        .where(Job.state.in_(states))
        .group_by(Job.state, Job.operation)
    ).all()
    return [JobCount(state, operation, count, oldest) for state, operation, count, oldest in rows]


def delivery_counts(
    session: Session, states: Collection[DeliveryState]
) -> dict[DeliveryState, int]:
    """Webhook deliveries in `states`, by state (states without any are left out)."""
    rows = session.execute(
        select(WebhookDelivery.state, func.count(WebhookDelivery.id))
        .where(WebhookDelivery.state.in_(states))
        .group_by(WebhookDelivery.state)
    ).all()
    return {state: count for state, count in rows}
