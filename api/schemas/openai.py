"""`POST /v1/images/edits` (OpenAI's image edits) as Darkroom jobs.

The route turns the multipart form into a body of Darkroom's spellings (`form_body`); one image
is an img2img job (the v7 body: the prompt kept as sent), several are a mixer job. The uploads
travel inline as base64 `data:` URIs, which the worker unpacks like any base64 init image.
"""

from __future__ import annotations

import base64
from typing import Any, Literal

from pydantic import Field

from api.fields import Flag, Samples
from api.schemas.mixer import MixerRequest
from api.schemas.v7 import V7Img2ImgRequest
from darkroom.jobspec import JobSpec

ResponseFormat = Literal["url", "b64_json"]

#: OpenAI's own model names: they mean "the default model" here.
OPENAI_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")
#: Darkroom fields a client may add to the form (the SDK's `extra_body`), as the JSON paths
#: take them.
EXTRA_FIELDS = (
    "strength",
    "steps",
    "num_inference_steps",
    "seed",
    "negative_prompt",
    "guidance_scale",
)
#: How Darkroom's field names read in OpenAI's terms, for error messages.
OPENAI_NAMES = {
    "samples": "n",
    "width": "size",
    "height": "size",
    "model_id": "model",
    "init_image": "image",
}


def data_uri(image: bytes) -> str:
    """An uploaded image as the inline form the JSON paths accept for `init_image`."""
    return "data:application/octet-stream;base64," + base64.b64encode(image).decode()


def parse_size(size: str | None) -> tuple[str | None, str | None]:
    """`WxH` as width and height (checked by the job's fields); `auto` or none: the image's."""
    text = (size or "").strip().lower()
    if text in ("", "auto"):
        return None, None
    width, sep, height = text.partition("x")
    if not sep:
        raise ValueError("size must be WIDTHxHEIGHT (e.g. 512x512) or auto")
    return width, height


def form_body(fields: dict[str, str], images: list[str]) -> dict[str, Any]:
    """The Darkroom body of an edit: `images` are data: URIs, `fields` the form's text fields."""
    width, height = parse_size(fields.get("size"))
    model = fields.get("model") or None
    body: dict[str, Any] = {
        "prompt": fields.get("prompt"),
        "samples": fields.get("n") or 1,
        "width": width,
        "height": height,
        "model_id": None if model in OPENAI_MODELS else model,
        "b64_json": fields.get("response_format") == "b64_json",
        "init_image": images[0] if len(images) == 1 else images,
    }
    body.update({name: fields[name] for name in EXTRA_FIELDS if name in fields})
    return body


class EditImg2ImgRequest(V7Img2ImgRequest):
    """One image: img2img. The upload is inline, so `base64` (inline input) is on; whether the
    answer holds links or base64 PNGs is `b64_json`."""

    base64: Flag = True
    b64_json: bool = False

    def to_spec(self) -> JobSpec:
        return super().to_spec().model_copy(update={"base64_output": self.b64_json})


class EditMixerRequest(MixerRequest):
    """Several images: the mixer, each image weighted equally, up to 4 samples."""

    init_image: list[str] = Field(min_length=2)  # data: URIs built by the route
    samples: Samples = 1
    b64_json: bool = False

    def to_spec(self) -> JobSpec:
        return super().to_spec().model_copy(update={"base64_output": self.b64_json})
