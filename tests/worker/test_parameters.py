"""Every img2img parameter of the enterprise page, on the tiny models: each one has an effect,
is deterministic, and leaves nothing behind for the next request."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from darkroom import model_ids
from darkroom.identities import Operation
from darkroom.model_ids import UnknownModelError, check_ids
from darkroom.scheduler_names import IMG2IMG_SCHEDULERS, REFUSED_SCHEDULERS
from darkroom.settings import Settings
from tests.test_architecture import HEAVY, modules_loaded_by
from worker.models.cache import ModelCache
from worker.models.weights import ModelSpec, PipelineSource, resolve_model
from worker.pipelines.generate import generate
from worker.pipelines.request import GenerationRequest, GenerationResult, LoraSpec
from worker.pipelines.schedulers import build_scheduler

MARKER = model_ids.TINY_NSFW_MARKER


def init_image() -> Image.Image:
    pixels = np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def request_with(**changes: Any) -> GenerationRequest:
    """A 64x64, two-step, one-sample img2img request with `changes`."""
    request = GenerationRequest(
        operation=Operation.IMG2IMG,
        model_id=None,
        prompt="a red house",
        negative_prompt="",
        images=(init_image(),),
        image_weights=(),
        width=64,
        height=64,
        steps=2,
        guidance_scale=7.5,
        seeds=(3,),
    )
    return replace(request, **changes)


def png(result: GenerationResult) -> list[bytes]:
    outputs = []
    for image in result.images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        outputs.append(buffer.getvalue())
    return outputs


def run(settings: Settings, cache: ModelCache, **changes: Any) -> list[bytes]:
    return png(generate(request_with(**changes), cache, settings))


EVERYTHING: dict[str, Any] = {
    "scheduler": "DPMSolverMultistepScheduler",
    "use_karras_sigmas": True,
    "algorithm_type": "dpmsolver+++",
    "loras": (LoraSpec("contrast-fix", 0.8), LoraSpec("yae-miko-genshin", 0.5)),
    "vae": "my-vae",
    "embeddings": ("my-style",),
    "prompt": "a my-style house",
    "clip_skip": 2,
    "tomesd": True,
    "safety_checker": True,
}


# Schedulers


@pytest.mark.parametrize("name", IMG2IMG_SCHEDULERS)
def test_every_page_scheduler_runs_img2img(
    name: str, tiny_settings: Settings, model_cache: ModelCache
) -> None:
    result = generate(request_with(scheduler=name), model_cache, tiny_settings)
    assert result.images[0].size == (64, 64)


@pytest.mark.parametrize("name", REFUSED_SCHEDULERS)
def test_schedulers_without_add_noise_are_refused_by_name(
    name: str, tiny_settings: Settings, model_cache: ModelCache
) -> None:
    with pytest.raises(ValueError, match="cannot do img2img") as refused:
        generate(request_with(scheduler=name), model_cache, tiny_settings)
    assert all(working in str(refused.value) for working in IMG2IMG_SCHEDULERS)


def test_dpmsolver_plus_plus_plus_is_third_order_sde_dpmsolver(model_cache: ModelCache) -> None:
    config = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear"}
    scheduler = build_scheduler("DPMSolverMultistepScheduler", config, False, "dpmsolver+++")
    assert scheduler.config.algorithm_type == "sde-dpmsolver++"
    assert scheduler.config.solver_order == 3


def test_karras_and_algorithm_type_apply_only_where_the_scheduler_has_them() -> None:
    config = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear"}
    euler = build_scheduler("EulerDiscreteScheduler", config, True, "dpmsolver+++")
    assert euler.config.use_karras_sigmas is True
    assert "algorithm_type" not in euler.config
    assert "use_karras_sigmas" not in build_scheduler("DDIMScheduler", config, True, None).config


def test_scheduler_options_change_the_output(
    tiny_settings: Settings, model_cache: ModelCache
) -> None:
    dpm = {"scheduler": "DPMSolverMultistepScheduler"}
    outputs = {
        run(tiny_settings, model_cache, **dpm)[0],
        run(tiny_settings, model_cache, **dpm, use_karras_sigmas=True)[0],
        run(tiny_settings, model_cache, **dpm, algorithm_type="dpmsolver+++", steps=3)[0],
        run(tiny_settings, model_cache, **dpm, steps=3)[0],
    }
    assert len(outputs) == 4


# Per-request state and determinism


def test_a_request_with_every_option_leaves_no_trace(
    tiny_settings: Settings, model_cache: ModelCache
) -> None:
    fresh = run(tiny_settings, ModelCache(device="cpu"))
    first = run(tiny_settings, model_cache, **EVERYTHING)
    again = run(tiny_settings, model_cache, **EVERYTHING)
    after = run(tiny_settings, model_cache)
    assert first == again  # deterministic with every option
    assert first != fresh
    assert after == fresh


def test_pix2pix_takes_the_same_options_and_restores(
    tiny_settings: Settings, model_cache: ModelCache
) -> None:
    plain = request_with(operation=Operation.PIX2PIX)
    before = png(generate(plain, model_cache, tiny_settings))
    rich = replace(plain, **{**EVERYTHING, "scheduler": "EulerAncestralDiscreteScheduler"})
    assert png(generate(rich, model_cache, tiny_settings)) != before
    assert png(generate(plain, model_cache, tiny_settings)) == before


# LoRA, VAE, embeddings


def test_loras_apply_at_their_strength(tiny_settings: Settings, model_cache: ModelCache) -> None:
    plain = run(tiny_settings, model_cache)
    off = run(tiny_settings, model_cache, loras=(LoraSpec("contrast-fix", 0.0),))
    one = run(tiny_settings, model_cache, loras=(LoraSpec("contrast-fix", 1.0),))
    other = run(tiny_settings, model_cache, loras=(LoraSpec("other-lora", 1.0),))
    both = run(
        tiny_settings,
        model_cache,
        loras=(LoraSpec("contrast-fix", 1.0), LoraSpec("other-lora", 0.5)),
    )
    assert off == plain
    assert len({plain[0], one[0], other[0], both[0]}) == 4


def test_a_vae_id_swaps_the_decoder(tiny_settings: Settings, model_cache: ModelCache) -> None:
    outputs = {run(tiny_settings, model_cache, vae=vae)[0] for vae in (None, "vae-a", "vae-b")}
    assert len(outputs) == 3


def test_an_embedding_id_is_a_prompt_token(
    tiny_settings: Settings, model_cache: ModelCache
) -> None:
    prompt = "a my-style house"
    without = run(tiny_settings, model_cache, prompt=prompt)
    styled = run(tiny_settings, model_cache, prompt=prompt, embeddings=("my-style",))
    unused = run(tiny_settings, model_cache, embeddings=("my-style",))
    assert styled != without
    assert unused == run(tiny_settings, model_cache)  # loaded but not in the prompt: no effect


# Clip skip, long prompts, token merging


def test_clip_skip_picks_an_earlier_layer(tiny_settings: Settings, model_cache: ModelCache) -> None:
    default = run(tiny_settings, model_cache)
    assert run(tiny_settings, model_cache, clip_skip=1) == default
    assert run(tiny_settings, model_cache, clip_skip=2) != default
    assert run(tiny_settings, model_cache, clip_skip=8) != default
    with pytest.raises(ValueError, match="clip_skip"):
        run(tiny_settings, model_cache, clip_skip=9)


@pytest.mark.parametrize("operation", [Operation.IMG2IMG, Operation.PIX2PIX])
def test_words_after_77_tokens_still_count(
    operation: str, tiny_settings: Settings, model_cache: ModelCache
) -> None:
    long = "a red house " * 10  # 120 characters: the tiny tokenizer makes one token of each
    outputs = {
        run(tiny_settings, model_cache, operation=operation, prompt=f"{long}{tail}")[0]
        for tail in ("by the sea", "in the snow")
    }
    outputs.add(run(tiny_settings, model_cache, operation=operation, negative_prompt=long)[0])
    assert len(outputs) == 3


def test_tomesd_merges_tokens_deterministically(
    tiny_settings: Settings, model_cache: ModelCache
) -> None:
    plain = run(tiny_settings, model_cache)
    merged = run(tiny_settings, model_cache, tomesd=True)
    assert merged != plain
    assert run(tiny_settings, model_cache, tomesd=True) == merged


# Safety checker


def test_the_checker_flags_only_marked_prompts_under_the_tiny_preset(
    tiny_settings: Settings, model_cache: ModelCache
) -> None:
    clean = generate(request_with(safety_checker=True, seeds=(1, 2)), model_cache, tiny_settings)
    unchecked = generate(request_with(seeds=(1, 2)), model_cache, tiny_settings)
    assert clean.nsfw == [False, False] == unchecked.nsfw
    assert png(clean) == png(unchecked)
    flagged = generate(
        request_with(safety_checker=True, prompt=f"a house {MARKER}", safety_checker_type="black"),
        model_cache,
        tiny_settings,
    )
    assert flagged.nsfw == [True]
    assert not np.asarray(flagged.images[0]).any()


@pytest.mark.parametrize("how", ["blur", "pixelate", "sensitive_content_text"])
def test_flagged_images_are_censored_as_asked(
    how: str, tiny_settings: Settings, model_cache: ModelCache
) -> None:
    prompt = f"a house {MARKER}"
    original = generate(request_with(prompt=prompt), model_cache, tiny_settings).images[0]
    request = request_with(prompt=prompt, safety_checker=True, safety_checker_type=how)
    censored = np.asarray(generate(request, model_cache, tiny_settings).images[0], dtype=int)
    pixels = np.asarray(original, dtype=int)
    assert censored.shape == pixels.shape
    if how == "sensitive_content_text":
        assert censored.max() > 0  # the notice is written...
        assert (censored == 0).mean() > 0.5  # ...on black
    else:
        assert censored.std() < pixels.std()  # detail is gone, colours remain
        assert abs(censored.mean() - pixels.mean()) < 20


# Registry


def test_tiny_preset_knows_every_well_formed_id(tiny_settings: Settings) -> None:
    check_ids(tiny_settings, "anything", ["contrast-fix"], "some/vae", ["easynegative"])
    with pytest.raises(UnknownModelError, match="not a valid LoRA id"):
        check_ids(tiny_settings, None, ["../escape"], None, [])


def test_real_ids_are_folders_files_or_hub_repos(tmp_path: Path) -> None:
    models = tmp_path / "models"
    for folder in ("my-sd", "vae/my-vae"):
        (models / folder).mkdir(parents=True)
    # A model folder's family is read from its model_index.json (an empty folder is no model).
    (models / "my-sd" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (models / "loras").mkdir()
    (models / "loras" / "contrast-fix.safetensors").touch()
    (models / "embeddings").mkdir()
    (models / "embeddings" / "easyneg.pt").touch()
    hub = ["owner/lora", "owner/vae"]  # Hub ids only when the operator lists them
    settings = Settings(data_dir=tmp_path, models_dir=models, hub_models=hub)
    check_ids(settings, "my-sd", ["contrast-fix", "owner/lora"], "my-vae", ["easyneg"])
    assert model_ids.resolve_lora("contrast-fix", settings).endswith("contrast-fix.safetensors")
    assert model_ids.resolve_embedding("easyneg", settings).endswith("easyneg.pt")
    assert model_ids.resolve_vae("owner/vae", settings) == "owner/vae"


@pytest.mark.parametrize(
    ("ids", "hint"),
    [
        ({"model_id": "midjourney"}, "models/midjourney/"),
        ({"loras": ["contrast-fix"]}, "models/loras/contrast-fix.safetensors"),
        ({"vae": "my-vae"}, "models/vae/my-vae/"),
        ({"embeddings": ["easyneg"]}, "models/embeddings/easyneg.safetensors or "),
    ],
)
def test_unknown_ids_say_how_to_add_them(ids: dict[str, Any], hint: str, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, models_dir=tmp_path / "models")
    arguments: dict[str, Any] = {"model_id": None, "loras": [], "vae": None, "embeddings": []}
    with pytest.raises(UnknownModelError, match="owner/name") as unknown:
        check_ids(settings, **{**arguments, **ids})
    assert hint in str(unknown.value)


def test_the_registry_never_imports_torch() -> None:
    loaded = modules_loaded_by("import darkroom.model_ids")
    assert not loaded.intersection(HEAVY)


# Cache


def test_the_byte_budget_evicts_the_least_recently_used(tiny_settings: Settings) -> None:
    img2img = resolve_model(Operation.IMG2IMG, None, tiny_settings)
    pix2pix = resolve_model(Operation.PIX2PIX, None, tiny_settings)
    probe = ModelCache(device="cpu")
    probe.get(img2img)
    cache = ModelCache(device="cpu", max_bytes=probe.resident_bytes * 3 // 2)
    cache.get(img2img)
    cache.get(pix2pix)
    assert pix2pix in cache
    assert img2img not in cache
    assert cache.resident_bytes <= probe.resident_bytes * 3 // 2


def test_a_pipeline_source_is_loaded_once_for_every_spec(tiny_settings: Settings) -> None:
    mixer = resolve_model(Operation.IMG_MIXER, None, tiny_settings)
    prior_only = ModelSpec("prior", (mixer.sources[0],))
    cache = ModelCache(device="cpu")
    full, _ = cache.get(mixer)
    prior, _ = cache.get(prior_only)
    assert prior.pipelines[0] is full.pipelines[0]
    with_both = cache.resident_bytes
    cache.get(ModelSpec("decoder", (PipelineSource(*_decoder(mixer)),)))
    assert cache.resident_bytes == with_both  # shared tensors are counted once


def _decoder(spec: ModelSpec) -> tuple[str, str]:
    return spec.sources[1].class_name, spec.sources[1].location


def test_a_vae_is_loaded_once(tiny_settings: Settings) -> None:
    cache = ModelCache(device="cpu")
    generate(request_with(), cache, tiny_settings)
    first = generate(request_with(vae="vae-once"), cache, tiny_settings)
    second = generate(request_with(vae="vae-once"), cache, tiny_settings)
    assert first.model_load_seconds > 0
    assert second.model_load_seconds == 0.0


def test_img2img_refuses_too_few_steps_for_its_strength(
    tiny_settings: Settings, model_cache: ModelCache
) -> None:
    with pytest.raises(ValueError, match="steps x strength"):
        generate(request_with(steps=1, strength=0.7), model_cache, tiny_settings)


def test_an_embedding_id_that_is_already_a_token_is_refused(
    tiny_settings: Settings, model_cache: ModelCache
) -> None:
    with pytest.raises(ValueError, match="already in tokenizer"):
        run(tiny_settings, model_cache, embeddings=("x",))
    assert run(tiny_settings, model_cache) == run(tiny_settings, ModelCache(device="cpu"))


def test_the_mixer_refuses_stable_diffusion_options(
    tiny_settings: Settings, model_cache: ModelCache
) -> None:
    request = request_with(
        operation=Operation.IMG_MIXER, image_weights=(1.0,), clip_skip=2, tomesd=True
    )
    with pytest.raises(ValueError, match="img_mixer does not support clip_skip, tomesd"):
        generate(request, model_cache, tiny_settings)
