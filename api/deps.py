"""Typed dependencies: settings, the request's database session, the broker, the caller's key."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any

from celery import Celery
from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.errors import INVALID_KEY, ApiError
from darkroom.settings import Settings
from db.models import ApiKey
from db.repositories.keys import find_active_key
from db.session import session_scope

#: Room for a base64 init image of 10 MB (base64 grows it by a third) and the other fields.
MAX_BODY_BYTES = 16 * 1024 * 1024


# Dependencies that do no I/O are `async def`: FastAPI runs sync ones in its thread pool, a
# context switch each, which a submission under load pays for several times otherwise.
async def get_settings_dep(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    """One session per request; it commits on success (routes that must commit earlier do)."""
    with session_scope(settings.resolved_database_url) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


async def get_broker(request: Request) -> Celery:
    """The Celery app used to publish job ids."""
    broker: Celery = request.app.state.broker
    return broker


BrokerDep = Annotated[Celery, Depends(get_broker)]


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object, or a clear 400/413 in the error shape."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"Request body too large: at most {MAX_BODY_BYTES} bytes.")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"Request body too large: at most {MAX_BODY_BYTES} bytes.")
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, 4300+ digit numbers, deep nesting
        raise ApiError(400, "The request body is not valid JSON.") from None
    if _holds_nul(body):
        # Postgres text cannot hold NUL, and no field has a use for it.
        raise ApiError(400, "The request body must not contain NUL characters.")
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def _holds_nul(value: Any) -> bool:
    """Whether any string (or key) in a parsed JSON value contains NUL; iterative, as bodies
    may nest deeply."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str) and "\x00" in item:
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


def get_api_key(request: Request, body: BodyDep, session: SessionDep) -> ApiKey:
    """The caller's active key, or 401 "Invalid Api Key"."""
    presented = presented_key(request, body)
    row = find_active_key(session, presented) if presented else None
    if row is None:
        raise ApiError(401, INVALID_KEY)
    return row


ApiKeyDep = Annotated[ApiKey, Depends(get_api_key)]
