"""What every submit body shares: the prompt, sizes, guidance, seed, samples, webhook."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict
from pydantic_core import PydanticCustomError

from api.fields import (
    Dimension,
    GuidanceScale,
    Samples,
    Seed,
    Text,
    TrackId,
    Url,
    to_url_list,
)
from darkroom.settings import Settings


def _required_text(value: Any) -> str:
    """A prompt: present and not blank (null and "" count as missing, as in the hosted API)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise PydanticCustomError("missing", "Field required")
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _single_url(value: Any) -> str:
    """Exactly one image URL."""
    urls = to_url_list(value)
    if len(urls) != 1:
        raise ValueError("must be one image URL")
    return urls[0]


Prompt = Annotated[str, BeforeValidator(_required_text)]
SingleUrl = Annotated[str, BeforeValidator(_single_url)]


class SubmitBase(BaseModel):
    """Fields every operation shares."""

    model_config = ConfigDict(extra="ignore")

    prompt: Prompt
    negative_prompt: Text = None
    width: Dimension = None
    height: Dimension = None
    guidance_scale: GuidanceScale = 7.5
    seed: Seed = None
    samples: Samples = 1
    webhook: Url = None
    track_id: TrackId = None

    def model_errors(self, settings: Settings) -> dict[str, list[str]]:
        """Model ids that name nothing loadable, by field (checked before queueing)."""
        return {}

    def warnings(self) -> list[str]:
        """Adjustments made to the request, reported in `meta.warnings`."""
        return []

    def _common(self) -> dict[str, Any]:
        """JobSpec fields shared by all operations; a null seed is drawn here, once."""
        return {
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt or "",
            "width": self.width,
            "height": self.height,
            "guidance_scale": self.guidance_scale,
            "seed": self.seed if self.seed is not None else secrets.randbits(32),
            "samples": self.samples,
            "track_id": self.track_id,
        }
