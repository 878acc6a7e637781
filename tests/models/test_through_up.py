"""Bringing models through `darkroom up`, as a team moving off the hosted API would.

Tiny models written in the original layouts (an SD 1.x single file, a kohya LoRA, an A1111
embedding) are served from loopback, loaded with load_model, load_model_v2 and `darkroom models
add` under an admin key; the signed webhooks arrive; then img2img runs with the new model_id,
the LoRA and the embedding. Other keys are refused in the hosted API's error shape.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks.webhooks import Webhook

from tests.api.test_submit import IMG2IMG as EXAMPLE
from tests.models.conftest import FileServer, Served, TinyFiles, models_folder
from tests.support.servers import ImageServer, WebhookReceiver
from tests.support.system import RunningSystem, darkroom, darkroom_up, production_env

pytestmark = pytest.mark.slow
PREFIX = "/api/v1/enterprise"


def _wait_hooks(receiver: WebhookReceiver, count: int, system: RunningSystem) -> list[Any]:
    """The first `count` webhook POSTs, waiting up to two minutes."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        got = receiver.snapshot()
        if len(got) >= count:
            return got
        time.sleep(0.3)
    raise AssertionError(f"{len(receiver.snapshot())} webhooks\n{system.log_tail()}")


def _img2img(image_server: ImageServer, key: str, **fields: Any) -> dict[str, Any]:
    return {
        **EXAMPLE,
        "key": key,
        "init_image": image_server.url("/red.png"),
        "width": "64",
        "height": "64",
        "num_inference_steps": "2",
        "seed": 5,
        **fields,
    }


def _run(system: RunningSystem, key: str, body: dict[str, Any]) -> bytes:
    """Submit, wait, and download the first image."""
    answer = system.post(f"{PREFIX}/img2img", body)
    assert answer["status"] == "processing", answer
    done = system.wait_for(answer["fetch_result"].removeprefix(system.base_url), key)
    assert done["status"] == "success", (done, system.log_tail())
    assert done["meta"]["model_family"] == "sd"
    link = done["output"] if isinstance(done["output"], str) else done["output"][0]
    return httpx.get(link, timeout=10).content


def test_models_brought_by_url_run_img2img(
    tmp_path: Path,
    own_pg_url: str,
    redis_url: str,
    image_server: ImageServer,
    receiver: WebhookReceiver,
    file_server: FileServer,
    tiny_files: TinyFiles,
) -> None:
    models = models_folder(tmp_path / "models", tiny_files)
    shutil.copytree(tiny_files.sd_folder.parent / "safety-checker", models / "safety-checker")
    file_server.files |= {
        "/juggernaut.safetensors": Served(tiny_files.sd_checkpoint),
        "/style-kohya.safetensors": Served(tiny_files.kohya_lora),
        "/emb.safetensors": Served(tiny_files.embedding),
    }
    env = {
        **production_env(tmp_path / "data", own_pg_url, redis_url, "bring"),
        "DARKROOM_MODEL_PRESET": "",
        "DARKROOM_MODELS_DIR": str(models),
        "DARKROOM_INSTALL_POLL_S": "0.2",
    }
    with darkroom_up(env, tmp_path) as system:
        admin = json.loads(
            darkroom(system.env, "keys", "create", "--name", "ops", "--admin").splitlines()[-1]
        )
        plain = system.create_key()
        load = {"url": file_server.url("/juggernaut.safetensors"), "model_id": "juggernaut"}
        for key, status in ((plain["key"], 403), ("wrong", 401)):
            refused = httpx.post(
                system.base_url + f"{PREFIX}/load_model", json={**load, "key": key}, timeout=10
            )
            assert refused.status_code == status
            assert refused.json()["status"] == "error"
        started = system.post(
            f"{PREFIX}/load_model_v2",
            {
                **load,
                "key": admin["key"],
                "model_category": "stable_diffusion",
                "model_format": "safetensors",
                "webhook": receiver.url,
            },
        )
        assert (started["status"], started["message"]) == ("success", "model load started")
        lora = system.post(
            f"{PREFIX}/load_model",
            {
                "key": admin["key"],
                "url": file_server.url("/style-kohya.safetensors"),
                "model_id": "style",
                "model_type": "lora",
                "webhook": receiver.url,
            },
        )
        assert lora["status"] == "success", lora
        added = darkroom(
            system.env, "models", "add", file_server.url("/emb.safetensors"),
            "--id", "brought-emb", "--type", "embedding",
        )  # fmt: skip
        assert json.loads(added.splitlines()[-1])["model_status"] == "ready"
        hooks = _wait_hooks(receiver, 2, system)
        bodies = [Webhook(admin["webhook_secret"]).verify(h.body, h.headers) for h in hooks]
        assert sorted(b["model_id"] for b in bodies) == ["juggernaut", "style"]
        assert all(b["status"] == "success" for b in bodies), bodies
        verified = system.post(f"{PREFIX}/verify_model", {"key": admin["key"], "model_id": "style"})
        assert verified["model_status"] == "ready"
        listed = system.post(f"{PREFIX}/get_all_models", {"key": admin["key"]})
        kinds = {row["model_id"]: row["model_type"] for row in listed["models"]}
        assert kinds == {"juggernaut": "model", "style": "lora", "brought-emb": "embedding"}
        plain_image = _run(
            system, plain["key"], _img2img(image_server, plain["key"], model_id="juggernaut")
        )
        styled = _run(
            system,
            plain["key"],
            _img2img(
                image_server,
                plain["key"],
                model_id="juggernaut",
                lora_model="style",
                embeddings_model="brought-emb",
                prompt="brought-emb a barn",
            ),
        )
        assert plain_image != styled  # the LoRA and the embedding took effect
        deleted = system.post(f"{PREFIX}/delete_model", {"key": admin["key"], "model_id": "style"})
        assert deleted["status"] == "success", deleted
        gone = system.post(f"{PREFIX}/verify_model", {"key": admin["key"], "model_id": "style"})
        assert gone["status"] == "error"
    assert system.process.returncode == 0, system.log_tail()
