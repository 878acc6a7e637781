"""The hosted API's error shape, for every failure the API can answer with.

`{"status": "error", "message": ...}` where message is a sentence, or for invalid fields an
object mapping each field to its messages. Clients never see a traceback.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

log = logging.getLogger(__name__)

Message = str | dict[str, list[str]]

#: The hosted API's answer to a missing, unknown or revoked key.
INVALID_KEY = "Invalid Api Key"

#: Seconds a client should wait before retrying when the API is busy, or its database is away.
BUSY_RETRY_S = 1
DATABASE_DOWN_RETRY_S = 5
#: The answer when this process is at one of its limits (connections, requests, pool).
BUSY_MESSAGE = "Service busy: try again shortly."

#: Room for a base64 init image of 10 MB (base64 grows it by a third) and the other fields.
MAX_BODY_BYTES = 16 * 1024 * 1024
#: The answer to a body over MAX_BODY_BYTES.
TOO_LARGE = f"Request body too large: at most {MAX_BODY_BYTES} bytes."

_SURROGATE = re.compile("[\ud800-\udfff]")


class SafeJSONResponse(JSONResponse):
    """JSON that always renders: text a client sent may come back in a message, and a lone
    UTF-16 surrogate in it cannot be encoded as UTF-8, which would otherwise reset the
    connection instead of answering. Such characters become U+FFFD."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            return _SURROGATE.sub("\ufffd", text).encode("utf-8")


class ApiError(Exception):
    """An error answered to the client as `{"status": "error", "message": ...}`."""

    def __init__(
        self, status_code: int, message: Message, *, close: bool = False, **extra: Any
    ) -> None:
        super().__init__(str(message))
        self.status_code = status_code
        self.message = message
        self.extra = extra
        #: Close the connection after answering (a body left unread must not be read on).
        self.close = close


def error_response(
    status_code: int, message: Message, *, retry_header: float | None = None, **extra: Any
) -> JSONResponse:
    """The error shape as a response; with `retry_header`, a Retry-After header in seconds."""
    body = {"status": "error", "message": message, **extra}
    response = SafeJSONResponse(body, status_code=status_code)
    if retry_header is not None:
        response.headers["retry-after"] = str(max(1, math.ceil(retry_header)))
    return response


def field_messages(errors: list[Any]) -> dict[str, list[str]]:
    """Pydantic errors as the hosted API's `{field: [message, ...]}`."""
    messages: dict[str, list[str]] = {}
    for error in errors:
        field = _field_name(error)
        messages.setdefault(field, []).append(_sentence(field, error))
    return messages


def _field_name(error: Any) -> str:
    loc = [str(part) for part in error.get("loc", ()) if part not in ("body",)]
    if loc:
        return loc[0]
    # Cross-field checks raise "field: message" from a model validator.
    text = str(error.get("msg", ""))
    return text.removeprefix("Value error, ").split(":", 1)[0] if ":" in text else "body"


def _sentence(field: str, error: Any) -> str:
    if error.get("type") == "missing":
        return f"The {field} field is required."
    text = str(error.get("msg", "is invalid")).removeprefix("Value error, ")
    if text.startswith(f"{field}: "):
        return text.removeprefix(f"{field}: ")
    return text if text.startswith(field) else f"{field} {text}"


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    response = error_response(exc.status_code, exc.message, **exc.extra)
    if "retry_after" in exc.extra:
        response.headers["retry-after"] = str(exc.extra["retry_after"])
    if exc.close:
        response.headers["connection"] = "close"
    return response


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError | ValidationError)
    return error_response(422, field_messages(list(exc.errors())))


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 413:
        # The body limit stopped reading mid-body: the rest must not be read on this connection.
        response = error_response(413, TOO_LARGE)
        response.headers["connection"] = "close"
        return response
    response = error_response(exc.status_code, str(exc.detail))
    response.headers.update(exc.headers or {})  # a 503's Retry-After (api.middleware)
    return response


async def _database_down(_request: Request, exc: Exception) -> JSONResponse:
    log.error("database unreachable: %s", type(exc).__name__)
    message = "Service temporarily unavailable: the database cannot be reached."
    return error_response(503, message, retry_header=DATABASE_DOWN_RETRY_S)


async def _pool_exhausted(_request: Request, exc: Exception) -> JSONResponse:
    # Every connection of this process is busy for db_pool_timeout_s: load, not an outage.
    log.warning("database pool exhausted: %s", type(exc).__name__)
    return error_response(503, BUSY_MESSAGE, retry_header=BUSY_RETRY_S)


async def _client_gone(_request: Request, _exc: Exception) -> JSONResponse:
    # The client closed (or a read deadline closed) the connection mid-body: nobody will read
    # an answer, and a traceback per slow client would flood the log.
    log.info("client disconnected before its request was read")
    return error_response(400, "The client disconnected before sending the whole request.")


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "Internal server error.")


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception the API can meet to the error shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OperationalError, _database_down)
    app.add_exception_handler(PoolTimeoutError, _pool_exhausted)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _unexpected)
