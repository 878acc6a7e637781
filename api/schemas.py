"""Request bodies of the four submit endpoints, as the reference pages define them.

Each model accepts the hosted API's spellings (see api.fields), ignores unknown fields, and turns
itself into a JobSpec: the one normalised shape that the worker runs.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from api.fields import (
    MAX_IMAGES,
    MAX_STEPS,
    Dimension,
    Float,
    GuidanceScale,
    Int,
    OptionalInt,
    Samples,
    Seed,
    Steps,
    Strength,
    Text,
    TrackId,
    Url,
    UrlList,
    Weights,
    in_range,
    to_url_list,
)
from darkroom.jobspec import JobSpec
from db.models import Operation

#: The schedulers named on the enterprise page that can run img2img (they implement add_noise).
IMG2IMG_SCHEDULERS = (
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "DPMSolverSinglestepScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "LCMScheduler",
)
#: Named on the page but unable to noise an init image (no add_noise): refused before queueing.
NON_IMG2IMG_SCHEDULERS = (
    "DDIMInverseScheduler",
    "IPNDMScheduler",
    "KarrasVeScheduler",
    "ScoreSdeVeScheduler",
)


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
ImageGuidanceScale = Annotated[Float, in_range(1, 10)]


class _Submit(BaseModel):
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


class Img2ImgRequest(_Submit):
    """`POST /api/v1/enterprise/img2img` (reference 004)."""

    model_id: Text = None
    init_image: SingleUrl
    steps: Steps = Field(default=30, validation_alias=AliasChoices("num_inference_steps", "steps"))
    strength: Strength = 0.7
    scheduler: Text = None

    @model_validator(mode="after")
    def _known_scheduler(self) -> Img2ImgRequest:
        if self.scheduler is None or self.scheduler in IMG2IMG_SCHEDULERS:
            return self
        if self.scheduler in NON_IMG2IMG_SCHEDULERS:
            reason = f"{self.scheduler} cannot run image to image (it has no add_noise)"
        else:
            reason = f"unknown scheduler '{self.scheduler[:100]}'"
        raise ValueError(f"scheduler: {reason}; use one of {', '.join(IMG2IMG_SCHEDULERS)}")

    def to_spec(self) -> JobSpec:
        return JobSpec(
            operation=Operation.IMG2IMG,
            init_images=[self.init_image],
            steps=self.steps,
            strength=self.strength,
            model_id=self.model_id,
            scheduler=self.scheduler,
            **self._common(),
        )


class Pix2PixRequest(_Submit):
    """`POST /api/v5/pix2pix` (reference 003): edit an image by instruction."""

    init_image: SingleUrl
    image_guidance_scale: ImageGuidanceScale = 1.5
    steps: Steps = Field(default=20, validation_alias=AliasChoices("steps", "num_inference_steps"))

    def to_spec(self) -> JobSpec:
        return JobSpec(
            operation=Operation.PIX2PIX,
            init_images=[self.init_image],
            steps=self.steps,
            image_guidance_scale=self.image_guidance_scale,
            **self._common(),
        )


class MixerRequest(_Submit):
    """`POST /api/v6/image_editing/img_mixer` (reference 002); the v5 page extends it."""

    init_image: UrlList
    init_image_weights: Weights = None
    samples: Annotated[Samples, in_range(1, 1)] = 1
    steps: Steps = Field(default=25, validation_alias=AliasChoices("steps", "num_inference_steps"))

    @model_validator(mode="after")
    def _images_and_weights_agree(self) -> MixerRequest:
        if len(self.init_image) > MAX_IMAGES:
            raise ValueError(f"init_image: at most {MAX_IMAGES} images can be mixed")
        weights = self.init_image_weights
        if weights is not None and len(weights) != len(self.init_image):
            raise ValueError(
                f"init_image_weights: {len(weights)} weights for {len(self.init_image)} images;"
                " give one weight per image"
            )
        if weights is not None and any(weight < 0 for weight in weights):
            raise ValueError("init_image_weights: weights must not be negative")
        return self

    def to_spec(self) -> JobSpec:
        weights = self.init_image_weights or [1.0] * len(self.init_image)
        return JobSpec(
            operation=Operation.IMG_MIXER,
            init_images=self.init_image,
            image_weights=weights,
            steps=self.steps,
            **self._common(),
        )


class V5MixerRequest(MixerRequest):
    """`POST /api/v5/img_mixer` (reference 000/001): up to 4 samples.

    The page documents steps 1..50 but its own example sends 100. That example must keep
    working, so steps above 50 are accepted and run as 50; `warnings()` says so in `meta`.
    """

    samples: Samples = 1
    steps: Annotated[Int, in_range(1, 1000)] = Field(
        default=25, validation_alias=AliasChoices("steps", "num_inference_steps")
    )

    def to_spec(self) -> JobSpec:
        return super().to_spec().model_copy(update={"steps": min(self.steps, MAX_STEPS)})

    def warnings(self) -> list[str]:
        if self.steps <= MAX_STEPS:
            return []
        return [f"steps {self.steps} is above the maximum of {MAX_STEPS}; {MAX_STEPS} were run"]


class FetchRequest(BaseModel):
    """Body of the fetch endpoints; the enterprise one names the job in the body."""

    model_config = ConfigDict(extra="ignore")

    request_id: OptionalInt = Field(default=None, validation_alias=AliasChoices("request_id", "id"))
