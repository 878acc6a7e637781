"""Tiny, randomly initialised models of the real pipeline classes, for tests and the "tiny" preset.

Weights can never be downloaded in tests, so `ensure_tiny_models` builds each pipeline in code
(seeded before every component, so every build is identical) and saves it with `save_pretrained`:
the worker then loads it through the same `from_pretrained` path as real weights. The VAE and the
MoVQ downsample by 8 like the real ones, which keeps a 512x512 request to a few seconds on a CPU.

Several processes may call `ensure_tiny_models` at once: each builds into its own temporary folder
beside the target and renames it into place; the loser of the race deletes its copy.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import diffusers
import torch
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

SD_IMG2IMG = "sd-img2img"
INSTRUCT_PIX2PIX = "instruct-pix2pix"
KANDINSKY_PRIOR = "kandinsky-prior"
KANDINSKY_DECODER = "kandinsky-decoder"

_HIDDEN = 32  # text/image embedding width shared by every tiny encoder
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# Stable Diffusion 1.5's noise schedule, shared by its img2img and InstructPix2Pix schedulers.
_SD_SCHEDULE: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
}

T = TypeVar("T")

# diffusers wraps its constructors in an untyped decorator: treat the library as untyped here.
_diffusers: Any = diffusers


def ensure_tiny_models(root: Path) -> None:
    """Build every tiny pipeline under `root/<name>/` unless it is already there."""
    builders: dict[str, Callable[[Path], Any]] = {
        SD_IMG2IMG: _sd_img2img,
        INSTRUCT_PIX2PIX: _instruct_pix2pix,
        KANDINSKY_PRIOR: _kandinsky_prior,
        KANDINSKY_DECODER: _kandinsky_decoder,
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, build in builders.items():
        _build_once(root / name, build)


def _build_once(target: Path, build: Callable[[Path], Any]) -> None:
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


def _seeded(factory: Callable[[], T], seed: int = 0) -> T:
    """Call `factory` under a fixed seed without disturbing the process's global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def _byte_chars() -> list[str]:
    """The 256 printable characters that byte-level BPE uses to stand for the 256 bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [byte for byte in range(256) if byte not in printable]
    return [chr(code) for code in printable] + [chr(256 + i) for i in range(len(others))]


def _tokenizer(workdir: Path) -> Any:
    """A character-level CLIP tokenizer: every byte is a token, with no merges."""
    chars = _byte_chars()
    tokens = [*chars, *(char + "</w>" for char in chars), "<|startoftext|>", "<|endoftext|>"]
    workdir.mkdir(parents=True, exist_ok=True)
    vocab, merges = workdir / "vocab.json", workdir / "merges.txt"
    vocab.write_text(json.dumps({token: i for i, token in enumerate(tokens)}), encoding="utf-8")
    merges.write_text("#version: 0.2\n", encoding="utf-8")
    # Without model_max_length the tokenizer pads to a huge default and overflows.
    return CLIPTokenizer(str(vocab), str(merges), model_max_length=77)


def _text_config() -> Any:
    """A two-layer CLIP text encoder over the tokenizer's 514 tokens."""
    return CLIPTextConfig(
        vocab_size=514,
        hidden_size=_HIDDEN,
        projection_dim=_HIDDEN,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
    )


def _vae() -> Any:
    """An AutoencoderKL with four blocks, so it downsamples by 8 like SD's real VAE."""
    return _diffusers.AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
    )


def _sd_unet(in_channels: int) -> Any:
    """SD's UNet shape at toy size; InstructPix2Pix adds the image latents as 4 more channels."""
    return _diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=_HIDDEN,
        attention_head_dim=8,
    )


def _sd_components(workdir: Path, unet_in_channels: int) -> dict[str, Any]:
    """The modules shared in shape by the img2img and InstructPix2Pix pipelines."""
    return {
        "unet": _seeded(lambda: _sd_unet(unet_in_channels)),
        "vae": _seeded(_vae),
        "text_encoder": _seeded(lambda: CLIPTextModel(_text_config())),
        "tokenizer": _tokenizer(workdir),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def _sd_img2img(workdir: Path) -> Any:
    """Stable Diffusion 1.5 img2img, with SD 1.5's PNDM scheduler config."""
    scheduler = _diffusers.PNDMScheduler(
        **_SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False
    )
    return _diffusers.StableDiffusionImg2ImgPipeline(
        scheduler=scheduler, **_sd_components(workdir, unet_in_channels=4)
    )


def _instruct_pix2pix(workdir: Path) -> Any:
    """InstructPix2Pix, with the Euler ancestral scheduler that timbrooks/instruct-pix2pix uses."""
    scheduler = _diffusers.EulerAncestralDiscreteScheduler(
        **_SD_SCHEDULE, prediction_type="epsilon"
    )
    return _diffusers.StableDiffusionInstructPix2PixPipeline(
        scheduler=scheduler, **_sd_components(workdir, unet_in_channels=8)
    )


def _prior_transformer() -> Any:
    """A one-layer unCLIP prior; clip_std starts at 0, which would map every output to 0."""
    prior = _diffusers.PriorTransformer(
        num_attention_heads=2, attention_head_dim=12, embedding_dim=_HIDDEN, num_layers=1
    )
    with torch.no_grad():
        prior.clip_std.fill_(1.0)
    return prior


def _image_encoder() -> Any:
    """A CLIP vision tower on 32x32 inputs in 8x8 patches."""
    config = CLIPVisionConfig(
        hidden_size=_HIDDEN,
        projection_dim=_HIDDEN,
        image_size=32,
        patch_size=8,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
    )
    return CLIPVisionModelWithProjection(config)


def _kandinsky_prior(workdir: Path) -> Any:
    """Kandinsky 2.2's prior: text and images to CLIP image embeddings."""
    return _diffusers.KandinskyV22PriorPipeline(
        prior=_seeded(_prior_transformer),
        image_encoder=_seeded(_image_encoder),
        text_encoder=_seeded(lambda: CLIPTextModelWithProjection(_text_config())),
        tokenizer=_tokenizer(workdir),
        # Real prior settings (UnCLIP predicting the sample); the processor matches the encoder.
        scheduler=_diffusers.UnCLIPScheduler(
            variance_type="fixed_small_log",
            prediction_type="sample",
            clip_sample=True,
            clip_sample_range=10.0,
        ),
        image_processor=CLIPImageProcessor(
            size=32, crop_size=32, resample=3, image_mean=_CLIP_MEAN, image_std=_CLIP_STD
        ),
    )


def _decoder_unet() -> Any:
    """Kandinsky 2.2's UNet shape: conditioned on an image embedding, not on text."""
    return _diffusers.UNet2DConditionModel(
        in_channels=4,
        out_channels=8,  # predicts mean and variance
        addition_embed_type="image",
        encoder_hid_dim=_HIDDEN,
        encoder_hid_dim_type="image_proj",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        # Narrower than the SD UNet: this one runs every step at the full latent size.
        block_out_channels=(16, 32),
        norm_num_groups=8,
        layers_per_block=1,
        cross_attention_dim=_HIDDEN,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
    )


def _movq() -> Any:
    """A MoVQ with four blocks, so it downsamples by 8 like the real decoder's.

    Its spatial norm layers hard-code 32 groups, hence 32 channels everywhere.
    """
    return _diffusers.VQModel(
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_type="spatial",
        num_vq_embeddings=12,
        vq_embed_dim=4,
    )


def _kandinsky_decoder(workdir: Path) -> Any:
    """Kandinsky 2.2's decoder: an image embedding to pixels, with its DDPM scheduler config."""
    scheduler = _diffusers.DDPMScheduler(
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        steps_offset=1,
    )
    return _diffusers.KandinskyV22Pipeline(
        unet=_seeded(_decoder_unet), scheduler=scheduler, movq=_seeded(_movq)
    )
