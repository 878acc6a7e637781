"""The GPU fast path: what the model cache does to a pipeline after loading it.

- dtype: `DARKROOM_DTYPE` (auto: float16 on CUDA, float32 on the CPU, where half precision is
  slow or missing). bfloat16 is as fast as float16 on Ampere and later and has no overflow.
- SDPA: diffusers uses `F.scaled_dot_product_attention` (AttnProcessor2_0) by default on torch 2;
  any attention still on the classic processor is switched to it (`ensure_sdpa`).
- channels_last (CUDA): the UNet's and VAE's convolutions run on NHWC tensors, which cuDNN's
  tensor-core kernels prefer; numerically the same up to summation order.
- fused QKV (CUDA): the UNet's and VAE's self-attention projections become one matmul (key and
  value for cross-attention). The unfused layers stay, because LoRA adapters attach to them:
  `unfused_qkv` switches back to them while a request's LoRAs are loaded.
- torch.compile (CUDA, `DARKROOM_COMPILE=unet`): each Stable Diffusion UNet is compiled in place
  and warmed up at load (one pipeline call with every dimension dynamic, so that one compiled
  graph serves every batch and output size from the first job on), with Inductor's caches
  under `DARKROOM_COMPILE_CACHE_DIR` so that a restarted worker reuses the compiled kernels,
  and a single-file "mega-cache" beside them (`torch.compiler.save_cache_artifacts`) that a
  fresh machine can preload.

On the CPU nothing but the dtype applies by default, so tests run the plain modules in fp32.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models import attention_processor
from PIL import Image

from darkroom.settings import Settings

# diffusers' processor classes are untyped: treat them as such.
AttnProcessor: Any = attention_processor.AttnProcessor
AttnProcessor2_0: Any = attention_processor.AttnProcessor2_0
FusedAttnProcessor2_0: Any = attention_processor.FusedAttnProcessor2_0

log = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: Output size the compiled UNet is warmed up at: Stable Diffusion 1.5's native 512x512.
WARMUP_SIZE = 512
MEGA_CACHE_FILE = "mega-cache.bin"


@dataclass(frozen=True)
class FastPath:
    """The optimisations applied to every pipeline a model cache loads."""

    device: str
    dtype: torch.dtype
    channels_last: bool = False
    fuse_qkv: bool = False
    compile_unet: bool = False
    compile_cache_dir: Path | None = None

    @classmethod
    def plain(cls, device: str) -> FastPath:
        """No optimisation beyond the device's default dtype."""
        return cls(device=device, dtype=default_dtype(device))


def default_dtype(device: str) -> torch.dtype:
    """float16 on CUDA, float32 elsewhere."""
    return torch.float16 if device == "cuda" else torch.float32


def fast_path_for(settings: Settings, device: str) -> FastPath:
    """The fast path the settings ask for, limited to what `device` gains from."""
    dtype = default_dtype(device) if settings.dtype == "auto" else _DTYPES[settings.dtype]
    cuda = device == "cuda"
    compile_unet = cuda and settings.compile == "unet"
    if settings.compile != "off" and not cuda:
        log.warning(
            "DARKROOM_COMPILE=%s applies on CUDA only; running uncompiled", settings.compile
        )
    cache_dir = settings.compile_cache_dir or settings.data_dir / "compile-cache"
    return FastPath(
        device=device,
        dtype=dtype,
        channels_last=cuda and settings.fast_path,
        fuse_qkv=cuda and settings.fast_path,
        compile_unet=compile_unet,
        compile_cache_dir=cache_dir.resolve() if compile_unet else None,
    )


def apply_fast_path(pipeline: Any, fast: FastPath) -> None:
    """Optimise a loaded pipeline in place (see the module docstring)."""
    for name in ("unet", "vae", "movq", "prior"):
        module = getattr(pipeline, name, None)
        if isinstance(module, torch.nn.Module):
            prepare_module(module, fast)
    unet = getattr(pipeline, "unet", None)
    if fast.compile_unet and _is_text_conditioned_unet(unet):
        compile_and_warm_up(pipeline, fast)


def prepare_module(module: torch.nn.Module, fast: FastPath) -> None:
    """SDPA, channels_last and fused QKV for one UNet, VAE or prior, as `fast` says."""
    ensure_sdpa(module)
    if fast.channels_last and _has_convolutions(module):
        _to: Any = module.to  # torch's stubs omit the memory_format keyword
        _to(memory_format=torch.channels_last)
    if fast.fuse_qkv:
        fuse_qkv(module)


def ensure_sdpa(module: Any) -> None:
    """Switch any attention still on the classic processor to SDPA (AttnProcessor2_0)."""
    processors = getattr(module, "attn_processors", None)
    if not processors:
        return
    if any(type(processor) is AttnProcessor for processor in processors.values()):
        module.set_attn_processor(
            {
                name: AttnProcessor2_0() if type(processor) is AttnProcessor else processor
                for name, processor in processors.items()
            }
        )


def fuse_qkv(module: Any) -> bool:
    """Fuse the QKV projections where diffusers can; False where it cannot (added KV)."""
    processors = getattr(module, "attn_processors", None)
    if not processors or not hasattr(module, "fuse_qkv_projections"):
        return False
    if any(type(p) not in (AttnProcessor2_0, FusedAttnProcessor2_0) for p in processors.values()):
        return False  # Kandinsky's added-KV attention and custom processors stay as they are
    module.fuse_qkv_projections()
    return True


def qkv_fused(module: Any) -> bool:
    """Whether any attention of `module` runs on fused projections."""
    processors = getattr(module, "attn_processors", None) or {}
    return any(isinstance(processor, FusedAttnProcessor2_0) for processor in processors.values())


@contextmanager
def unfused_qkv(pipeline: Any) -> Iterator[None]:
    """Run the block on the UNet's separate projections (where LoRA layers attach), then fuse
    again from their weights, which LoRA leaves untouched (adapters are never merged)."""
    unet = getattr(pipeline, "unet", None)
    if unet is None or not qkv_fused(unet):
        yield
        return
    unet.unfuse_qkv_projections()
    try:
        yield
    finally:
        unet.fuse_qkv_projections()


def compile_and_warm_up(pipeline: Any, fast: FastPath) -> None:
    """Compile the UNet in place with a persistent cache and warm it up (`warm_up_pipeline`)."""
    if fast.compile_cache_dir is not None:
        use_compile_cache(fast.compile_cache_dir)
    pipeline.unet.compile()
    warm_up_pipeline(pipeline)
    if fast.compile_cache_dir is not None:
        save_mega_cache(fast.compile_cache_dir)


def use_compile_cache(cache_dir: Path) -> None:
    """Point Inductor's on-disk caches at `cache_dir` and preload its mega-cache, if any."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache_dir / "triton"))
    torch._inductor.config.fx_graph_cache = True
    mega = cache_dir / MEGA_CACHE_FILE
    if mega.is_file():
        torch.compiler.load_cache_artifacts(mega.read_bytes())
        log.info("loaded torch.compile artifacts from %s", mega)


def save_mega_cache(cache_dir: Path) -> None:
    """Write every compile artifact of this process to one file, atomically."""
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return
    data, _info = artifacts
    target = cache_dir / MEGA_CACHE_FILE
    staging = target.with_name(f".{target.name}.{os.getpid()}")
    staging.write_bytes(data)
    os.replace(staging, target)


@torch.no_grad()
def warm_up_pipeline(pipeline: Any) -> None:
    """Run the pipeline once at WARMUP_SIZE, one sample and one step, with every dimension
    dynamic, so that the compiled UNet serves the batches and sizes of later jobs unchanged.

    The call goes through the pipeline itself because Dynamo guards on what its UNet call site
    passes: the timestep's dtype (the scheduler's), the latents' strides (NHWC after the VAE's
    encoder), the keyword constants. A UNet warmed up with inputs made here instead compiled a
    graph that no job ever used, and the first job compiled the UNet again. With dimensions
    dynamic from the first call, one compilation covers every batch and output size; otherwise
    Dynamo compiles a static graph first and a dynamic one when a dimension changes.
    """
    image = Image.new("RGB", (WARMUP_SIZE, WARMUP_SIZE), (127, 127, 127))
    options: dict[str, Any] = {}
    if "strength" in inspect.signature(pipeline.__call__).parameters:
        options["strength"] = 1.0  # img2img: the one step runs
    with torch._dynamo.config.patch(assume_static_by_default=False):
        pipeline(prompt="", image=image, num_inference_steps=1, output_type="latent", **options)


def _is_text_conditioned_unet(unet: Any) -> bool:
    """A Stable Diffusion UNet (text cross-attention, no added embeddings): what warm-up feeds."""
    config = getattr(unet, "config", None)
    return config is not None and getattr(config, "addition_embed_type", None) is None


def _has_convolutions(module: torch.nn.Module) -> bool:
    return any(isinstance(layer, torch.nn.Conv2d) for layer in module.modules())
