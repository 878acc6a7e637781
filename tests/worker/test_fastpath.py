"""The fast path (dtype, SDPA, channels_last, fused QKV, compile) and memory-based batch sizing.

The CUDA-only parts (half precision, torch.compile) are checked where they are decided; the
transformations themselves run on the CPU here, in float32, against the plain tiny models.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from PIL import Image

from darkroom.identities import Operation
from darkroom.queue import make_celery
from darkroom.settings import Settings
from tests.support.tiny import small_request
from worker.fastpath import (
    FastPath,
    ensure_sdpa,
    fast_path_for,
    qkv_fused,
    use_compile_cache,
    warm_up_pipeline,
)
from worker.jobs import WorkerRuntime
from worker.memory import MemoryProfile, ShapeKey
from worker.models.cache import ModelCache
from worker.models.weights import ModelSpec, resolve_model
from worker.pipelines.generate import generate
from worker.pipelines.request import LoraSpec

diffusers_untyped: Any = diffusers  # untyped constructors

#: fp32 on the CPU: fused projections and NHWC convolutions differ only in summation order.
PIXEL_TOLERANCE = 2
ALL_ON = FastPath(device="cpu", dtype=torch.float32, channels_last=True, fuse_qkv=True)


def _max_diff(one: list[Image.Image], other: list[Image.Image]) -> int:
    pairs = zip(one, other, strict=True)
    return max(
        int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
        for a, b in pairs
    )


@pytest.fixture(scope="module")
def fast_cache() -> ModelCache:
    """A CPU cache whose pipelines get channels_last and fused QKV projections."""
    return ModelCache(max_entries=4, device="cpu", fast_path=ALL_ON)


# --- what the settings turn on ---------------------------------------------------------------


def test_the_cpu_keeps_plain_float32_and_never_compiles(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, compile="unet")
    assert fast_path_for(settings, "cpu") == FastPath.plain("cpu")
    assert FastPath.plain("cpu").dtype == torch.float32


def test_cuda_gets_half_precision_the_fast_path_and_compile_when_asked(tmp_path: Path) -> None:
    fast = fast_path_for(Settings(data_dir=tmp_path, compile="unet"), "cuda")
    assert fast.dtype == torch.float16
    assert (fast.channels_last, fast.fuse_qkv, fast.compile_unet) == (True, True, True)
    assert fast.compile_cache_dir == (tmp_path / "compile-cache").resolve()

    plain = fast_path_for(Settings(data_dir=tmp_path, fast_path=False, dtype="bfloat16"), "cuda")
    assert plain.dtype == torch.bfloat16
    assert (plain.channels_last, plain.fuse_qkv, plain.compile_unet) == (False, False, False)
    assert plain.compile_cache_dir is None


def test_a_worker_configures_its_cache_and_batch_size_from_the_settings(
    tiny_settings: Settings,
) -> None:
    cache = ModelCache(device="cpu", fast_path=ALL_ON)
    runtime = WorkerRuntime(tiny_settings, make_celery(tiny_settings), cache)
    assert cache.fast_path == FastPath.plain("cpu")
    assert runtime.max_batch == 1  # auto: no batching on the CPU
    several = tiny_settings.model_copy(update={"max_batch": 3})
    assert WorkerRuntime(several, make_celery(several), cache).max_batch == 3


# --- the transformations, on the CPU -----------------------------------------------------------


def test_fused_qkv_and_channels_last_give_the_plain_images(
    tiny_settings: Settings, model_cache: ModelCache, fast_cache: ModelCache
) -> None:
    for operation in (Operation.IMG2IMG, Operation.PIX2PIX):
        request = small_request(operation)
        plain = generate(request, model_cache, tiny_settings).images
        fast = generate(request, fast_cache, tiny_settings).images

        assert _max_diff(plain, fast) <= PIXEL_TOLERANCE
        spec = resolve_model(operation, None, tiny_settings)
        (fast_pipe,) = fast_cache.get(spec)[0].pipelines
        (plain_pipe,) = model_cache.get(spec)[0].pipelines
        assert qkv_fused(fast_pipe.unet)
        assert qkv_fused(fast_pipe.vae)
        assert not qkv_fused(plain_pipe.unet)
        assert fast_pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        processors = plain_pipe.unet.attn_processors.values()
        assert all(isinstance(p, AttnProcessor2_0) for p in processors), "SDPA by default"


def test_loras_apply_to_a_fused_unet_and_it_is_fused_again_afterwards(
    tiny_settings: Settings, model_cache: ModelCache, fast_cache: ModelCache
) -> None:
    with_lora = small_request(loras=(LoraSpec("lora-a", 1.0),))
    without = generate(small_request(), fast_cache, tiny_settings).images

    fast = generate(with_lora, fast_cache, tiny_settings).images
    plain = generate(with_lora, model_cache, tiny_settings).images

    assert _max_diff(fast, plain) <= PIXEL_TOLERANCE
    assert _max_diff(fast, without) > 10, "the LoRA changed the image"
    (pipe,) = fast_cache.get(resolve_model(Operation.IMG2IMG, None, tiny_settings))[0].pipelines
    assert qkv_fused(pipe.unet)
    again = generate(small_request(), fast_cache, tiny_settings).images
    assert [image.tobytes() for image in again] == [image.tobytes() for image in without]


def test_attention_left_on_the_classic_processor_is_moved_to_sdpa() -> None:
    unet: Any = diffusers_untyped.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    unet.set_attn_processor(AttnProcessor())

    ensure_sdpa(unet)

    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())


def test_the_compile_cache_goes_where_the_settings_say(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    use_compile_cache(tmp_path / "compile")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "compile" / "triton")
    assert (tmp_path / "compile").is_dir()


@pytest.mark.parametrize("operation", [Operation.IMG2IMG, Operation.PIX2PIX])
def test_after_the_warm_up_no_job_compiles_the_unet_again(
    operation: str, tiny_settings: Settings
) -> None:
    """One compiled graph serves the warm-up and jobs of other batch and output sizes: the
    warm-up passes the UNet what a job's call passes (Dynamo's own backend: what is counted is
    tracing, which is what a recompilation costs first)."""
    from torch._dynamo.utils import counters

    cache = ModelCache(device="cpu")
    (pipeline,) = cache.get(resolve_model(operation, None, tiny_settings))[0].pipelines
    torch._dynamo.reset()
    counters.clear()
    pipeline.unet.compile(backend="eager")
    try:
        warm_up_pipeline(pipeline)
        assert counters["stats"]["unique_graphs"] == 1
        for side, samples in ((512, 3), (768, 2), (512, 1)):
            image = Image.new("RGB", (side, side), (40, 90, 200))
            request = small_request(
                operation, images=(image,), width=side, height=side, steps=2, seeds=(0,) * samples
            )
            generate(request, cache, tiny_settings)
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()


# --- memory: batch sizing and the cache budget -------------------------------------------------

SPEC = ModelSpec(Operation.IMG2IMG, ())


def test_batch_size_follows_measured_memory_and_out_of_memory_errors() -> None:
    profile, key = MemoryProfile(), ShapeKey(SPEC, 512, 512)
    assert profile.samples_that_fit(key, free_bytes=10_000, cap=16) == 16  # nothing measured

    profile.record(key, samples=4, peak_bytes=4_000)
    assert profile.samples_that_fit(key, free_bytes=10_000, cap=16) == 10
    assert profile.samples_that_fit(key, free_bytes=10_000, cap=8) == 8
    assert profile.samples_that_fit(key, free_bytes=None, cap=8) == 8  # the CPU
    assert profile.samples_that_fit(key, free_bytes=10, cap=8) == 1  # always at least one

    profile.record_oom(key, samples=6)
    assert profile.samples_that_fit(key, free_bytes=10_000, cap=16) == 5
    assert profile.samples_that_fit(ShapeKey(SPEC, 768, 768), 10_000, cap=16) == 16
    assert profile.reserve_bytes(SPEC) == 4_000


def test_the_cache_budget_keeps_room_for_measured_activations(tiny_settings: Settings) -> None:
    first = resolve_model(Operation.IMG2IMG, None, tiny_settings)
    second = resolve_model(Operation.PIX2PIX, None, tiny_settings)
    probe = ModelCache(device="cpu")
    probe.get(first)
    first_bytes = probe.resident_bytes
    probe.get(second)
    budget = probe.resident_bytes + 1_000  # both models fit, with a little room

    roomy = ModelCache(device="cpu", max_bytes=budget)
    roomy.get(first)
    roomy.get(second)
    assert first in roomy
    assert second in roomy

    tight = ModelCache(device="cpu", max_bytes=budget)
    tight.get(first)
    # The second model's batches were measured to need as much as the first model's weights.
    tight.memory.record(ShapeKey(second, 64, 64), samples=2, peak_bytes=first_bytes)
    tight.get(second)
    assert first not in tight
    assert second in tight
