"""`POST /api/v5/pix2pix` (reference 003): edit an image by instruction (InstructPix2Pix)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AliasChoices, Field

from api.fields import Float, Steps, in_range
from api.schemas.common import SingleUrl, SubmitBase
from darkroom.identities import Operation
from darkroom.jobspec import JobSpec
from darkroom.limits import MAX_IMAGE_GUIDANCE_SCALE, MIN_IMAGE_GUIDANCE_SCALE

#: The page gives no range (`darkroom.limits` says why these bounds).
ImageGuidanceScale = Annotated[Float, in_range(MIN_IMAGE_GUIDANCE_SCALE, MAX_IMAGE_GUIDANCE_SCALE)]


class Pix2PixRequest(SubmitBase):
    """The pix2pix body: one image, an instruction, and how closely to keep the image."""

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
