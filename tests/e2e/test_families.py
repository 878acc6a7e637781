"""Every family a user brings, through `darkroom up` with the tiny preset off.

One system serves an SD 1.x folder, an SD 2.x v-prediction folder, an SDXL folder and a Flux
folder, and the SD 1.x, SD 2.x (a `.ckpt`) and SDXL models as single original-layout files,
installed under DARKROOM_MODELS_DIR (the tiny models, built in code and saved as an operator
would install real ones), each with the enterprise page's example body: PNG sizes checked,
`meta` names the family that ran, and the same seed gives the same bytes. SDXL also gets a
kohya-format LoRA, an SDXL embedding (clip_l + clip_g) and a custom VAE, SD 1.x a kohya LoRA
with its text-encoder part, an embedding, the VAE and another scheduler, Flux a kohya LoRA;
Flux's refusals are checked at submit, and a Flux job sized by an init image that is no multiple
of 16 is rounded.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from safetensors.torch import load_file, save_file

from darkroom.identities import Family, TinyModel
from tests.api.test_submit import IMG2IMG as EXAMPLE
from tests.e2e.test_system import png_size
from tests.support.servers import ImageServer, png
from tests.support.system import RunningSystem, darkroom_up, production_env
from worker.models import tiny, tiny_addons

pytestmark = pytest.mark.slow


def install_models(root: Path, build: Path) -> Path:
    """A models folder as an operator fills it: three families, add-ons, the safety checker."""
    tiny.ensure_tiny_models(build)
    for name in (TinyModel.SDXL_IMG2IMG, TinyModel.FLUX_IMG2IMG, TinyModel.SD2_V_IMG2IMG):
        tiny.ensure_tiny_family_model(build, name)
    root.mkdir()
    for source, target in [
        (TinyModel.SD_IMG2IMG, "my-sd"),
        (TinyModel.SDXL_IMG2IMG, "my-sdxl"),
        (TinyModel.FLUX_IMG2IMG, "acme/my-flux"),  # an owner's folder, like a Hub id
        (TinyModel.SD2_V_IMG2IMG, "my-sd2-v"),
        (TinyModel.SAFETY_CHECKER, "safety-checker"),
    ]:
        (root / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(build / source), root / target)
    # The same models as single files in the original (A1111) layout, configured locally.
    for folder, family in (("my-sd", Family.SD), ("my-sdxl", Family.SDXL)):
        tiny_addons.write_sd_checkpoint(root / folder, root / f"{folder}-file.safetensors")
        shutil.copytree(root / folder, root / "configs" / family)
    # SD 2.x v-prediction as a .ckpt (OpenCLIP keys), configured by configs/sd2/ (v_prediction).
    tiny_addons.write_sd_checkpoint(root / "my-sd2-v", root / "my-sd2-v-file.ckpt")
    shutil.copytree(root / "my-sd2-v", root / "configs" / "sd2")
    tiny_addons.ensure_tiny_lora(build / "xl.safetensors", "xl", Family.SDXL)
    (root / "loras").mkdir()
    kohya = tiny_addons.kohya_lora(load_file(str(build / "xl.safetensors")))
    save_file(kohya, str(root / "loras" / "xl-kohya.safetensors"))
    tiny_addons.ensure_tiny_embedding(
        root / "embeddings" / "xl-emb.safetensors", "xl-emb", Family.SDXL
    )
    # kohya files as model sites ship them: SD's with its text-encoder part, Flux's (sd-scripts).
    tiny_addons.ensure_tiny_lora(root / "loras" / "sd-kohya.safetensors", "kohya-sd", Family.SD)
    tiny_addons.ensure_tiny_lora(
        root / "loras" / "flux-kohya.safetensors", "kohya-flux", Family.FLUX
    )
    tiny_addons.ensure_tiny_embedding(
        root / "embeddings" / "sd-emb.safetensors", "sd-emb", Family.SD
    )
    tiny_addons.ensure_tiny_vae(root / "vae" / "my-vae", "my-vae")
    return root


def body(image_server: ImageServer, **fields: Any) -> dict[str, Any]:
    """The page's example at 64x64 and 2 steps (a tiny model's cost on a CPU)."""
    return {
        **EXAMPLE,
        "init_image": image_server.url("/red.png"),
        "width": "64",
        "height": "64",
        "num_inference_steps": "2",
        "seed": 11,
        **fields,
    }


def run(system: RunningSystem, key: str, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Submit every request, then wait for each; the finished answers, in order."""
    answers = [system.post("/api/v1/enterprise/img2img", {**r, "key": key}) for r in requests]
    for answer in answers:
        assert answer["status"] == "processing", answer
    done = []
    for answer in answers:
        fetch_path = answer["fetch_result"].removeprefix(system.base_url)
        finished = system.wait_for(fetch_path, key)
        assert finished["status"] == "success", (finished, system.log_tail())
        done.append(finished)
    return done


def png_bytes(url: str) -> bytes:
    return httpx.get(url, timeout=10).content


def test_sd_sdxl_and_flux_folders_run_under_one_system(
    tmp_path: Path, own_pg_url: str, redis_url: str, image_server: ImageServer
) -> None:
    models = install_models(tmp_path / "models", tmp_path / "build")
    env = {
        **production_env(tmp_path / "data", own_pg_url, redis_url, "families"),
        "DARKROOM_MODEL_PRESET": "",
        "DARKROOM_MODELS_DIR": str(models),
    }
    sdxl_extras = {
        "lora_model": "xl-kohya",
        "lora_strength": "0.8",
        "embeddings_model": "xl-emb",
        "vae": "my-vae",
        "scheduler": "EulerDiscreteScheduler",
        "prompt": "xl-emb barn, " * 30,  # past 77 tokens on both encoders
    }
    sd_extras = {
        "lora_model": "sd-kohya",
        "embeddings_model": "sd-emb",
        "vae": "my-vae",
        "scheduler": "DPMSolverMultistepScheduler",
        "prompt": "sd-emb barn",
    }
    flux = {"model_id": "acme/my-flux", "scheduler": None, "tomesd": "no", "guidance_scale": 3.5}
    # 104x72: multiples of 8, not of 16; a Flux job without width and height rounds it.
    image_server.files["/odd.png"] = (png(104, 72, (90, 140, 200)), "image/png")
    odd_flux = {**body(image_server, **flux), "init_image": image_server.url("/odd.png")}
    del odd_flux["width"], odd_flux["height"]
    with darkroom_up(env, tmp_path) as system:
        key = system.create_key()["key"]
        refused = system.post(
            "/api/v1/enterprise/img2img", {**body(image_server, **flux), "clip_skip": 2, "key": key}
        )
        assert refused["status"] == "error"
        assert "no CLIP skip" in refused["message"]["clip_skip"][0]
        done = run(
            system,
            key,
            [
                body(image_server, model_id="my-sd"),
                body(image_server, model_id="my-sdxl"),
                body(image_server, model_id="my-sdxl"),  # the same seed: the same bytes
                body(image_server, model_id="my-sdxl", **sdxl_extras),
                body(image_server, **flux),
                body(image_server, **flux, height="96"),
                body(image_server, model_id="my-sd-file"),
                body(image_server, model_id="my-sdxl-file"),
                body(image_server, model_id="my-sd2-v"),
                body(image_server, model_id="my-sd2-v-file"),
                body(image_server, model_id="my-sd", **sd_extras),
                body(image_server, **flux, lora_model="flux-kohya"),
                odd_flux,
            ],
        )
        families = [answer["meta"]["model_family"] for answer in done]
        assert families == [
            Family.SD,
            Family.SDXL,
            Family.SDXL,
            Family.SDXL,
            Family.FLUX,
            Family.FLUX,
            Family.SD,
            Family.SDXL,
            Family.SD,
            Family.SD,
            Family.SD,
            Family.FLUX,
            Family.FLUX,
        ]
        assert (done[-1]["meta"]["W"], done[-1]["meta"]["H"]) == (96, 64)  # the size used
        links = [
            answer["output"] if isinstance(answer["output"], str) else answer["output"][0]
            for answer in done
        ]
        sizes = [png_size(system, link) for link in links]
        assert sizes == [(64, 64)] * 5 + [(64, 96)] + [(64, 64)] * 6 + [(96, 64)]
        pngs = [png_bytes(link) for link in links]
        assert pngs[1] == pngs[2]
        assert (pngs[6], pngs[7]) == (pngs[0], pngs[1])  # a single file runs as its folder
        assert pngs[9] == pngs[8]  # the SD 2.x .ckpt too, as v-prediction
        assert pngs[3] != pngs[1]  # LoRA, embedding, VAE and prompt all took effect
        assert pngs[10] != pngs[0]  # the same on SD 1.x, with another scheduler
        assert pngs[11] != pngs[4]  # a kohya Flux LoRA
        assert len(set(pngs)) == 9  # 13 images: the SDXL repeat and the 3 single files match
    assert system.process.returncode == 0, system.log_tail()
