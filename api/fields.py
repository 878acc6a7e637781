"""Lenient field types: clients send numbers as strings, flags as "yes"/"no", lists as commas.

Each type accepts every spelling the hosted API's clients use and turns it into one Python type;
ranges are checked afterwards with messages in the hosted API's words
("guidance_scale must be between 1 and 20").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator

from darkroom.limits import (
    MAX_GUIDANCE_SCALE,
    MAX_ID_CHARS,
    MAX_IMAGE_URL_CHARS,
    MAX_PROMPT_CHARS,
    MAX_SAMPLES,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MAX_TRACK_ID_CHARS,
    MAX_WEBHOOK_URL_CHARS,
    MIN_GUIDANCE_SCALE,
    MIN_SIDE,
)

T = TypeVar("T")


def _to_number(value: Any) -> float:
    """A JSON number, or a string holding one; booleans are not numbers."""
    if isinstance(value, bool):
        raise ValueError("must be a number")
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:  # a JSON integer beyond float range
            raise ValueError("is too large") from None
    elif isinstance(value, str) and value.strip():
        try:
            number = float(value.strip())
        except ValueError:
            raise ValueError("must be a number") from None
    else:
        raise ValueError("must be a number")
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    return number


def to_int(value: Any) -> int:
    """512, 512.0, "512" and " 512 " are all 512; 512.5 is refused."""
    number = _to_number(value)
    if not number.is_integer():
        raise ValueError("must be a whole number")
    return int(number)


def to_float(value: Any) -> float:
    """7.5 and "7.5" are both 7.5."""
    return _to_number(value)


_TRUE = {"yes", "true", "1", "on", "y"}
_FALSE = {"no", "false", "0", "off", "n", ""}


def to_flag(value: Any) -> bool:
    """The hosted API's yes/no flags: "yes", "no", true, false, 1, 0."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("must be yes or no")


def to_optional_text(value: Any) -> str | None:
    """A string, with null and "" meaning absent."""
    if value is None:
        return None
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError("must be a string")
    text = str(value)
    return text if text.strip() else None


def check_length(text: str, max_chars: int) -> str:
    """`text`, refused when longer than `max_chars` characters."""
    if len(text) > max_chars:
        raise ValueError(f"must be at most {max_chars} characters")
    return text


def capped_text(max_chars: int) -> Callable[[Any], str | None]:
    """`to_optional_text`, refusing strings longer than `max_chars` characters."""

    def parse(value: Any) -> str | None:
        text = to_optional_text(value)
        return None if text is None else check_length(text, max_chars)

    return parse


def to_url_list(value: Any) -> list[str]:
    """Image URLs as an array or as one comma-separated string (callers cap the count first,
    with `url_items`, so that a long list is refused before any URL is parsed)."""
    return [_check_url(item, MAX_IMAGE_URL_CHARS) for item in url_items(value)]


def to_single_url(value: Any) -> str:
    """Exactly one image URL, given as a string or a one-item array."""
    items = url_items(value)
    if len(items) != 1:
        raise ValueError("must be one image URL")
    return _check_url(items[0], MAX_IMAGE_URL_CHARS)


def url_items(value: Any) -> list[Any]:
    """The non-blank items of an array or a comma-separated string; at least one."""
    if isinstance(value, str):
        if value.lstrip()[:5].lower() == "data:":
            # A data: URI holds a comma: split, it would read as two URLs, refused for that.
            raise ValueError(
                "must be an http or https URL: data: URIs and base64 images are not accepted here"
            )
        items: list[Any] = value.split(",")
    elif isinstance(value, list):
        items = value
    else:
        raise ValueError("must be a URL, a comma-separated list of URLs, or an array of URLs")
    given = [item for item in items if not (isinstance(item, str) and not item.strip())]
    if not given:
        raise ValueError("at least one image URL is required")
    return given


def to_weight_list(value: Any) -> list[float]:
    """Weights as an array or a comma-separated string."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ValueError("must be a comma-separated list of numbers")
    return [to_float(item) for item in items]


def to_track_id(value: Any) -> str | int | None:
    """track_id comes back unchanged in the webhook: integers stay integers."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError("must be a string or an integer")
    if len(str(value)) > MAX_TRACK_ID_CHARS:
        raise ValueError(f"must be at most {MAX_TRACK_ID_CHARS} characters")
    return value


def _check_url(value: Any, max_chars: int) -> str:
    """An absolute http(s) URL of at most `max_chars` (reachability is the worker's concern)."""
    if not isinstance(value, str):
        raise ValueError("must be a URL string")
    url = value.strip()
    if len(url) > max_chars:
        raise ValueError(f"URLs must be at most {max_chars} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"'{url[:200]}' is not an http or https URL")
    try:
        parts.port  # noqa: B018 - urlsplit validates the port only when it is read
    except ValueError:
        raise ValueError(f"'{url[:200]}' has an invalid port") from None
    return url


def to_url(value: Any, max_chars: int = MAX_IMAGE_URL_CHARS) -> str | None:
    """An optional http(s) URL, null or "" meaning absent."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _check_url(value, max_chars)


def to_webhook_url(value: Any) -> str | None:
    """An optional webhook URL, at most MAX_WEBHOOK_URL_CHARS."""
    return to_url(value, MAX_WEBHOOK_URL_CHARS)


def optional(parse: Callable[[Any], T]) -> Callable[[Any], T | None]:
    """`parse`, with null and "" meaning absent."""

    def parse_optional(value: Any) -> T | None:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return parse(value)

    return parse_optional


def in_range(low: float, high: float) -> AfterValidator:
    """A range check; api.errors prefixes the field as the client spelled it, giving the hosted
    API's sentence ("guidance_scale must be between 1 and 20")."""

    def check(value: Any) -> Any:
        if value is not None and not low <= value <= high:
            raise ValueError(f"must be between {_fmt(low)} and {_fmt(high)}")
        return value

    return AfterValidator(check)


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


Int = Annotated[int, BeforeValidator(to_int)]
Float = Annotated[float, BeforeValidator(to_float)]
OptionalInt = Annotated[int | None, BeforeValidator(optional(to_int))]
Flag = Annotated[bool, BeforeValidator(to_flag)]
Text = Annotated[str | None, BeforeValidator(to_optional_text)]
Url = Annotated[str | None, BeforeValidator(to_url)]
WebhookUrl = Annotated[str | None, BeforeValidator(to_webhook_url)]
#: A model, LoRA, VAE, embedding or scheduler id.
Id = Annotated[str | None, BeforeValidator(capped_text(MAX_ID_CHARS))]
NegativePrompt = Annotated[str | None, BeforeValidator(capped_text(MAX_PROMPT_CHARS))]
Weights = Annotated[list[float] | None, BeforeValidator(optional(to_weight_list))]
TrackId = Annotated[str | int | None, BeforeValidator(to_track_id)]

#: Output sides (`darkroom.limits`); absent = from the image.
Dimension = Annotated[OptionalInt, in_range(MIN_SIDE, MAX_SIDE)]
GuidanceScale = Annotated[Float, in_range(MIN_GUIDANCE_SCALE, MAX_GUIDANCE_SCALE)]
Steps = Annotated[Int, in_range(1, MAX_STEPS)]
Samples = Annotated[Int, in_range(1, MAX_SAMPLES)]
Strength = Annotated[Float, in_range(0, 1)]
Seed = Annotated[OptionalInt, in_range(0, MAX_SEED)]
