"""The image mixer: v6 (reference 002) and v5 (references 000/001)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AliasChoices, BeforeValidator, Field, model_validator

from api.fields import (
    Int,
    Samples,
    Steps,
    Weights,
    in_range,
    to_url_list,
    url_items,
)
from api.schemas.common import SubmitBase
from darkroom.identities import Operation
from darkroom.jobspec import JobSpec
from darkroom.limits import MAX_IMAGES, MAX_STEPS


def _mixer_images(value: Any) -> list[str]:
    """At most MAX_IMAGES URLs, counted before any is parsed."""
    if len(url_items(value)) > MAX_IMAGES:
        raise ValueError(f"init_image: at most {MAX_IMAGES} images can be mixed")
    return to_url_list(value)


MixerImages = Annotated[list[str], BeforeValidator(_mixer_images)]


class MixerRequest(SubmitBase):
    """`POST /api/v6/image_editing/img_mixer`: an array of at most 4 URLs, one sample."""

    init_image: MixerImages
    init_image_weights: Weights = None
    samples: Annotated[Int, in_range(1, 1)] = 1
    steps: Steps = Field(default=25, validation_alias=AliasChoices("steps", "num_inference_steps"))

    @model_validator(mode="after")
    def _images_and_weights_agree(self) -> MixerRequest:
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
        """Without weights every image counts equally."""
        weights = self.init_image_weights or [1.0] * len(self.init_image)
        return JobSpec(
            operation=Operation.IMG_MIXER,
            init_images=self.init_image,
            image_weights=weights,
            steps=self.steps,
            **self._common(),
        )


class V5MixerRequest(MixerRequest):
    """`POST /api/v5/img_mixer`: comma-separated URLs and weights, up to 4 samples.

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
