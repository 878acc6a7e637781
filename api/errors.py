"""The hosted API's error shape, for every failure the API can answer with.

`{"status": "error", "message": ...}` where message is a sentence, or for invalid fields an
object mapping each field to its messages. Clients never see a traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

Message = str | dict[str, list[str]]

#: The hosted API's answer to a missing, unknown or revoked key.
INVALID_KEY = "Invalid Api Key"


class ApiError(Exception):
    """An error answered to the client as `{"status": "error", "message": ...}`."""

    def __init__(self, status_code: int, message: Message, **extra: Any) -> None:
        super().__init__(str(message))
        self.status_code = status_code
        self.message = message
        self.extra = extra


def error_response(status_code: int, message: Message, **extra: Any) -> JSONResponse:
    """The error shape as a response."""
    return JSONResponse({"status": "error", "message": message, **extra}, status_code=status_code)


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
    return response


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError | ValidationError)
    return error_response(422, field_messages(list(exc.errors())))


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, str(exc.detail))


async def _database_down(_request: Request, exc: Exception) -> JSONResponse:
    log.error("database unreachable: %s", type(exc).__name__)
    return error_response(503, "Service temporarily unavailable: the database cannot be reached.")


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
    app.add_exception_handler(PoolTimeoutError, _database_down)
    app.add_exception_handler(Exception, _unexpected)
