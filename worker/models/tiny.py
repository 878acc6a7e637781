"""Tiny, randomly initialised models of the real pipeline classes, for tests and the "tiny" preset.

Weights can never be downloaded in tests, so `ensure_tiny_models` builds each pipeline in code
(seeded before every component, so every build is identical) and saves it with `save_pretrained`:
the worker then loads it through the same `from_pretrained` path as real weights. The VAE and the
MoVQ downsample by 8 like the real ones, which keeps a 512x512 request to a few seconds on a CPU.

This module owns the pipelines (the preset's, the other families' and the variants that tests
install), their tokenizers and text encoders; the UNets, transformers and VAEs that add-ons share
with them are in `worker.models.tiny_shapes`, and the add-ons themselves (LoRAs, embeddings,
VAEs by id, single-file checkpoints) in `worker.models.tiny_addons`.

The two tiny safety checkers differ only in their concept thresholds: the checker flags an image
when a cosine similarity (always within [-1, 1]) exceeds a threshold, so thresholds of +2 never
flag and thresholds of -2 always do (see `darkroom.model_ids` for which one a request gets).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers import models as tokenizer_models
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from darkroom.identities import TinyModel
from worker.models import tiny_shapes as shapes

# benchmarks/lora_switch.py still builds its add-ons through this module; their home is
# `worker.models.tiny_addons` (drop these once that benchmark imports them from there).
from worker.models.tiny_addons import ensure_tiny_embedding as ensure_tiny_embedding
from worker.models.tiny_addons import ensure_tiny_lora as ensure_tiny_lora

# Tiny safety checkers' concept thresholds: a cosine similarity is never above 2 nor below -2.
_NEVER_FLAG, _ALWAYS_FLAG = 2.0, -2.0
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

# diffusers wraps its constructors in an untyped decorator: treat the library as untyped here.
_diffusers: Any = diffusers


def ensure_tiny_models(root: Path) -> None:
    """Build every tiny pipeline under `root/<name>/` unless it is already there."""
    builders: dict[str, Callable[[Path], Any]] = {
        TinyModel.SD_IMG2IMG: _sd_img2img,
        TinyModel.INSTRUCT_PIX2PIX: _instruct_pix2pix,
        TinyModel.KANDINSKY_PRIOR: _kandinsky_prior,
        TinyModel.KANDINSKY_DECODER: _kandinsky_decoder,
        TinyModel.SAFETY_CHECKER: lambda _workdir: _SafetyCheckerFolder(_NEVER_FLAG),
        TinyModel.SAFETY_CHECKER_ALWAYS: lambda _workdir: _SafetyCheckerFolder(_ALWAYS_FLAG),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, build in builders.items():
        shapes.build_once(root / name, build)


def ensure_tiny_family_model(root: Path, name: str) -> None:
    """Build the tiny model of another family (`TinyModel.SDXL_IMG2IMG`, ...) in `root/<name>/`."""
    builders: dict[str, Callable[[Path], Any]] = {
        TinyModel.SDXL_IMG2IMG: _sdxl_img2img,
        TinyModel.SD2_V_IMG2IMG: _sd2_v_img2img,
        TinyModel.FLUX_IMG2IMG: _flux_img2img,
    }
    if name not in builders:
        raise ValueError(f"No tiny model called {name!r}.")
    root.mkdir(parents=True, exist_ok=True)
    shapes.build_once(root / name, builders[name])


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


def _text_config(layers: int = 2, hidden: int = shapes.HIDDEN, **options: Any) -> Any:
    """A CLIP text encoder over the tokenizer's 514 tokens; `options` are an encoder's own
    departures (OpenCLIP's GELU)."""
    return CLIPTextConfig(
        vocab_size=514,
        hidden_size=hidden,
        projection_dim=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=layers,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        **options,
    )


def _sd_components(workdir: Path, unet_in_channels: int) -> dict[str, Any]:
    """The modules shared in shape by the img2img and InstructPix2Pix pipelines."""
    return {
        "unet": shapes.seeded(lambda: shapes.sd_unet(unet_in_channels)),
        "vae": shapes.seeded(shapes.vae),
        "text_encoder": shapes.seeded(lambda: CLIPTextModel(_text_config(shapes.SD_TEXT_LAYERS))),
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


def _sd2_v_img2img(workdir: Path) -> Any:
    """Stable Diffusion 2.x v-prediction (768-v shape): the scheduler config says so, which every
    scheduler a request names inherits. SD 2.x's own traits at toy size: an OpenCLIP (GELU) text
    encoder, linear attention projections and per-level head counts in the UNet."""
    scheduler = _diffusers.DDIMScheduler(
        **_SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, prediction_type="v_prediction"
    )
    components = _sd_components(workdir, unet_in_channels=4)
    components["unet"] = shapes.seeded(_sd2_unet, seed=2)
    components["text_encoder"] = shapes.seeded(
        lambda: CLIPTextModel(_text_config(shapes.SD_TEXT_LAYERS, hidden_act="gelu"))
    )
    return _diffusers.StableDiffusionImg2ImgPipeline(scheduler=scheduler, **components)


def _sd2_unet() -> Any:
    """SD 2.x's UNet shape at toy size: linear projections in and out of attention, the head
    count per level (SD 2.x: 5, 10, 20, 20), SD's cross-attention width."""
    return shapes.toy_unet(
        in_channels=4,
        cross_attention_dim=shapes.HIDDEN,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
    )


def _sdxl_components(workdir: Path) -> dict[str, Any]:
    """The tiny SDXL modules: CLIP-L and bigG stand-ins over the same character tokenizer."""
    return {
        "unet": shapes.seeded(shapes.sdxl_unet),
        "vae": shapes.seeded(shapes.vae),
        "text_encoder": shapes.seeded(lambda: CLIPTextModel(_text_config(shapes.SD_TEXT_LAYERS))),
        "text_encoder_2": shapes.seeded(
            lambda: CLIPTextModelWithProjection(
                _text_config(shapes.SD_TEXT_LAYERS, shapes.SDXL_G_HIDDEN)
            ),
            seed=1,
        ),
        "tokenizer": _tokenizer(workdir),
        "tokenizer_2": _tokenizer(workdir),
        "scheduler": _diffusers.EulerDiscreteScheduler(
            **_SD_SCHEDULE, timestep_spacing="leading", prediction_type="epsilon"
        ),
    }


def _sdxl_img2img(workdir: Path) -> Any:
    """SDXL base as img2img, with SDXL's Euler scheduler config and its empty-prompt zeros."""
    return _diffusers.StableDiffusionXLImg2ImgPipeline(
        **_sdxl_components(workdir),
        requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True,
    )


def _t5_tokenizer() -> Any:
    """A character-level T5 tokenizer built with the `tokenizers` library (a Unigram model over
    printable ASCII, SentencePiece's "▁" word marker, "</s>" appended as T5 does)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(chr(code), -2.0) for code in range(32, 127)]
    model = Tokenizer(tokenizer_models.Unigram(pieces, unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.decoder = decoders.Metaspace()
    model.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    return T5Tokenizer(tokenizer_object=model, extra_ids=0, **specials)


def _t5_encoder() -> Any:
    """A two-layer T5 encoder over the tiny tokenizer's 99 pieces."""
    config = T5Config(
        vocab_size=99, d_model=shapes.HIDDEN, d_kv=8, d_ff=37, num_layers=2, num_heads=4
    )
    return T5EncoderModel(config)


def _flux_vae() -> Any:
    """The four-block tiny VAE without quant convs and with a shift, as Flux's VAE is."""
    return shapes.vae(
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    )


def _flux_img2img(workdir: Path, schnell: bool = False) -> Any:
    """Flux.1 (dev-shaped, or schnell-shaped: no guidance input) as img2img, with its
    flow-matching scheduler config."""
    return _diffusers.FluxImg2ImgPipeline(
        transformer=shapes.seeded(lambda: shapes.flux_transformer(guidance_embeds=not schnell)),
        vae=shapes.seeded(_flux_vae),
        text_encoder=shapes.seeded(lambda: CLIPTextModel(_text_config())),
        tokenizer=_tokenizer(workdir),
        text_encoder_2=shapes.seeded(_t5_encoder),
        tokenizer_2=_t5_tokenizer(),
        scheduler=_diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False),
    )


def _prior_transformer() -> Any:
    """A one-layer unCLIP prior; clip_std starts at 0, which would map every output to 0."""
    prior = _diffusers.PriorTransformer(
        num_attention_heads=2, attention_head_dim=12, embedding_dim=shapes.HIDDEN, num_layers=1
    )
    with torch.no_grad():
        prior.clip_std.fill_(1.0)
    return prior


def _vision_config() -> Any:
    """A CLIP vision tower on 32x32 inputs in 8x8 patches."""
    return CLIPVisionConfig(
        hidden_size=shapes.HIDDEN,
        projection_dim=shapes.HIDDEN,
        image_size=32,
        patch_size=8,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
    )


def _image_encoder() -> Any:
    """The tiny CLIP vision tower with its projection, as Kandinsky's prior uses it."""
    return CLIPVisionModelWithProjection(_vision_config())


def _image_processor() -> Any:
    """CLIP preprocessing at the tiny vision tower's 32x32 input size."""
    return CLIPImageProcessor(
        size=32, crop_size=32, resample=3, image_mean=_CLIP_MEAN, image_std=_CLIP_STD
    )


def _kandinsky_prior(workdir: Path) -> Any:
    """Kandinsky 2.2's prior: text and images to CLIP image embeddings."""
    return _diffusers.KandinskyV22PriorPipeline(
        prior=shapes.seeded(_prior_transformer),
        image_encoder=shapes.seeded(_image_encoder),
        text_encoder=shapes.seeded(lambda: CLIPTextModelWithProjection(_text_config())),
        tokenizer=_tokenizer(workdir),
        # Real prior settings (UnCLIP predicting the sample); the processor matches the encoder.
        scheduler=_diffusers.UnCLIPScheduler(
            variance_type="fixed_small_log",
            prediction_type="sample",
            clip_sample=True,
            clip_sample_range=10.0,
        ),
        image_processor=_image_processor(),
    )


def _decoder_unet() -> Any:
    """Kandinsky 2.2's UNet shape: conditioned on an image embedding, not on text."""
    return _diffusers.UNet2DConditionModel(
        in_channels=4,
        out_channels=8,  # predicts mean and variance
        addition_embed_type="image",
        encoder_hid_dim=shapes.HIDDEN,
        encoder_hid_dim_type="image_proj",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        # Narrower than the SD UNet: this one runs every step at the full latent size.
        block_out_channels=(16, 32),
        norm_num_groups=8,
        layers_per_block=1,
        cross_attention_dim=shapes.HIDDEN,
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
        unet=shapes.seeded(_decoder_unet), scheduler=scheduler, movq=shapes.seeded(_movq)
    )


class _SafetyCheckerFolder:
    """A safety checker and its feature extractor, saved side by side as in the real repo."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def save_pretrained(self, folder: Path) -> None:
        checker = shapes.seeded(self._checker)
        checker.save_pretrained(folder)
        _image_processor().save_pretrained(folder)

    def _checker(self) -> Any:
        config = CLIPConfig(
            text_config=_text_config().to_dict(),
            vision_config=_vision_config().to_dict(),
            projection_dim=shapes.HIDDEN,
        )
        checker = StableDiffusionSafetyChecker(config)
        with torch.no_grad():
            checker.concept_embeds.normal_()
            checker.special_care_embeds.normal_()
            checker.concept_embeds_weights.fill_(self.threshold)
            checker.special_care_embeds_weights.fill_(self.threshold)
        return checker


def _sdxl_refiner_img2img(workdir: Path) -> Any:
    """The SDXL refiner's shape: only the bigG encoder, a UNet conditioned on its hidden states
    and on five numbers (sizes and the aesthetic score) beside its pooled embedding."""
    unet = shapes.seeded(
        lambda: shapes.toy_unet(
            in_channels=4,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=shapes.SDXL_TIME_EMBED,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=5 * shapes.SDXL_TIME_EMBED + shapes.SDXL_G_HIDDEN,
            cross_attention_dim=shapes.SDXL_G_HIDDEN,
        ),
        seed=3,
    )
    components = _sdxl_components(workdir) | {"text_encoder": None, "tokenizer": None}
    return _diffusers.StableDiffusionXLImg2ImgPipeline(
        **(components | {"unet": unet}),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )


#: Tiny model shapes that no preset id names; tests install them as an operator would.
TINY_VARIANTS: dict[str, Callable[[Path], Any]] = {
    "sdxl-refiner": _sdxl_refiner_img2img,
    "flux-schnell": lambda workdir: _flux_img2img(workdir, schnell=True),
}


def ensure_tiny_variant(target: Path, variant: str) -> None:
    """Build the tiny `variant` (a key of `TINY_VARIANTS`) into the folder `target`."""
    if variant not in TINY_VARIANTS:
        raise ValueError(f"No tiny variant {variant!r}; expected one of {sorted(TINY_VARIANTS)}.")
    shapes.build_once(target, TINY_VARIANTS[variant])
