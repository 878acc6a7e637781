"""The answers' shapes, for the OpenAPI documentation only (services.responses builds them).

Routes never validate their answers against these models: the answers are the hosted API's
shapes exactly, extra fields included, and a model must not filter them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TrackId = str | int | None


class ProcessingAnswer(BaseModel):
    """A queued or running job (there is no separate queued status)."""

    model_config = ConfigDict(title="Processing")

    status: Literal["processing"]
    id: int
    eta: float = Field(description="Estimated seconds until the job ends.")
    progress: float = Field(ge=0, le=1, description="Denoising progress, 0 to 1 (0 if queued).")
    message: str
    messege: str = Field(description="The legacy endpoints' spelling of `message`.")
    tip: str
    fetch_result: str = Field(description="The URL to POST `{key}` to for the result.")
    future_links: list[str] = Field(description="Where the outputs will appear.")
    output: list[str]
    track_id: TrackId
    meta: dict[str, Any]


class SuccessAnswer(BaseModel):
    """A finished job. pix2pix answers `output` as one string; `base64: yes` as base64 PNGs."""

    model_config = ConfigDict(title="Success")

    status: Literal["success"]
    generation_time: float | None = Field(alias="generationTime")
    id: int
    output: list[str] | str
    proxy_links: list[str]
    track_id: TrackId
    meta: dict[str, Any]


class FailedAnswer(BaseModel):
    """A job that failed or was canceled; `message` says why."""

    model_config = ConfigDict(title="Failed")

    status: Literal["failed"]
    id: int
    message: str
    messege: str
    track_id: TrackId


class ErrorAnswer(BaseModel):
    """A refused request: a sentence, or `{field: [sentences]}` for invalid fields."""

    model_config = ConfigDict(title="Error")

    status: Literal["error"]
    message: str | dict[str, list[str]]
    retry_after: float | None = Field(default=None, description="Seconds, with HTTP 429.")


JobAnswer = ProcessingAnswer | SuccessAnswer | FailedAnswer
