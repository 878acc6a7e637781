"""Structured logs: one JSON object per line, carrying the job id and track_id of the job the
line was written for, so an operator can follow one job across the API, worker and dispatcher.

The job context lives in a context variable, set by `job_context` around a job's run; every log
record written inside it (by Darkroom, Celery or diffusers) carries the ids.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_plus

from celery import signals

from darkroom.celery_hooks import connect_replacing
from darkroom.queue import DELIVER_WEBHOOK_TASK, RUN_JOB_TASK

_JOB_CONTEXT: ContextVar[dict[str, Any] | None] = ContextVar("darkroom_job_context", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

#: The field a task's one argument fills in the context of the lines written while it runs.
_TASK_ID_FIELDS = {RUN_JOB_TASK: "job_id", DELIVER_WEBHOOK_TASK: "delivery_id"}


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


def resolve_format(fmt: str) -> str:
    """The format to use: `auto` means JSON unless stderr is a terminal, where people read it."""
    if fmt == "auto":
        return "text" if sys.stderr.isatty() else "json"
    return fmt


#: One query parameter (`/outputs/<name>?key=...` in key-scoped download mode): its separator,
#: name and value, all still percent-encoded.
_QUERY_PARAMETER = re.compile(r"([?&])([^=&\s#]*)=([^&\s#]*)")
#: Parameter names whose values never reach a log, compared once decoded and lowercased.
_SECRET_PARAMETERS = {"key"}


def redact_query_keys(text: str) -> str:
    """`text` with the value of every `key` query parameter replaced by `[redacted]`.

    Names are compared as the server reads them, percent-decoded (`%6Bey` and `k%65y` are `key`
    to Starlette), and also lowercased (`KEY`), so that no spelling escapes the redaction.
    """

    def redact(match: re.Match[str]) -> str:
        separator, name, _value = match.groups()
        if _decoded(name).strip().lower() in _SECRET_PARAMETERS:
            return f"{separator}{name}=[redacted]"
        return match.group(0)

    return _QUERY_PARAMETER.sub(redact, text)


def _decoded(name: str) -> str:
    """A parameter name percent-decoded until it stops changing (a few rounds at most)."""
    for _ in range(3):
        plain = unquote_plus(name)
        if plain == name:
            break
        name = plain
    return name


class RedactKeysInAccessLog(logging.Filter):
    """Keep API keys that clients put in query strings out of uvicorn's access log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.access" and isinstance(record.args, tuple):
            record.args = tuple(
                redact_query_keys(arg) if isinstance(arg, str) else arg for arg in record.args
            )
        return True


def configure_logging(fmt: str = "json", level: int | str = logging.INFO) -> None:
    """Route the root logger to stderr, as JSON lines (`fmt="json"`), plain text, or `auto`."""
    handler = logging.StreamHandler()
    if resolve_format(fmt) == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RedactKeysInAccessLog())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Library warnings (diffusers, torch) become records too, not raw lines between the JSON.
    logging.captureWarnings(True)


def adopt_library_loggers() -> None:
    """Send diffusers' and transformers' records through the root handler.

    Each library gives its logger a plain-text stderr handler of its own when first imported,
    and transformers warns during imports, before any worker hook runs. This imports both (and
    torch), so only the worker calls it, before importing its app.
    """
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_default_handler()
        library.enable_propagation()


def install_celery_logging(fmt: str, level: int | str) -> None:
    """Make a Celery worker log through `configure_logging` and tag each task's lines.

    Any receiver of `setup_logging` stops Celery from installing handlers of its own (its task
    logger would otherwise write plain text beside our JSON). The task hooks put the job or
    delivery id on the lines Celery writes about a task, `succeeded in ...` included.
    """

    def setup(**_kwargs: Any) -> None:
        configure_logging(fmt, level)

    # Called by each app factory: the newest call's format and level replace the previous.
    connect_replacing(signals.setup_logging, setup, "darkroom.logs.setup")
    connect_replacing(signals.task_prerun, _enter_task, "darkroom.logs.enter_task")
    connect_replacing(signals.task_postrun, _leave_task, "darkroom.logs.leave_task")


def _enter_task(task_id: str, task: Any, args: tuple[Any, ...], **_kwargs: Any) -> None:
    """Start a task's context; each pool thread has its own, so tasks never mix."""
    fields: dict[str, Any] = {"task_id": task_id}
    id_field = _TASK_ID_FIELDS.get(task.name)
    if id_field and args:
        fields[id_field] = args[0]
    _JOB_CONTEXT.set(fields)


def _leave_task(**_kwargs: Any) -> None:
    """End a task's context, so the worker's own lines between tasks carry no stale ids."""
    _JOB_CONTEXT.set(None)
