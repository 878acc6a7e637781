"""Typed dependencies: settings, the request's database session, the broker, the JSON body."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Annotated, Any

from celery import Celery
from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.errors import MAX_BODY_BYTES as MAX_BODY_BYTES  # the documented limit, re-exported
from api.errors import TOO_LARGE, ApiError
from darkroom.settings import Settings
from db.session import session_scope


# Dependencies that do no I/O are `async def`: FastAPI runs sync ones in its thread pool, a
# context switch each, which a submission under load pays for several times otherwise.
async def get_settings_dep(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """One session per request; it commits on success (routes that must commit earlier do).

    For operator routes only (the dashboard): FastAPI opens it in one thread-pool hop and
    closes it in another, so a connection taken in between is held while the request waits
    for a thread. Client routes use api.auth.run_keyed: one hop, one short session."""
    with session_scope(settings.resolved_database_url) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


async def get_broker(request: Request) -> Celery:
    """The Celery app used to publish job ids."""
    broker: Celery = request.app.state.broker
    return broker


BrokerDep = Annotated[Celery, Depends(get_broker)]


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, or a clear 400/413/422 in the error shape.

    The size limit is enforced while the body is read (api.middleware.BodyLimit), so a huge or
    chunked body is refused before it is held in memory; the checks here are a second line.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, TOO_LARGE, close=True)
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, TOO_LARGE, close=True)
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, 4300+ digit numbers, deep nesting
        raise ApiError(400, "The request body is not valid JSON.") from None
    if _holds(body, _has_nul):
        # Postgres text cannot hold NUL, and no field has a use for it.
        raise ApiError(400, "The request body must not contain NUL characters.")
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    _refuse_surrogates(body)
    return body


def _has_nul(text: str) -> bool:
    return "\x00" in text


def _has_surrogate(text: str) -> bool:
    """A lone UTF-16 surrogate (JSON allows `"\\ud800"`): no UTF-8 text, so neither Postgres
    nor a JSON answer can hold it."""
    return _SURROGATE.search(text) is not None


_SURROGATE = re.compile("[\ud800-\udfff]")


def _refuse_surrogates(body: dict[str, Any]) -> None:
    """422 naming the top-level field whose value holds a lone surrogate; 400 when a field's
    name does (a name that cannot be echoed)."""
    for name, value in body.items():
        if _has_surrogate(name):
            raise ApiError(400, "A field name in the request body is not valid Unicode text.")
        if _holds(value, _has_surrogate):
            sentence = f"{name} must be valid Unicode text (it holds a lone UTF-16 surrogate)."
            raise ApiError(422, {name: [sentence]})


def _holds(value: Any, bad: Callable[[str], bool]) -> bool:
    """Whether any string (or key) in a parsed JSON value is `bad`; iterative, as bodies may
    nest deeply."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str) and bad(item):
            return True
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


BodyDep = Annotated[dict[str, Any], Depends(json_body)]


def presented_key(request: Request, body: dict[str, Any]) -> str | None:
    """The key from `Authorization: Bearer` or, as the hosted API's clients send it, the body."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    key = body.get("key")
    return key if isinstance(key, str) and key else None
