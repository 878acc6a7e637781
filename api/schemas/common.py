"""What every submit body shares: the prompt, sizes, guidance, seed, samples, webhook."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict
from pydantic_core import PydanticCustomError

from api.fields import (
    Dimension,
    GuidanceScale,
    NegativePrompt,
    Samples,
    Seed,
    TrackId,
    WebhookUrl,
    check_length,
    to_single_url,
)
from darkroom.limits import MAX_PROMPT_CHARS
from darkroom.settings import Settings
from services.progress_events import parse_filter


def _prompt(value: Any) -> str:
    """A prompt: present, not blank (null and "" count as missing, as in the hosted API), and
    at most MAX_PROMPT_CHARS long."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise PydanticCustomError("missing", "Field required")
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return check_length(value, MAX_PROMPT_CHARS)


Prompt = Annotated[str, BeforeValidator(_prompt)]
SingleUrl = Annotated[str, BeforeValidator(to_single_url)]
WebhookEvents = Annotated[list[str] | None, BeforeValidator(parse_filter)]


class SubmitBase(BaseModel):
    """Fields every operation shares."""

    model_config = ConfigDict(extra="ignore")

    prompt: Prompt
    negative_prompt: NegativePrompt = None
    width: Dimension = None
    height: Dimension = None
    guidance_scale: GuidanceScale = 7.5
    seed: Seed = None
    samples: Samples = 1
    webhook: WebhookUrl = None
    # Which webhook events to send (start, progress, completed); None: completed only.
    webhook_events_filter: WebhookEvents = None
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
