"""Client compatibility: what existing clients of the hosted API send, and the exact shapes
they get back; the aliases they call (evidence in docs/CLIENTS.md); the OpenAPI examples.

The reference pages' bodies are posted exactly as their code samples send them: JSON text with
`key` in the body and `Content-Type: application/json`. No worker runs here (the pages' image
URLs are never fetched); jobs are ended through services.outcomes, as a worker ends them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from api.app import create_app
from api.schemas import Img2ImgRequest, MixerRequest, Pix2PixRequest, V5MixerRequest
from api.schemas.answers import FailedAnswer, ProcessingAnswer, SuccessAnswer
from api.schemas.examples import ANSWER_EXAMPLES, REQUEST_EXAMPLES
from darkroom.identities import Operation
from darkroom.settings import Settings
from db.models import Job
from db.repositories.keys import IssuedKey
from db.session import session_scope
from tests.api.test_submit import IMG2IMG, MIXER_V5, MIXER_V6, PIX2PIX
from tests.api.test_sync_wait import finish_job

# The pages' code samples, as sent (JS `JSON.stringify` of these objects; the v6 page has only
# its JSON body). `"key": ""` is where the client puts its key.
V5_MIXER_SAMPLE = """{
"key": "",
"init_image":"https://img.freepik.com/premium-photo/red-roses-rose-petals-white-backgroundvalentines-day-concept_167862-5720.jpg,https://huggingface.co/datasets/diffusers/test-arrays/resolve/main/stable_diffusion_inpaint/boy.png",
"seed":"12345",
"prompt":"rose man",
"negative_prompt":"A polluted city",
"init_image_weights":"0.5,0.7",
"width":800,
"height":600,
"guidance_scale":10,
"steps":100,
"samples":1,
"webhook": null,
"track_id": null
}"""
V6_MIXER_SAMPLE = """{
    "key":"",
    "seed":12345,
    "init_image":[
        "https://assets.modelslab.ai/generations/063c90e1-1740-410c-be84-23d379dcfee2",
        "https://assets.modelslab.ai/generations/8205b5be-c212-4a3e-ba74-3c824b8acc25"
        ],
    "prompt":"rose man",
    "negative_prompt":"A polluted city",
    "width":800,
    "height":600,
    "guidance_scale":10,
    "steps":41,
    "samples":1
}"""
PIX2PIX_SAMPLE = """{
"key": "",
"init_image" : "https://d1okzptojspljx.cloudfront.net/generations/b3341a09-082e-474e-989f-72ec3f3bf7aa-0.png",
"prompt" : "make him woman",
"image_guidance_scale" : 1,
"steps" : 50,
"guidance_scale" : 7
}"""
IMG2IMG_SAMPLE = """{
"key": "",
"model_id": "model_id",
"prompt": "papercraft, quilling, layers, landscape",
"negative_prompt": null,
"init_image": "https://pub-8b49af329fae499aa563997f5d4068a4.r2.dev/generations/d8cd0add-8cd7-40a4-802b-7b80be45a14c-0.png",
"width": "512",
"height": "512",
"samples": "1",
"num_inference_steps": "30",
"safety_checker": "yes",
"enhance_prompt": "yes",
"guidance_scale": 7.5,
"strength": 0.7,
"scheduler": "DDPMScheduler",
"lora_model": null,
"tomesd": "yes",
"use_karras_sigmas": "yes",
"vae": null,
"lora_strength": null,
"embeddings_model": null,
"seed": null,
"webhook": null,
"track_id": null
}"""
PAGE_SAMPLES = [
    ("/api/v5/img_mixer", V5_MIXER_SAMPLE, "/api/v5/fetch/"),
    ("/api/v6/image_editing/img_mixer", V6_MIXER_SAMPLE, "/api/v6/image_editing/fetch/"),
    ("/api/v5/pix2pix", PIX2PIX_SAMPLE, "/api/v5/fetch/"),
    ("/api/v1/enterprise/img2img", IMG2IMG_SAMPLE, "/api/v1/enterprise/fetch/"),
]

PROCESSING_KEYS = {
    "status",
    "id",
    "eta",
    "progress",
    "message",
    "messege",
    "tip",
    "fetch_result",
    "future_links",
    "output",
    "track_id",
    "meta",
}
SUCCESS_KEYS = {"status", "generationTime", "id", "output", "proxy_links", "track_id", "meta"}
FAILED_KEYS = {"status", "id", "message", "messege", "track_id"}


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def post_sample(client: TestClient, path: str, sample: str, key: IssuedKey) -> Any:
    """POST a page's sample as its code does: the JSON text, with the key filled in."""
    body = sample.replace('"key": ""', f'"key": "{key.plaintext}"', 1)
    body = body.replace('"key":""', f'"key":"{key.plaintext}"', 1)
    return client.post(path, content=body, headers={"Content-Type": "application/json"})


def fetch(client: TestClient, path: str, key: IssuedKey) -> Any:
    return client.post(path, json={"key": key.plaintext}).json()


@pytest.mark.parametrize(("path", "sample", "fetch_path"), PAGE_SAMPLES)
def test_page_samples_get_the_hosted_shapes(
    client: TestClient,
    settings: Settings,
    api_key: IssuedKey,
    path: str,
    sample: str,
    fetch_path: str,
) -> None:
    response = post_sample(client, path, sample, api_key)

    assert response.status_code == 200, response.text
    accepted = response.json()
    assert set(accepted) == PROCESSING_KEYS
    assert accepted["status"] == "processing"
    assert accepted["message"] == accepted["messege"]
    assert isinstance(accepted["tip"], str)
    assert accepted["output"] == []
    assert accepted["fetch_result"] == f"{settings.public_url}{fetch_path}{accepted['id']}"
    assert len(accepted["future_links"]) == 1
    polled = fetch(client, fetch_path + str(accepted["id"]), api_key)
    # The eta is estimated again at each poll (from a queue view polls share for up to a
    # second), so only its type is fixed; everything else is the submit's answer.
    assert isinstance(polled.pop("eta"), int | float)
    assert polled == {name: value for name, value in accepted.items() if name != "eta"}

    finish_job(settings, accepted["id"])
    done = fetch(client, fetch_path + str(accepted["id"]), api_key)

    assert set(done) == SUCCESS_KEYS
    assert done["status"] == "success"
    links = [done["output"]] if path == "/api/v5/pix2pix" else done["output"]
    assert links == done["proxy_links"] == accepted["future_links"]


def test_failed_and_error_shapes(
    client: TestClient, settings: Settings, api_key: IssuedKey
) -> None:
    accepted = post_sample(client, "/api/v5/pix2pix", PIX2PIX_SAMPLE, api_key).json()
    finish_job(settings, accepted["id"], failure="Unable to fetch image from provided URL")

    failed = fetch(client, f"/api/v5/fetch/{accepted['id']}", api_key)
    bad_key = client.post("/api/v5/pix2pix", json={**PIX2PIX, "key": "nope"})
    no_prompt = client.post(
        "/api/v5/pix2pix", json={**PIX2PIX, "key": api_key.plaintext, "prompt": None}
    )

    assert set(failed) == FAILED_KEYS
    assert failed["message"] == failed["messege"] == "Unable to fetch image from provided URL"
    assert (bad_key.status_code, bad_key.json()) == (
        401,
        {"status": "error", "message": "Invalid Api Key"},
    )
    assert no_prompt.json() == {
        "status": "error",
        "message": {"prompt": ["The prompt field is required."]},
    }


def test_the_documented_answer_models_list_exactly_the_answers_fields() -> None:
    for model, keys in (
        (ProcessingAnswer, PROCESSING_KEYS),
        (SuccessAnswer, SUCCESS_KEYS),
        (FailedAnswer, FAILED_KEYS),
    ):
        fields = {field.alias or name for name, field in model.model_fields.items()}
        assert fields == keys, model.__name__


# --- aliases that clients of the hosted API call ----------------------------------------------

SDK_IMG2IMG = {  # modelslab_py: {"key": ..., **Image2Image(...).dict(exclude_none=True)}
    "api_key": "the SDK's schema repeats the key here",
    "prompt": "a lighthouse at dusk",
    "model_id": "midjourney",
    "init_image": "http://127.0.0.1:9/a.png",
    "width": 512,
    "height": 512,
    "samples": 1,
    "num_inference_steps": 30,
    "safety_checker": "no",
    "enhance_prompt": "no",
    "guidance_scale": 7.5,
    "lora_strength": 0.6,
    "lora_model": "contrast-fix",
}
LEGACY_IMG2IMG = {  # the v3 page offered 21, 31, 41 or 51 steps, as strings
    **SDK_IMG2IMG,
    "num_inference_steps": "51",
    "base64": "no",
}
ALIASES: list[tuple[str, dict[str, Any], Operation, str]] = [
    ("/api/v3/img_mixer", MIXER_V5, Operation.IMG_MIXER, "/api/v3/fetch/"),
    ("/api/v6/image_editing/pix2pix", PIX2PIX, Operation.PIX2PIX, "/api/v6/image_editing/fetch/"),
    ("/api/v3/img2img", LEGACY_IMG2IMG, Operation.IMG2IMG, "/api/v3/fetch/"),
    ("/api/v6/images/img2img", SDK_IMG2IMG, Operation.IMG2IMG, "/api/v6/images/fetch/"),
    (
        "/api/v1/enterprise/images/img2img",
        SDK_IMG2IMG,
        Operation.IMG2IMG,
        "/api/v1/enterprise/images/fetch/",
    ),
]


@pytest.mark.parametrize(("path", "body", "operation", "fetch_path"), ALIASES)
def test_alias_submits_and_fetches(
    client: TestClient,
    settings: Settings,
    api_key: IssuedKey,
    path: str,
    body: dict[str, Any],
    operation: Operation,
    fetch_path: str,
) -> None:
    response = client.post(path, json={"key": api_key.plaintext, **body})

    assert response.status_code == 200, response.text
    accepted = response.json()
    assert set(accepted) == PROCESSING_KEYS
    assert accepted["fetch_result"] == f"{settings.public_url}{fetch_path}{accepted['id']}"
    with session_scope(settings.resolved_database_url) as session:
        job = session.get(Job, accepted["id"])
        assert job is not None
        assert job.operation == operation
    finish_job(settings, accepted["id"])
    done = fetch(client, fetch_path + str(accepted["id"]), api_key)
    assert done["status"] == "success"
    # Only v5 pix2pix answers one string: clients of the v6 alias read a list.
    assert done["output"] == done["proxy_links"] == accepted["future_links"]


def test_v3_img2img_runs_51_steps_as_50_and_says_so(client: TestClient, api_key: IssuedKey) -> None:
    accepted = client.post("/api/v3/img2img", json={"key": api_key.plaintext, **LEGACY_IMG2IMG})

    meta = accepted.json()["meta"]
    assert meta["steps"] == 50
    assert meta["warnings"] == ["num_inference_steps 51 is above the maximum of 50; 50 were run"]
    too_many = client.post(
        "/api/v3/img2img",
        json={"key": api_key.plaintext, **LEGACY_IMG2IMG, "num_inference_steps": 52},
    )
    assert too_many.status_code == 422


@pytest.mark.parametrize(
    "fetch_path",
    [
        "/api/v6/image_editing/fetch/{id}",
        "/api/v1/enterprise/image_editing/fetch/{id}",
        "/api/v6/images/fetch/{id}",
        "/api/v1/enterprise/images/fetch/{id}",
        "/api/v3/fetch/{id}",
        "/api/v5/fetch/{id}",
        "/api/v1/enterprise/fetch/{id}",
    ],
)
def test_every_sdk_fetch_path_answers(
    client: TestClient, api_key: IssuedKey, fetch_path: str
) -> None:
    job_id = client.post("/api/v5/pix2pix", json={**PIX2PIX, "key": api_key.plaintext}).json()["id"]
    answer = fetch(client, fetch_path.format(id=job_id), api_key)
    assert (answer["status"], answer["id"]) == ("processing", job_id)


@pytest.mark.parametrize("path", ["/api/v1/enterprise/fetch", "/api/v6/images/fetch"])
def test_fetch_by_request_id_in_the_body(client: TestClient, api_key: IssuedKey, path: str) -> None:
    job_id = client.post("/api/v5/pix2pix", json={**PIX2PIX, "key": api_key.plaintext}).json()["id"]
    answer = client.post(path, json={"key": api_key.plaintext, "request_id": str(job_id)}).json()
    assert (answer["status"], answer["id"]) == ("processing", job_id)


def test_the_js_sdk_sends_its_key_as_a_bearer_token(client: TestClient, api_key: IssuedKey) -> None:
    headers = {
        "Authorization": f"Bearer {api_key.plaintext}",
        "Content-Type": "application/json",
        "X-Requested-With": "modelslab-js",
    }
    body = {k: v for k, v in SDK_IMG2IMG.items() if k != "api_key"}
    accepted = client.post("/api/v6/images/img2img", content=json.dumps(body), headers=headers)

    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["status"] == "processing"


# --- OpenAPI ----------------------------------------------------------------------------------

DOCUMENTED: dict[str, type[BaseModel]] = {
    "/api/v5/img_mixer": V5MixerRequest,
    "/api/v6/image_editing/img_mixer": MixerRequest,
    "/api/v5/pix2pix": Pix2PixRequest,
    "/api/v1/enterprise/img2img": Img2ImgRequest,
}


def test_openapi_shows_the_reference_examples_and_the_answer_shapes(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()

    for path, model in DOCUMENTED.items():
        operation = spec["paths"][path]["post"]
        media = operation["requestBody"]["content"]["application/json"]
        example = media["examples"]["reference"]["value"]
        # FastAPI leaves null members out of the document; null and absent mean the same here.
        assert example == {k: v for k, v in REQUEST_EXAMPLES[path].items() if v is not None}
        model.model_validate(example)
        answers = operation["responses"]["200"]["content"]["application/json"]
        refs = {item["$ref"].rsplit("/", 1)[1] for item in answers["schema"]["anyOf"]}
        assert refs == {"ProcessingAnswer", "SuccessAnswer", "FailedAnswer"}
        assert set(answers["examples"]) == {"processing", "success", "failed"}
        assert "Prefer: wait=N" in operation["description"]
        assert {"401", "422", "429", "503"} <= set(operation["responses"])
    for alias, _body, _operation, _fetch in ALIASES:
        assert alias not in spec["paths"]


def test_the_answer_examples_match_the_answer_models() -> None:
    ProcessingAnswer.model_validate(ANSWER_EXAMPLES["processing"])
    SuccessAnswer.model_validate(ANSWER_EXAMPLES["success"])
    FailedAnswer.model_validate(ANSWER_EXAMPLES["failed"])
    assert set(ANSWER_EXAMPLES["processing"]) == PROCESSING_KEYS
    assert set(ANSWER_EXAMPLES["success"]) == SUCCESS_KEYS
    assert set(ANSWER_EXAMPLES["failed"]) == FAILED_KEYS


def test_reference_examples_are_the_test_suites_reference_bodies() -> None:
    """The documented examples are the bodies every other test submits (keys and URLs aside)."""
    for example, body in (
        (REQUEST_EXAMPLES["/api/v5/img_mixer"], MIXER_V5),
        (REQUEST_EXAMPLES["/api/v6/image_editing/img_mixer"], MIXER_V6),
        (REQUEST_EXAMPLES["/api/v5/pix2pix"], PIX2PIX),
        (REQUEST_EXAMPLES["/api/v1/enterprise/img2img"], IMG2IMG),
    ):
        assert set(example) - {"key"} == set(body)
        same = {k for k in body if k != "init_image" and example[k] == body[k]}
        assert same == set(body) - {"init_image"}
