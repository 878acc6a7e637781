"""Structured logs: one JSON object per line, carrying the job id and track_id of the job the
line was written for, so an operator can follow one job across the API, worker and dispatcher.

The job context lives in a context variable, set by `job_context` around a job's run; every log
record written inside it (by Darkroom, Celery or diffusers) carries the ids.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

_JOB_CONTEXT: ContextVar[dict[str, Any] | None] = ContextVar("darkroom_job_context", default=None)


@contextmanager
def job_context(**fields: Any) -> Iterator[None]:
    """Attach `fields` (job_id, track_id, ...) to every log record written inside the block."""
    merged = {**(_JOB_CONTEXT.get() or {}), **{k: v for k, v in fields.items() if v is not None}}
    token = _JOB_CONTEXT.set(merged)
    try:
        yield
    finally:
        _JOB_CONTEXT.reset(token)


def current_job_context() -> dict[str, Any]:
    """The fields `job_context` set for the running code ({} outside any job)."""
    return dict(_JOB_CONTEXT.get() or {})


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON with time, level, logger, message and job ids."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **current_job_context(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(fmt: str = "json", level: int = logging.INFO) -> None:
    """Route the root logger to stderr, as JSON lines (`fmt="json"`) or plain text."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
