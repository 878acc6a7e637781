"""The enterprise img2img page's fields: how each is parsed, defaulted, echoed or refused."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from api.app import create_app
from darkroom import prompt_style
from darkroom.settings import Settings
from db.models import Job
from db.repositories.keys import IssuedKey
from tests.api.test_submit import IMG2IMG, post
from tests.support.servers import png

PATH = "/api/v1/enterprise/img2img"


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def submit(client: TestClient, key: IssuedKey, db: Session, **change: Any) -> tuple[Any, Job]:
    answer = post(client, PATH, key, {**IMG2IMG, **change}).json()
    job = db.get(Job, answer["id"])
    assert job is not None, answer
    return answer, job


def test_the_reference_example_gets_the_pages_defaults(
    client: TestClient, api_key: IssuedKey, db: Session
) -> None:
    answer, job = submit(client, api_key, db)
    params = job.params
    assert params["scheduler"] == "DDPMScheduler"
    assert (params["tomesd"], params["use_karras_sigmas"], params["safety_checker"]) == (
        True,
        True,
        True,
    )
    assert params["safety_checker_type"] == "sensitive_content_text"
    assert (params["base64_output"], params["temp"]) == (False, False)
    assert (
        params["prompt"] == f"papercraft, quilling, layers, landscape {prompt_style.STYLE_SUFFIX}"
    )
    assert params["negative_prompt"] == prompt_style.DEFECTS
    assert answer["meta"]["prompt"] == params["prompt"]
    assert answer["meta"]["safetychecker"] == "yes"


def test_enhance_prompt_no_keeps_the_prompt(
    client: TestClient, api_key: IssuedKey, db: Session
) -> None:
    _, job = submit(client, api_key, db, enhance_prompt="no", negative_prompt="blurry")
    assert job.params["prompt"] == IMG2IMG["prompt"]
    assert job.params["negative_prompt"] == "blurry"


def test_enhancing_is_deterministic_and_idempotent() -> None:
    once = prompt_style.enhance("a cat", "")
    assert prompt_style.enhance("a cat", "") == once
    assert prompt_style.enhance(*once) == once


def test_loras_pair_with_their_strengths(
    client: TestClient, api_key: IssuedKey, db: Session
) -> None:
    _, job = submit(client, api_key, db, lora_model="contrast-fix,yae-miko", lora_strength="0.5,1")
    assert job.params["loras"] == [
        {"name": "contrast-fix", "strength": 0.5},
        {"name": "yae-miko", "strength": 1.0},
    ]
    _, one = submit(client, api_key, db, lora_model="a,b", lora_strength="0.3")
    assert [lora["strength"] for lora in one.params["loras"]] == [0.3, 0.3]
    _, default = submit(client, api_key, db, lora_model=["a"], lora_strength=None)
    assert default.params["loras"] == [{"name": "a", "strength": 1.0}]


def test_other_options_are_carried_to_the_worker(
    client: TestClient, api_key: IssuedKey, db: Session
) -> None:
    _, job = submit(
        client,
        api_key,
        db,
        vae="my-vae",
        embeddings_model="emb-a, emb-b",
        clip_skip="2",
        algorithm_type="dpmsolver+++",
        scheduler="DPMSolverMultistepScheduler",
        use_karras_sigmas="no",
        tomesd=False,
        safety_checker_type="pixelate",
        temp="yes",
        loadbalancer="yes",
    )
    params = job.params
    assert (params["vae"], params["embeddings"], params["clip_skip"]) == (
        "my-vae",
        ["emb-a", "emb-b"],
        2,
    )
    assert (params["algorithm_type"], params["use_karras_sigmas"], params["tomesd"]) == (
        "dpmsolver+++",
        False,
        False,
    )
    assert (params["safety_checker_type"], params["temp"]) == ("pixelate", True)


def test_base64_init_image_is_accepted_as_inline_data(
    client: TestClient, api_key: IssuedKey, db: Session
) -> None:
    encoded = base64.b64encode(png(16, 16, (1, 2, 3))).decode()
    answer, job = submit(client, api_key, db, init_image=encoded, base64="yes")
    assert job.params["init_images"] == [f"data:application/octet-stream;base64,{encoded}"]
    assert job.params["base64_output"] is True
    assert answer["meta"]["init_image"] == f"<base64 image, {len(encoded)} characters>"


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (
            {"lora_model": "a,b,c", "lora_strength": "0.1,0.2"},
            "lora_strength",
            "2 strengths for 3 LoRAs",
        ),
        (
            {"lora_model": "a", "lora_strength": "3"},
            "lora_strength",
            "each strength must be between 0 and 1",
        ),
        ({"lora_strength": "0.5"}, "lora_strength", "given without lora_model"),
        ({"clip_skip": 9}, "clip_skip", "clip_skip must be between 1 and 8"),
        ({"algorithm_type": "dpmsolver+++++"}, "algorithm_type", "algorithm_type must be one of"),
        ({"safety_checker_type": "melt"}, "safety_checker_type", "safety_checker_type"),
        ({"tomesd": "maybe"}, "tomesd", "tomesd must be yes or no"),
        ({"init_image": "aGVsbG8", "base64": "no"}, "init_image", "must be an http or https URL"),
        ({"init_image": "%%%not base64", "base64": "yes"}, "init_image", "not valid base64"),
        (
            {"num_inference_steps": 51},
            "num_inference_steps",
            "num_inference_steps must be between 1 and 50",
        ),
        (  # int(1 x 0.7) = 0 steps to denoise: refused here, not failed in the worker
            {"num_inference_steps": 1, "strength": 0.7},
            "strength",
            "num_inference_steps x strength must be at least 1",
        ),
    ],
)
def test_bad_values_are_refused_with_the_field_named(
    client: TestClient, api_key: IssuedKey, change: dict[str, Any], field: str, message: str
) -> None:
    response = post(client, PATH, api_key, {**IMG2IMG, **change})
    assert response.status_code == 422, response.text
    errors = response.json()["message"]
    assert list(errors) == [field]
    assert message in errors[field][0]


def test_unknown_ids_are_refused_before_queueing_with_how_to_add_them(
    settings: Settings, api_key: IssuedKey, tmp_path: Path
) -> None:
    real = settings.model_copy(update={"model_preset": "", "models_dir": tmp_path / "models"})
    (tmp_path / "models" / "my-model").mkdir(parents=True)
    # The family is read from the folder's files: an empty folder is no model.
    index = '{"_class_name": "StableDiffusionPipeline"}'
    (tmp_path / "models" / "my-model" / "model_index.json").write_text(index)
    with TestClient(create_app(real)) as client:
        known = post(client, PATH, api_key, {**IMG2IMG, "model_id": "my-model"})
        unknown = post(
            client, PATH, api_key, {**IMG2IMG, "model_id": "midjourney", "lora_model": "nope"}
        )

    assert known.status_code == 200, known.text
    assert unknown.status_code == 422
    errors = unknown.json()["message"]
    assert set(errors) == {"model_id", "lora_model"}
    assert "Unknown model id 'midjourney'" in errors["model_id"][0]
    assert str(tmp_path / "models" / "midjourney") in errors["model_id"][0]
    assert "owner/name" in errors["lora_model"][0]


def test_malformed_ids_are_refused_even_with_the_tiny_preset(
    client: TestClient, api_key: IssuedKey
) -> None:
    response = post(client, PATH, api_key, {**IMG2IMG, "vae": "../../etc"})
    assert response.status_code == 422
    assert list(response.json()["message"]) == ["vae"]
