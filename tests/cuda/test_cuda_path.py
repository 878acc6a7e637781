"""The worker's CUDA path, run on a real GPU: half precision, channels_last, fused QKV, LoRAs on
fused projections, batching, measured activation memory, torch.compile's warm-up and its cache.

Skipped where torch sees no GPU (CI, the 2-CPU development machines); `benchmarks/gpu_session.sh`
runs them on a lent GPU with `--noconftest` (the project's conftests need Postgres and Redis,
which that machine does not have), so every fixture lives here. Each test prints what it
measured, so the session log carries the figures behind a pass or a failure.

Tolerances: the fast path runs in float16 (bfloat16 for Flux), the reference in float32, so the
two differ by rounding through every step; a batched call may pick other kernels than a lone
one, so batched and unbatched differ by rounding too. Each bound is far below what a real defect
gives (a request's images swapped with another's, a LoRA applied to the wrong request, NaN turned
black).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

from darkroom.identities import Family, Operation
from darkroom.settings import Settings
from tests.support.tiny import small_request, tiny_settings_at
from worker.batching import generate_batch
from worker.fastpath import MEGA_CACHE_FILE, FastPath, fast_path_for, qkv_fused
from worker.memory import ShapeKey, available_bytes
from worker.models.cache import ModelCache
from worker.models.weights import resolve_model
from worker.pipelines.generate import generate
from worker.pipelines.request import GenerationRequest, LoraSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#: Mean pixel-channel difference (0..255) between the fast path in half precision and float32.
MEAN_TOLERANCE_VS_FLOAT32 = 6.0
#: Largest pixel-channel difference between a batched image and the same request alone, on CUDA.
BATCH_TOLERANCE = 8
#: The families' tiny models and the operations' defaults, as a request names them.
MODELS = [
    (Operation.IMG2IMG, None),
    (Operation.PIX2PIX, None),
    (Operation.IMG_MIXER, None),
    (Operation.IMG2IMG, "tiny-sd2-v"),
    (Operation.IMG2IMG, "tiny-sdxl"),
    (Operation.IMG2IMG, "tiny-flux"),
]


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return tiny_settings_at(tmp_path_factory.mktemp("darkroom"))


@pytest.fixture(scope="module")
def gpu(settings: Settings) -> ModelCache:
    """The worker's cache on CUDA with the fast path its settings give (fp16, NHWC, fused QKV)."""
    return ModelCache(max_entries=8, device="cuda", fast_path=fast_path_for(settings, "cuda"))


@pytest.fixture(scope="module")
def float32() -> ModelCache:
    """The plain modules in float32 on CUDA: the reference for half precision. On CUDA, not on
    the CPU: a seed's noise comes from a generator on the pipeline's device, and CUDA's random
    stream differs from the CPU's (same seed, other picture: measured here, mean 35 levels)."""
    return ModelCache(max_entries=8, device="cuda", fast_path=FastPath("cuda", torch.float32))


def _request(operation: str = Operation.IMG2IMG, **fields: Any) -> GenerationRequest:
    """One sample of the small request; the mixer's image weight and Flux's guidance."""
    defaults: dict[str, Any] = {"seeds": (21,)}
    if operation == Operation.IMG_MIXER:
        defaults["image_weights"] = (1.0,)
    if fields.get("model_id") == "tiny-flux":
        defaults["guidance_scale"] = 3.5
    return small_request(operation, **(defaults | fields))


def _pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image.convert("RGB"), dtype=np.int16) for image in images])


def _generate(request: GenerationRequest, cache: ModelCache, settings: Settings) -> np.ndarray:
    images = generate(request, cache, settings).images
    assert all(image.size == (request.width, request.height) for image in images)
    return _pixels(images)


@pytest.mark.parametrize(("operation", "model_id"), MODELS)
def test_every_operation_and_family_runs_in_half_precision_close_to_float32(
    operation: str, model_id: str | None, settings: Settings, gpu: ModelCache, float32: ModelCache
) -> None:
    request = _request(operation, model_id=model_id)
    half = _generate(request, gpu, settings)
    exact = _generate(request, float32, settings)

    difference = np.abs(half - exact)
    print(f"{operation} {model_id}: vs float32 mean {difference.mean():.2f} max {difference.max()}")
    assert half.std() > 0, "a uniform image: NaN or overflow in half precision"
    assert difference.mean() <= MEAN_TOLERANCE_VS_FLOAT32
    spec = resolve_model(operation, model_id, settings)
    for pipeline in gpu.get(spec)[0].pipelines:
        expected = torch.bfloat16 if spec.family == Family.FLUX else torch.float16
        assert pipeline.device.type == "cuda"
        assert pipeline.dtype == expected


def test_the_fast_path_is_applied_on_cuda(settings: Settings, gpu: ModelCache) -> None:
    (pipe,) = gpu.get(resolve_model(Operation.IMG2IMG, None, settings))[0].pipelines
    assert qkv_fused(pipe.unet)
    assert qkv_fused(pipe.vae)
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("model_id", [None, "tiny-sdxl", "tiny-flux"])
def test_batched_requests_match_each_run_alone_and_their_memory_is_measured(
    model_id: str | None, settings: Settings, gpu: ModelCache
) -> None:
    requests = [
        _request(model_id=model_id, prompt=f"harbour {n}", seeds=(30 + n, 40 + n)) for n in range(3)
    ]
    outcomes = generate_batch(requests, gpu, settings)

    batched = []
    for outcome in outcomes:
        assert not isinstance(outcome, Exception), outcome
        batched.append(_pixels(outcome.images))
    alone = [_generate(request, gpu, settings) for request in requests]
    worst = max(int(np.abs(one - other).max()) for one, other in zip(batched, alone, strict=True))
    others = np.abs(batched[0] - batched[1]).max()
    spec = resolve_model(Operation.IMG2IMG, model_id, settings)
    per_sample = gpu.memory.per_sample_bytes(ShapeKey(spec, 64, 64))
    free = available_bytes("cuda", settings.gpu_memory_fraction)
    print(f"{model_id}: batched vs alone max {worst}; per sample {per_sample} B; free {free} B")
    assert worst <= BATCH_TOLERANCE
    assert others > BATCH_TOLERANCE, "two requests gave the same pixels"
    assert per_sample
    assert free
    fits = gpu.memory.samples_that_fit(ShapeKey(spec, 64, 64), free, 1_000_000)
    assert fits == free // per_sample


def test_a_lora_on_fused_half_precision_projections(settings: Settings, gpu: ModelCache) -> None:
    without = _generate(_request(), gpu, settings)
    with_lora = _generate(_request(loras=(LoraSpec("lora-a", 1.0),)), gpu, settings)
    again = _generate(_request(), gpu, settings)

    print(f"lora: changed by up to {np.abs(with_lora - without).max()}")
    assert np.abs(with_lora - without).max() > 10, "the LoRA changed the image"
    (pipe,) = gpu.get(resolve_model(Operation.IMG2IMG, None, settings))[0].pipelines
    assert qkv_fused(pipe.unet), "fused again after the LoRA"
    assert np.array_equal(again, without), "the LoRA left nothing behind"


@pytest.mark.parametrize(
    "options",
    [
        {"scheduler": "DPMSolverMultistepScheduler", "use_karras_sigmas": True},
        {"clip_skip": 2},
        {"tomesd": True, "width": 128, "height": 128},
        {"safety_checker": True},
        {"vae": "vae-a"},
        {"embeddings": ("emb-a",), "prompt": "emb-a harbour"},
    ],
)
def test_request_options_run_on_cuda(
    options: dict[str, Any], settings: Settings, gpu: ModelCache
) -> None:
    pixels = _generate(_request(**options), gpu, settings)
    assert pixels.std() > 0


def test_a_compiled_unet_is_warmed_up_at_load_and_its_cache_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: Settings, gpu: ModelCache
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    compiled_settings = settings.model_copy(
        update={"compile": "unet", "compile_cache_dir": tmp_path / "compile"}
    )
    compiled = ModelCache(device="cuda", fast_path=fast_path_for(compiled_settings, "cuda"))

    request = _request(seeds=(21, 22))
    compiled.get(resolve_model(Operation.IMG2IMG, None, compiled_settings))  # compiles, warms up
    graphs = counters["stats"]["unique_graphs"]
    fast = _generate(request, compiled, compiled_settings)
    eager = _generate(request, gpu, settings)

    print(f"compiled vs eager max {np.abs(fast - eager).max()}; {graphs} graphs at warm-up")
    assert graphs > 0
    assert counters["stats"]["unique_graphs"] == graphs, "the job compiled the UNet again"
    assert np.abs(fast - eager).max() <= BATCH_TOLERANCE
    assert (tmp_path / "compile" / MEGA_CACHE_FILE).is_file()
