"""The whole system as a user meets it: `darkroom up`, the reference examples, fetch, webhooks.

Production profile (Postgres + Redis) for all four endpoints, and the embedded default
(SQLite + filesystem broker) for one success and one failure. Images come from a loopback
server; webhooks go to a loopback receiver and must verify with the key's secret.
"""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from PIL import Image
from standardwebhooks.webhooks import Webhook

from tests.api.test_submit import IMG2IMG, MIXER_V5, MIXER_V6, PIX2PIX
from tests.support.servers import ImageServer, Received, WebhookReceiver, png
from tests.support.system import RunningSystem, darkroom_up, production_env

pytestmark = pytest.mark.slow


def wait_for_webhooks(receiver: WebhookReceiver, count: int, timeout: float = 60) -> list[Received]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = receiver.snapshot()
        if len(got) >= count:
            return got
        time.sleep(0.2)
    raise AssertionError(f"{len(receiver.snapshot())} of {count} webhooks arrived")


def verified_payload(hook: Received, secret: str) -> dict[str, Any]:
    """The webhook body, after checking its Standard Webhooks signature."""
    payload: dict[str, Any] = Webhook(secret).verify(hook.body, hook.headers)
    return payload


def png_size(system: RunningSystem, url: str) -> tuple[int, int]:
    assert url.startswith(system.base_url + "/outputs/")
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG"
    return image.size


def submissions(
    images: ImageServer, hook: str
) -> list[tuple[str, dict[str, Any], tuple[int, int]]]:
    """Each endpoint's reference example with our image URLs; the PNG size each must give."""
    red, blue = images.url("/red.png"), images.url("/blue.png")
    return [
        ("/api/v5/img_mixer", {**MIXER_V5, "init_image": f"{red},{blue}"}, (800, 600)),
        ("/api/v6/image_editing/img_mixer", {**MIXER_V6, "init_image": [red, blue]}, (800, 600)),
        ("/api/v5/pix2pix", {**PIX2PIX, "init_image": red}, (64, 64)),
        (
            "/api/v1/enterprise/img2img",
            {**IMG2IMG, "init_image": images.url("/wide.png")},
            (512, 512),
        ),
    ]


def test_reference_examples_end_to_end_on_postgres_and_redis(
    tmp_path: Path,
    own_pg_url: str,
    redis_url: str,
    image_server: ImageServer,
    receiver: WebhookReceiver,
) -> None:
    # A database of its own: the system's sweeper would also run other tests' leftovers.
    env = production_env(tmp_path / "data", own_pg_url, redis_url, "e2e")
    with darkroom_up(env, tmp_path) as system:
        key = system.create_key()
        accepted = []
        for index, (path, body, size) in enumerate(submissions(image_server, receiver.url)):
            track_id = 1000 + index
            answer = system.post(
                path, {**body, "key": key["key"], "webhook": receiver.url, "track_id": track_id}
            )
            assert answer["status"] == "processing", answer
            assert answer["track_id"] == track_id
            accepted.append((path, answer, size))

        for path, answer, size in accepted:
            fetch_path = answer["fetch_result"].removeprefix(system.base_url)
            done = system.wait_for(fetch_path, key["key"])
            assert done["status"] == "success", (path, done, system.log_tail())
            links = [done["output"]] if isinstance(done["output"], str) else done["output"]
            assert links == answer["future_links"]
            assert [png_size(system, link) for link in links] == [size]
            assert isinstance(done["meta"]["seed"], int)
            assert done["generationTime"] > 0

        hooks = wait_for_webhooks(receiver, len(accepted))
        payloads = {p["id"]: p for p in (verified_payload(h, key["webhook_secret"]) for h in hooks)}
        assert sorted(payloads) == sorted(answer["id"] for _, answer, _ in accepted)
        for _, answer, _ in accepted:
            payload = payloads[answer["id"]]
            assert payload["status"] == "success"
            assert payload["track_id"] == answer["track_id"]
            assert set(payload) == {"status", "id", "output", "generationTime", "track_id", "meta"}
        assert len({h.headers["webhook-id"] for h in hooks}) == len(accepted)
    assert system.process.returncode == 0, system.log_tail()


#: The enterprise page's body with every documented field set (the image comes inline).
EVERY_FIELD = {
    "model_id": "tiny-sd",
    "prompt": "papercraft, quilling, layers, landscape",
    "negative_prompt": "blurry",
    "width": "96",
    "height": 64,
    "samples": "2",
    "num_inference_steps": "4",
    "safety_checker": "yes",
    "safety_checker_type": "blur",
    "enhance_prompt": "yes",
    "guidance_scale": 7.5,
    "strength": 0.7,
    "scheduler": "EulerAncestralDiscreteScheduler",
    "lora_model": "contrast-fix,yae-miko-genshin",
    "lora_strength": "0.6,0.4",
    "tomesd": "yes",
    "use_karras_sigmas": "yes",
    "algorithm_type": "dpmsolver+++",
    "vae": "vae-one",
    "embeddings_model": "emb-one",
    "clip_skip": 2,
    "base64": "yes",
    "temp": "yes",
    "seed": 7,
    "loadbalancer": "no",
    "webhook": None,
    "track_id": 9,
}


def _png_from_base64(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    assert image.format == "PNG"
    return image


def test_embedded_profile_success_and_failure_with_webhooks(
    tmp_path: Path, image_server: ImageServer, receiver: WebhookReceiver
) -> None:
    inline = base64.b64encode(png(96, 64, (90, 10, 200))).decode()
    env = {
        "DARKROOM_DATA_DIR": str(tmp_path / "data"),
        "DARKROOM_MODEL_PRESET": "tiny",
        "DARKROOM_URL_ALLOWLIST": "127.0.0.1/32",
    }
    with darkroom_up(env, tmp_path) as system:
        key = system.create_key()
        good = {**PIX2PIX, "init_image": image_server.url("/green.jpg"), "steps": 4}
        bad = {**PIX2PIX, "init_image": image_server.url("/text.txt"), "track_id": "bad-1"}
        ok = system.post("/api/v5/pix2pix", {**good, "key": key["key"], "webhook": receiver.url})
        ko = system.post("/api/v5/pix2pix", {**bad, "key": key["key"], "webhook": receiver.url})
        every = system.post(
            "/api/v1/enterprise/img2img", {**EVERY_FIELD, "key": key["key"], "init_image": inline}
        )

        done = system.wait_for(f"/api/v5/fetch/{ok['id']}", key["key"])
        failed = system.wait_for(f"/api/v5/fetch/{ko['id']}", key["key"])

        assert done["status"] == "success", system.log_tail()
        assert png_size(system, done["output"]) == (96, 64)
        assert failed["status"] == "failed"
        assert failed["message"].startswith("Unable to fetch image from provided URL")
        hooks = wait_for_webhooks(receiver, 2)
        payloads = {p["id"]: p for p in (verified_payload(h, key["webhook_secret"]) for h in hooks)}
        assert payloads[ko["id"]] == {
            "status": "failed",
            "id": ko["id"],
            "message": failed["message"],
            "messege": failed["message"],
            "track_id": "bad-1",
        }
        assert payloads[ok["id"]]["output"] == done["output"]
        full = system.wait_for(f"/api/v1/enterprise/fetch/{every['id']}", key["key"])
        assert full["status"] == "success", (full, system.log_tail())
        assert len(full["output"]) == 2
        assert all(_png_from_base64(item).size == (96, 64) for item in full["output"])
        assert full["meta"]["nsfw_content_detected"] == [False, False]
        assert full["meta"]["temp_expires_at"]
        assert (tmp_path / "data" / "darkroom.sqlite3").is_file()
    assert system.process.returncode == 0, system.log_tail()
    assert json.loads(hooks[0].body)  # plain JSON on the wire


def test_up_restarts_a_tier_that_dies(
    tmp_path: Path, image_server: ImageServer, receiver: WebhookReceiver
) -> None:
    env = {
        "DARKROOM_DATA_DIR": str(tmp_path / "data"),
        "DARKROOM_MODEL_PRESET": "tiny",
        "DARKROOM_URL_ALLOWLIST": "127.0.0.1/32",
    }
    with darkroom_up(env, tmp_path) as system:
        key = system.create_key()
        tiers = {_tier(child): child for child in psutil.Process(system.process.pid).children()}
        tiers["worker"].kill()
        tiers["dispatcher"].kill()

        body = {**PIX2PIX, "init_image": image_server.url("/red.png"), "steps": 2}
        answer = system.post(
            "/api/v5/pix2pix", {**body, "key": key["key"], "webhook": receiver.url}
        )
        done = system.wait_for(f"/api/v5/fetch/{answer['id']}", key["key"], timeout=120)

        assert done["status"] == "success", system.log_tail()
        [hook] = wait_for_webhooks(receiver, 1)
        assert verified_payload(hook, key["webhook_secret"])["id"] == answer["id"]
        restarted = {_tier(child) for child in psutil.Process(system.process.pid).children()}
        assert restarted == set(tiers)  # every tier runs again, the killed ones restarted
        assert {"api", "worker", "dispatcher", "installer"} <= restarted
    assert system.process.returncode == 0, system.log_tail()


def _tier(process: psutil.Process) -> str:
    """Which tier a `python -m cli.main <tier> ...` child runs."""
    cmdline = process.cmdline()
    return cmdline[cmdline.index("cli.main") + 1]
