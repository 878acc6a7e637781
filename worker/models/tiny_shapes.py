"""The tiny modules that the tiny pipelines (`worker.models.tiny`) and the tiny add-ons
(`worker.models.tiny_addons`) share, at toy size, and how a tiny thing is saved.

A LoRA adapts the very UNet or transformer that the pipeline it loads into holds, so both build
them here: the shapes (widths, blocks, conditioning) and the seeding (`seeded`: every build is
identical) cannot drift apart. Saves are atomic (`build_once`, `write_once`): several processes
may build the same thing at once; each writes its own temporary copy beside the target and
renames it into place, and the loser of the race deletes its copy.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import diffusers
import torch
from safetensors.torch import save_file

from darkroom.limits import MAX_CLIP_SKIP

#: SDXL's UNet takes the pooled text embedding and six size numbers, each embedded in this width.
SDXL_TIME_EMBED = 8
#: The tiny SDXL's second (bigG stand-in) encoder is wider than the first, as the real one is:
#: single-file loading tells the two apart by their widths.
SDXL_G_HIDDEN = 40
# Layers of the SD text encoders: clip_skip goes up to 8 and must pick a real layer.
SD_TEXT_LAYERS = MAX_CLIP_SKIP
HIDDEN = 32  # text/image embedding width shared by every tiny encoder

T = TypeVar("T")

# diffusers wraps its constructors in an untyped decorator: treat the library as untyped here.
_diffusers: Any = diffusers


def build_once(target: Path, build: Callable[[Path], Any]) -> None:
    """Save `build(workdir)` to `target` atomically; do nothing if `target` already exists."""
    if target.exists():
        return
    staging = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}")
    try:
        build(staging / "tokenizer-source").save_pretrained(staging / "pipeline")
        os.rename(staging / "pipeline", target)
    except OSError:
        # Another process renamed its copy into place first: theirs is identical to ours.
        if not target.exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def seeded(factory: Callable[[], T], seed: int = 0) -> T:
    """Call `factory` under a fixed seed without disturbing the process's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def vae(**options: Any) -> Any:
    """An AutoencoderKL with four blocks, so it downsamples by 8 like SD's real VAE; `options`
    are a family's departures from SD's VAE config."""
    return _diffusers.AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        **options,
    )


def toy_unet(**options: Any) -> Any:
    """The two-block toy UNet that SD's and SDXL's shapes share; `options` make it one of them."""
    return _diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **options,
    )


def sd_unet(in_channels: int) -> Any:
    """SD's UNet shape at toy size; InstructPix2Pix adds the image latents as 4 more channels."""
    return toy_unet(in_channels=in_channels, cross_attention_dim=HIDDEN, attention_head_dim=8)


def sdxl_unet() -> Any:
    """SDXL's UNet shape at toy size (diffusers' own SDXL tests): conditioned on both encoders'
    joined hidden states and on "text_time", the pooled embedding beside the size numbers."""
    return toy_unet(
        in_channels=4,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED + SDXL_G_HIDDEN,
        cross_attention_dim=HIDDEN + SDXL_G_HIDDEN,
    )


def flux_transformer(
    guidance_embeds: bool = True,
    heads: int = 2,
    head_dim: int = 16,
    rope_axes: tuple[int, int, int] = (4, 4, 8),
) -> Any:
    """Flux.1-dev's transformer shape at toy size (diffusers' own Flux tests): 2x2 latent
    patches packed into 16 channels, one double and one single block, embedded guidance
    (schnell's shape has none). `heads` x `head_dim` is its width (the RoPE axes sum to
    `head_dim`): Flux.1's own is 24 x 128, with axes 16/56/56."""
    return _diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=HIDDEN,
        pooled_projection_dim=HIDDEN,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=list(rope_axes),
    )


def write_once(target: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save `tensors` to the safetensors file `target` atomically, unless it exists."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}")
    save_file(tensors, str(staging))
    os.replace(staging, target)
