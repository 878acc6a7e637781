"""The official `openai` package's `images.edit` against `darkroom up`: the edit runs as a
durable job and the answer is OpenAI's shape, with links or base64 PNGs."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from tests.support.servers import png
from tests.support.system import RunningSystem

pytestmark = pytest.mark.slow

#: Darkroom's own fields, through the SDK's `extra_body`: two quick steps.
QUICK = {"steps": 2, "strength": 1.0}


def client(system: RunningSystem, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=system.base_url + "/v1", max_retries=0, timeout=240)


def test_one_image_answers_links_to_the_edited_pngs(system: RunningSystem) -> None:
    key = system.create_key()["key"]
    edited = client(system, key).images.edit(
        image=("red.png", png(96, 64, (200, 30, 30)), "image/png"),
        prompt="a blue square",
        n=2,
        response_format="url",
        extra_body=QUICK,
    )

    assert edited.created > 0
    assert edited.data is not None
    assert len(edited.data) == 2
    for item in edited.data:
        assert item.url is not None
        assert item.url.startswith(system.base_url + "/outputs/")
        image = Image.open(io.BytesIO(httpx.get(item.url, timeout=10).content))
        assert (image.format, image.size) == ("PNG", (96, 64))  # the upload's size


def test_several_images_are_mixed_and_answered_as_base64(system: RunningSystem) -> None:
    key = system.create_key()["key"]
    edited = client(system, key).images.edit(
        image=[
            ("red.png", png(64, 64, (200, 30, 30)), "image/png"),
            ("blue.png", png(64, 64, (30, 30, 200)), "image/png"),
        ],
        prompt="purple",
        size="64x64",
        response_format="b64_json",
        extra_body=QUICK,
    )

    assert edited.data is not None
    [item] = edited.data
    assert item.b64_json is not None
    image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
    assert (image.format, image.size) == ("PNG", (64, 64))


def test_a_wrong_key_is_openais_authentication_error(system: RunningSystem) -> None:
    with pytest.raises(openai.AuthenticationError) as refused:
        client(system, "not-a-key").images.edit(
            image=("a.png", png(64, 64, (1, 2, 3)), "image/png"), prompt="x"
        )
    assert refused.value.code == "invalid_api_key"
