"""The models of the GPU benchmark: published architectures with random weights, built in code.

`full` is the real thing: Stable Diffusion 1.5's UNet (860M parameters), VAE and CLIP ViT-L/14
text encoder, InstructPix2Pix (the same UNet with 8 input channels), and Kandinsky 2.2's prior
(a 20-layer prior transformer, CLIP ViT-bigG/14 image and text towers) and decoder (a 1.25B
UNet and MoVQ), from their published configs. Nothing is downloaded; the weights are seeded
random numbers, which cost the same to compute with as trained ones. `reduced` and `tiny` keep
the block structure at a fraction of the width, so that the benchmark runs on a CPU.

The tokenizers are the tiny preset's character-level CLIP tokenizer (no vocabulary download);
the text encoders keep CLIP's 49408-entry embedding table, so their cost is unchanged.

FLOPs are counted per component on the meta device (`flops_per_image`), so the count is the
same whichever device runs the benchmark (the CPU's SDPA kernel is invisible to
FlopCounterMode) and costs no compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import diffusers
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from darkroom.identities import Family, TinyModel
from darkroom.limits import T5_TOKENS
from worker.models.tiny import ensure_tiny_models

_diffusers: Any = diffusers

_SD_SCHEDULE: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
}
#: The tiny tokenizer's special ids; the text encoders are told about them.
_BOS, _EOS = 512, 513
CLIP_VOCAB = 49408
TOKENS = 77


@dataclass(frozen=True)
class Preset:
    """Architectures, sizes and run lengths of one benchmark size."""

    name: str
    sd_unet: dict[str, Any]
    sd_vae: dict[str, Any]
    sd_text: dict[str, Any]  # CLIPTextConfig fields
    prior: dict[str, Any]  # PriorTransformer fields
    prior_text: dict[str, Any]
    prior_vision: dict[str, Any]
    decoder_unet: dict[str, Any]
    movq: dict[str, Any]
    sd_size: int  # img2img and pix2pix output side
    mixer_size: int
    steps: int
    mixer_steps: int
    requests: int  # img2img and pix2pix requests per measurement
    mixer_requests: int
    batch_sizes: tuple[int, ...]
    strength: float = 0.7
    vision_size: int = 224
    notes: list[str] = field(default_factory=list)


def _sd_unet(widths: tuple[int, ...], layers: int, cross: int, head_dim: int) -> dict[str, Any]:
    """Stable Diffusion's UNet layout (attention in all but the lowest level) at `widths`."""
    levels = len(widths)
    return {
        "block_out_channels": widths,
        "layers_per_block": layers,
        "cross_attention_dim": cross,
        "attention_head_dim": head_dim,
        "down_block_types": ("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        "norm_num_groups": min(32, widths[0]),
        "sample_size": 64,
    }


def _vae(widths: tuple[int, ...], layers: int) -> dict[str, Any]:
    """An AutoencoderKL with four blocks (downsampling by 8, like SD's)."""
    return {
        "block_out_channels": widths,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "latent_channels": 4,
        "layers_per_block": layers,
        "norm_num_groups": min(32, widths[0]),
    }


def _text(hidden: int, layers: int, heads: int, act: str = "quick_gelu") -> dict[str, Any]:
    return {
        "vocab_size": CLIP_VOCAB,
        "hidden_size": hidden,
        "intermediate_size": hidden * 4,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": TOKENS,
        "projection_dim": hidden,
        "hidden_act": act,
        "bos_token_id": _BOS,
        "eos_token_id": _EOS,
        "pad_token_id": _EOS,
    }


def _decoder_unet(
    widths: tuple[int, ...], layers: int, head_dim: int, embed: int
) -> dict[str, Any]:
    """Kandinsky 2.2's decoder UNet layout: image-embedding conditioned, added-KV attention."""
    levels = len(widths)
    return {
        "in_channels": 4,
        "out_channels": 8,
        "addition_embed_type": "image",
        "encoder_hid_dim": embed,
        "encoder_hid_dim_type": "image_proj",
        "cross_attention_dim": widths[1],
        "attention_head_dim": head_dim,
        "block_out_channels": widths,
        "layers_per_block": layers,
        "down_block_types": ("ResnetDownsampleBlock2D",)
        + ("SimpleCrossAttnDownBlock2D",) * (levels - 1),
        "up_block_types": ("SimpleCrossAttnUpBlock2D",) * (levels - 1) + ("ResnetUpsampleBlock2D",),
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
        "resnet_time_scale_shift": "scale_shift",
        "norm_num_groups": min(32, widths[0]),
    }


def _movq(widths: tuple[int, ...], layers: int) -> dict[str, Any]:
    """Kandinsky's MoVQ: four blocks (downsampling by 8), spatial norm in the decoder."""
    return {
        "block_out_channels": widths,
        "down_block_types": ("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
        "up_block_types": ("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
        "latent_channels": 4,
        "layers_per_block": layers,
        "norm_type": "spatial",
        "num_vq_embeddings": 16384,
        "vq_embed_dim": 4,
    }


def _vision(
    hidden: int, layers: int, heads: int, projection: int, size: int, intermediate: int
) -> dict[str, Any]:
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "projection_dim": projection,
        "image_size": size,
        "patch_size": 14,
        "hidden_act": "gelu",
    }


def _prior(heads: int, head_dim: int, layers: int, embed: int) -> dict[str, Any]:
    return {
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "num_layers": layers,
        "embedding_dim": embed,
        "num_embeddings": TOKENS,
        "additional_embeddings": 4,
    }


PRESETS: dict[str, Preset] = {
    # Stable Diffusion 1.5, InstructPix2Pix and Kandinsky 2.2 as published.
    "full": Preset(
        name="full",
        sd_unet=_sd_unet((320, 640, 1280, 1280), layers=2, cross=768, head_dim=8),
        sd_vae=_vae((128, 256, 512, 512), layers=2),
        sd_text=_text(768, layers=12, heads=12),
        prior=_prior(heads=32, head_dim=64, layers=20, embed=1280),
        prior_text=_text(1280, layers=32, heads=20, act="gelu"),
        prior_vision=_vision(
            1664, layers=48, heads=16, projection=1280, size=224, intermediate=8192
        ),
        decoder_unet=_decoder_unet((384, 768, 1152, 1536), layers=3, head_dim=64, embed=1280),
        movq=_movq((128, 256, 256, 512), layers=2),
        sd_size=512,
        mixer_size=768,
        steps=20,
        mixer_steps=25,
        requests=32,
        mixer_requests=4,
        batch_sizes=(1, 4, 8, 16, 32),
    ),
    # The same block structure at a quarter to a fifth of the width: minutes on a CPU.
    "reduced": Preset(
        name="reduced",
        sd_unet=_sd_unet((64, 128, 256, 256), layers=1, cross=256, head_dim=8),
        sd_vae=_vae((32, 64, 128, 128), layers=1),
        sd_text=_text(256, layers=4, heads=4),
        prior=_prior(heads=4, head_dim=32, layers=4, embed=128),
        prior_text=_text(128, layers=2, heads=4, act="gelu"),
        prior_vision=_vision(128, layers=2, heads=4, projection=128, size=112, intermediate=512),
        decoder_unet=_decoder_unet((64, 128), layers=1, head_dim=32, embed=128),
        movq=_movq((32, 32, 32, 64), layers=1),
        sd_size=256,
        mixer_size=256,
        steps=10,
        mixer_steps=5,
        requests=4,
        mixer_requests=2,
        batch_sizes=(1, 4),
        vision_size=112,
    ),
    # The tiny preset's widths: seconds, for the test that keeps the benchmark from rotting.
    "tiny": Preset(
        name="tiny",
        sd_unet=_sd_unet((32, 64), layers=1, cross=32, head_dim=8),
        sd_vae=_vae((8, 16, 16, 16), layers=1),
        sd_text=_text(32, layers=2, heads=4),
        prior=_prior(heads=2, head_dim=16, layers=1, embed=32),
        prior_text=_text(32, layers=1, heads=4, act="gelu"),
        prior_vision=_vision(32, layers=1, heads=4, projection=32, size=28, intermediate=128),
        decoder_unet=_decoder_unet((16, 32), layers=1, head_dim=8, embed=32),
        movq=_movq((32, 32, 32, 32), layers=1),
        sd_size=64,
        mixer_size=64,
        steps=3,
        mixer_steps=2,
        requests=3,
        mixer_requests=1,
        batch_sizes=(1, 3),
        vision_size=28,
    ),
}


@lru_cache(maxsize=2)
def tokenizer(work_dir: Path) -> Any:
    """The tiny preset's character-level CLIP tokenizer, built under `work_dir` once."""
    ensure_tiny_models(work_dir)
    return CLIPTokenizer.from_pretrained(work_dir / TinyModel.INSTRUCT_PIX2PIX / "tokenizer")


def _seeded(factory: Any, seed: int, device: str) -> Any:
    """Build a module directly on `device` (fast random init) from a fixed seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if device == "cuda":
            torch.cuda.manual_seed(seed)
        with torch.device(device):
            return factory()


def sd_pipeline(preset: Preset, kind: str, work_dir: Path, device: str, dtype: torch.dtype) -> Any:
    """StableDiffusionImg2ImgPipeline (`kind` img2img) or InstructPix2Pix (`pix2pix`)."""
    pix2pix = kind == "pix2pix"
    unet_config = {**preset.sd_unet, "in_channels": 8 if pix2pix else 4, "out_channels": 4}
    components: dict[str, Any] = {
        "unet": _seeded(lambda: _diffusers.UNet2DConditionModel(**unet_config), 1, device),
        "vae": _seeded(lambda: _diffusers.AutoencoderKL(**preset.sd_vae), 2, device),
        "text_encoder": _seeded(lambda: CLIPTextModel(CLIPTextConfig(**preset.sd_text)), 3, device),
        "tokenizer": tokenizer(work_dir),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    if pix2pix:
        scheduler = _diffusers.EulerAncestralDiscreteScheduler(**_SD_SCHEDULE)
        pipeline_class = _diffusers.StableDiffusionInstructPix2PixPipeline
    else:
        scheduler = _diffusers.PNDMScheduler(
            **_SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False
        )
        pipeline_class = _diffusers.StableDiffusionImg2ImgPipeline
    pipe = pipeline_class(scheduler=_as_loaded(scheduler, work_dir / kind), **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def mixer_pipelines(
    preset: Preset, work_dir: Path, device: str, dtype: torch.dtype
) -> tuple[Any, Any]:
    """Kandinsky 2.2's prior and decoder pipelines."""

    def prior_transformer() -> Any:
        prior = _diffusers.PriorTransformer(**preset.prior)
        with torch.no_grad():
            prior.clip_std.fill_(1.0)  # starts at 0, which would map every output to 0
        return prior

    side = preset.vision_size
    prior = _diffusers.KandinskyV22PriorPipeline(
        prior=_seeded(prior_transformer, 4, device),
        image_encoder=_seeded(
            lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**preset.prior_vision)),
            5,
            device,
        ),
        text_encoder=_seeded(
            lambda: CLIPTextModelWithProjection(CLIPTextConfig(**preset.prior_text)), 6, device
        ),
        tokenizer=tokenizer(work_dir),
        scheduler=_diffusers.UnCLIPScheduler(
            variance_type="fixed_small_log",
            prediction_type="sample",
            clip_sample=True,
            clip_sample_range=10.0,
        ),
        image_processor=CLIPImageProcessor(size=side, crop_size=side, resample=3),
    )
    decoder = _diffusers.KandinskyV22Pipeline(
        unet=_seeded(lambda: _diffusers.UNet2DConditionModel(**preset.decoder_unet), 7, device),
        scheduler=_diffusers.DDPMScheduler(
            beta_schedule="linear",
            beta_start=0.00085,
            beta_end=0.012,
            clip_sample=False,
            steps_offset=1,
        ),
        movq=_seeded(lambda: _diffusers.VQModel(**preset.movq), 8, device),
    )
    for pipe in (prior, decoder):
        pipe.set_progress_bar_config(disable=True)
    return prior.to(device=device, dtype=dtype), decoder.to(device=device, dtype=dtype)


def _as_loaded(scheduler: Any, folder: Path) -> Any:
    """`scheduler` saved and loaded again, so that its config names its class as a loaded
    model's does (the worker builds each request's scheduler from that config)."""
    scheduler.save_config(folder)
    return type(scheduler).from_pretrained(folder)


def _flops(module: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of one call of `module`, counted on the meta device."""
    with FlopCounterMode(display=False) as counter:
        module(*args, **kwargs)
    return int(counter.get_total_flops())


def _meta(factory: Any) -> Any:
    with torch.device("meta"):
        return factory()


def unet_step_flops(preset: Preset, kind: str) -> int:
    """FLOPs of one denoising step with classifier-free guidance (2 rows; pix2pix 3)."""
    rows, channels = (3, 8) if kind == "pix2pix" else (2, 4)
    config = {**preset.sd_unet, "in_channels": channels, "out_channels": 4}
    unet = _meta(lambda: _diffusers.UNet2DConditionModel(**config))
    side = preset.sd_size // 8
    sample = torch.empty(rows, channels, side, side, device="meta")
    hidden = torch.empty(rows, TOKENS, preset.sd_unet["cross_attention_dim"], device="meta")
    return _flops(unet, sample, torch.tensor(500, device="meta"), encoder_hidden_states=hidden)


def flops_per_image(preset: Preset, kind: str) -> int:
    """FLOPs of one image of `kind` with the preset's settings, component by component."""
    if kind == "img_mixer":
        return _mixer_flops(preset)
    vae = _meta(lambda: _diffusers.AutoencoderKL(**preset.sd_vae))
    text = _meta(lambda: CLIPTextModel(CLIPTextConfig(**preset.sd_text)))
    side = preset.sd_size
    steps = int(preset.steps * preset.strength) if kind == "img2img" else preset.steps
    ids = torch.zeros(2, TOKENS, dtype=torch.long, device="meta")  # prompt and negative
    pixels = torch.empty(1, 3, side, side, device="meta")
    latents = torch.empty(1, 4, side // 8, side // 8, device="meta")
    return (
        steps * unet_step_flops(preset, kind)
        + _flops(text, ids)
        + _flops(vae.encode, pixels)
        + _flops(vae.decode, latents)
    )


def _mixer_flops(preset: Preset) -> int:
    """Prior (text, one image, its denoising steps) and decoder (its steps, MoVQ decode)."""
    embed = preset.prior["embedding_dim"]
    prior = _meta(lambda: _diffusers.PriorTransformer(**preset.prior))
    text = _meta(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**preset.prior_text)))
    vision = _meta(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**preset.prior_vision)))
    unet = _meta(lambda: _diffusers.UNet2DConditionModel(**preset.decoder_unet))
    movq = _meta(lambda: _diffusers.VQModel(**preset.movq))
    side, vision_side = preset.mixer_size // 8, preset.vision_size
    prior_step = _flops(
        prior,
        torch.empty(2, embed, device="meta"),
        timestep=torch.tensor(500, device="meta"),
        proj_embedding=torch.empty(2, embed, device="meta"),
        encoder_hidden_states=torch.empty(2, TOKENS, embed, device="meta"),
        attention_mask=torch.ones(2, TOKENS, dtype=torch.bool, device="meta"),
    )
    image_embeds = torch.empty(2, embed, device="meta")
    decoder_step = _flops(
        unet,
        torch.empty(2, 4, side, side, device="meta"),
        torch.tensor(500, device="meta"),
        encoder_hidden_states=None,
        added_cond_kwargs={"image_embeds": image_embeds},
    )
    return (
        _flops(text, torch.zeros(2, TOKENS, dtype=torch.long, device="meta"))
        + _flops(vision, torch.empty(1, 3, vision_side, vision_side, device="meta"))
        + preset.mixer_steps * (prior_step + decoder_step)
        + _flops(movq.decode, torch.empty(1, 4, side, side, device="meta"), force_not_quantize=True)
    )


# --- SDXL and Flux.1 img2img ----------------------------------------------------------------

#: The operation names the benchmark reports for the other families' img2img.
FAMILY_OPERATIONS = {f"{Family.SDXL}_img2img": Family.SDXL, f"{Family.FLUX}_img2img": Family.FLUX}


@dataclass(frozen=True)
class FamilyPreset:
    """SDXL's and Flux's architectures, sizes and run lengths for one benchmark size."""

    sdxl_unet: dict[str, Any]
    sdxl_text_l: dict[str, Any]
    sdxl_text_g: dict[str, Any]
    flux_transformer: dict[str, Any]
    flux_t5: dict[str, Any]  # T5Config fields
    flux_text: dict[str, Any]
    vae_widths: tuple[int, ...]
    size: int
    steps: int
    requests: int
    batch_sizes: tuple[int, ...]
    strength: float = 0.7
    flux_guidance: float = 3.5


def _sdxl_unet(
    widths: tuple[int, ...],
    depths: tuple[int, ...],
    heads: tuple[int, ...],
    cross: int,
    pooled: int,
) -> dict[str, Any]:
    """SDXL's UNet layout: no attention at the top level, deeper transformers lower down."""
    time_embed = 256 if widths[0] >= 320 else 8
    return {
        "block_out_channels": widths,
        "layers_per_block": 2 if widths[0] >= 320 else 1,
        "transformer_layers_per_block": depths,
        "attention_head_dim": heads,
        "cross_attention_dim": cross,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_embed,
        "projection_class_embeddings_input_dim": 6 * time_embed + pooled,
        "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(widths) - 1),
        "up_block_types": ("CrossAttnUpBlock2D",) * (len(widths) - 1) + ("UpBlock2D",),
        "norm_num_groups": min(32, widths[0]),
        "sample_size": 128,
    }


def _flux(
    layers: int, single: int, heads: int, head_dim: int, joint: int, pooled: int
) -> dict[str, Any]:
    rope = (16, 56, 56) if head_dim == 128 else (head_dim // 4, head_dim // 4, head_dim // 2)
    return {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": layers,
        "num_single_layers": single,
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "joint_attention_dim": joint,
        "pooled_projection_dim": pooled,
        "guidance_embeds": True,
        "axes_dims_rope": rope,
    }


def _t5(d_model: int, layers: int, heads: int, d_ff: int) -> dict[str, Any]:
    return {
        "vocab_size": 32128,
        "d_model": d_model,
        "d_kv": 64 if d_model >= 1024 else d_model // heads,
        "d_ff": d_ff,
        "num_layers": layers,
        "num_heads": heads,
        "feed_forward_proj": "gated-gelu",
    }


FAMILY_PRESETS: dict[str, FamilyPreset] = {
    # SDXL base 1.0 and Flux.1-dev as published (Flux's T5 is T5-v1.1-XXL's encoder).
    "full": FamilyPreset(
        sdxl_unet=_sdxl_unet((320, 640, 1280), (1, 2, 10), (5, 10, 20), cross=2048, pooled=1280),
        sdxl_text_l=_text(768, layers=12, heads=12),
        sdxl_text_g=_text(1280, layers=32, heads=20, act="gelu"),
        flux_transformer=_flux(19, 38, heads=24, head_dim=128, joint=4096, pooled=768),
        flux_t5=_t5(4096, layers=24, heads=64, d_ff=10240),
        flux_text=_text(768, layers=12, heads=12),
        vae_widths=(128, 256, 512, 512),
        size=1024,
        steps=20,
        requests=8,
        batch_sizes=(1, 4, 8),
    ),
    "reduced": FamilyPreset(
        sdxl_unet=_sdxl_unet((64, 128, 256), (1, 1, 2), (2, 4, 8), cross=256, pooled=128),
        sdxl_text_l=_text(128, layers=2, heads=4),
        sdxl_text_g=_text(128, layers=2, heads=4, act="gelu"),
        flux_transformer=_flux(2, 4, heads=4, head_dim=32, joint=256, pooled=128),
        flux_t5=_t5(256, layers=2, heads=4, d_ff=512),
        flux_text=_text(128, layers=2, heads=4),
        vae_widths=(32, 64, 128, 128),
        size=256,
        steps=6,
        requests=2,
        batch_sizes=(1, 2),
    ),
    "tiny": FamilyPreset(
        sdxl_unet=_sdxl_unet((32, 64), (1, 2), (2, 4), cross=64, pooled=32),
        sdxl_text_l=_text(32, layers=2, heads=4),
        sdxl_text_g=_text(32, layers=2, heads=4, act="gelu"),
        flux_transformer=_flux(1, 1, heads=2, head_dim=16, joint=32, pooled=32),
        flux_t5=_t5(32, layers=1, heads=4, d_ff=37),
        flux_text=_text(32, layers=1, heads=4),
        vae_widths=(8, 16, 16, 16),
        size=64,
        steps=3,
        requests=2,
        batch_sizes=(1, 2),
    ),
}


def _family_vae(preset: FamilyPreset, family: str) -> dict[str, Any]:
    """SD's VAE shape; Flux's has 16 latent channels, no quant convs and a shift."""
    config = _vae(preset.vae_widths, layers=2 if preset.vae_widths[0] >= 128 else 1)
    if family == Family.FLUX:
        config |= {"latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}
        config |= {"shift_factor": 0.1159, "scaling_factor": 0.3611}
    return config


def family_pipeline(
    preset: FamilyPreset, family: str, work_dir: Path, device: str, dtype: torch.dtype
) -> Any:
    """StableDiffusionXLImg2ImgPipeline or FluxImg2ImgPipeline with seeded random weights."""
    from transformers import T5Config, T5EncoderModel

    from worker.models.tiny import _t5_tokenizer

    vae = _seeded(lambda: _diffusers.AutoencoderKL(**_family_vae(preset, family)), 9, device)
    if family == Family.SDXL:
        pipe = _diffusers.StableDiffusionXLImg2ImgPipeline(
            unet=_seeded(lambda: _diffusers.UNet2DConditionModel(**preset.sdxl_unet), 10, device),
            vae=vae,
            text_encoder=_seeded(
                lambda: CLIPTextModel(CLIPTextConfig(**preset.sdxl_text_l)), 11, device
            ),
            text_encoder_2=_seeded(
                lambda: CLIPTextModelWithProjection(CLIPTextConfig(**preset.sdxl_text_g)),
                12,
                device,
            ),
            tokenizer=tokenizer(work_dir),
            tokenizer_2=tokenizer(work_dir),
            scheduler=_as_loaded(
                _diffusers.EulerDiscreteScheduler(**_SD_SCHEDULE, timestep_spacing="leading"),
                work_dir / "sdxl",
            ),
            requires_aesthetics_score=False,
        )
    else:
        pipe = _diffusers.FluxImg2ImgPipeline(
            transformer=_seeded(
                lambda: _diffusers.FluxTransformer2DModel(**preset.flux_transformer), 13, device
            ),
            vae=vae,
            text_encoder=_seeded(
                lambda: CLIPTextModel(CLIPTextConfig(**preset.flux_text)), 14, device
            ),
            text_encoder_2=_seeded(lambda: T5EncoderModel(T5Config(**preset.flux_t5)), 15, device),
            tokenizer=tokenizer(work_dir),
            tokenizer_2=_t5_tokenizer(),
            scheduler=_as_loaded(
                _diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), work_dir / "flux"
            ),
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def family_flops_per_image(preset: FamilyPreset, family: str) -> int:
    """FLOPs of one img2img image of `family` at the preset's size, counted on the meta device."""
    side, steps = preset.size, int(preset.steps * preset.strength)
    vae = _meta(lambda: _diffusers.AutoencoderKL(**_family_vae(preset, family)))
    channels = 16 if family == Family.FLUX else 4
    pixels = torch.empty(1, 3, side, side, device="meta")
    latents = torch.empty(1, channels, side // 8, side // 8, device="meta")
    coding = _flops(vae.encode, pixels) + _flops(vae.decode, latents)
    if family == Family.SDXL:
        return steps * sdxl_step_flops(preset) + _sdxl_text_flops(preset) + coding
    return steps * flux_step_flops(preset) + _flux_text_flops(preset) + coding


def sdxl_step_flops(preset: FamilyPreset) -> int:
    """One SDXL UNet step with classifier-free guidance (2 rows)."""
    config = preset.sdxl_unet
    unet = _meta(lambda: _diffusers.UNet2DConditionModel(**config))
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    side = preset.size // 8
    return _flops(
        unet,
        torch.empty(2, 4, side, side, device="meta"),
        torch.tensor(500, device="meta"),
        encoder_hidden_states=torch.empty(2, TOKENS, config["cross_attention_dim"], device="meta"),
        added_cond_kwargs={
            "text_embeds": torch.empty(2, pooled, device="meta"),
            "time_ids": torch.empty(2, 6, device="meta"),
        },
    )


def flux_step_flops(preset: FamilyPreset) -> int:
    """One Flux transformer step: one row (guidance is embedded), 2x2-packed latent tokens."""
    config = preset.flux_transformer
    transformer = _meta(lambda: _diffusers.FluxTransformer2DModel(**config))
    tokens = (preset.size // 16) ** 2
    return _flops(
        transformer,
        hidden_states=torch.empty(1, tokens, config["in_channels"], device="meta"),
        encoder_hidden_states=torch.empty(
            1, T5_TOKENS, config["joint_attention_dim"], device="meta"
        ),
        pooled_projections=torch.empty(1, config["pooled_projection_dim"], device="meta"),
        timestep=torch.ones(1, device="meta"),
        guidance=torch.ones(1, device="meta"),
        img_ids=torch.zeros(tokens, 3, device="meta"),
        txt_ids=torch.zeros(T5_TOKENS, 3, device="meta"),
    )


def _sdxl_text_flops(preset: FamilyPreset) -> int:
    ids = torch.zeros(2, TOKENS, dtype=torch.long, device="meta")  # prompt and negative
    text_l = _meta(lambda: CLIPTextModel(CLIPTextConfig(**preset.sdxl_text_l)))
    text_g = _meta(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**preset.sdxl_text_g)))
    return _flops(text_l, ids) + _flops(text_g, ids)


def _flux_text_flops(preset: FamilyPreset) -> int:
    from transformers import T5Config, T5EncoderModel

    text = _meta(lambda: CLIPTextModel(CLIPTextConfig(**preset.flux_text)))
    t5 = _meta(lambda: T5EncoderModel(T5Config(**preset.flux_t5)))
    clip_ids = torch.zeros(1, TOKENS, dtype=torch.long, device="meta")
    t5_ids = torch.zeros(1, T5_TOKENS, dtype=torch.long, device="meta")
    return _flops(text, clip_ids) + _flops(t5, t5_ids)
