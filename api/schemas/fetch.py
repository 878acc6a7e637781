"""The fetch bodies: `{key}`, and for the enterprise endpoint `{key, request_id}`."""

from __future__ import annotations

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from api.fields import OptionalInt


class FetchRequest(BaseModel):
    """Body of the fetch endpoints; the enterprise one names the job in the body."""

    model_config = ConfigDict(extra="ignore")

    request_id: OptionalInt = Field(default=None, validation_alias=AliasChoices("request_id", "id"))
