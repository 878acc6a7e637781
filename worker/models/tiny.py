"""Tiny, randomly initialised models of the real pipeline classes, for tests and the "tiny" preset.

Weights can never be downloaded in tests, so `ensure_tiny_models` builds each pipeline in code
(seeded before every component, so every build is identical) and saves it with `save_pretrained`:
the worker then loads it through the same `from_pretrained` path as real weights. The VAE and the
MoVQ downsample by 8 like the real ones, which keeps a 512x512 request to a few seconds on a CPU.

Several processes may call `ensure_tiny_models` at once: each builds into its own temporary folder
beside the target and renames it into place; the loser of the race deletes its copy.

Add-ons named by the request (LoRAs, VAEs, textual-inversion embeddings) are built lazily, one per
id, seeded from a hash of the id: the same id always gives the same weights, different ids give
different weights. The two tiny safety checkers differ only in their concept thresholds: the
checker flags an image when a cosine similarity (always within [-1, 1]) exceeds a threshold, so
thresholds of +2 never flag and thresholds of -2 always do (see `darkroom.model_ids` for which one a
request gets).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import diffusers
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
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

from darkroom.identities import Family, TinyModel
from darkroom.limits import MAX_CLIP_SKIP
from worker.models.checkpoints import sd_checkpoint

#: SDXL's UNet takes the pooled text embedding and six size numbers, each embedded in this width.
_SDXL_TIME_EMBED = 8
#: The tiny SDXL's second (bigG stand-in) encoder is wider than the first, as the real one is:
#: single-file loading tells the two apart by their widths.
_SDXL_G_HIDDEN = 40

# Tiny safety checkers' concept thresholds: a cosine similarity is never above 2 nor below -2.
_NEVER_FLAG, _ALWAYS_FLAG = 2.0, -2.0
# Layers of the SD text encoders: clip_skip goes up to 8 and must pick a real layer.
_SD_TEXT_LAYERS = MAX_CLIP_SKIP

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
        TinyModel.SD_IMG2IMG: _sd_img2img,
        TinyModel.INSTRUCT_PIX2PIX: _instruct_pix2pix,
        TinyModel.KANDINSKY_PRIOR: _kandinsky_prior,
        TinyModel.KANDINSKY_DECODER: _kandinsky_decoder,
        TinyModel.SAFETY_CHECKER: lambda _workdir: _SafetyCheckerFolder(_NEVER_FLAG),
        TinyModel.SAFETY_CHECKER_ALWAYS: lambda _workdir: _SafetyCheckerFolder(_ALWAYS_FLAG),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, build in builders.items():
        _build_once(root / name, build)


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
    _build_once(root / name, builders[name])


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


def _text_config(layers: int = 2, hidden: int = _HIDDEN, **options: Any) -> Any:
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


def _vae(**options: Any) -> Any:
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


def _toy_unet(**options: Any) -> Any:
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


def _sd_unet(in_channels: int) -> Any:
    """SD's UNet shape at toy size; InstructPix2Pix adds the image latents as 4 more channels."""
    return _toy_unet(in_channels=in_channels, cross_attention_dim=_HIDDEN, attention_head_dim=8)


def _sd_components(workdir: Path, unet_in_channels: int) -> dict[str, Any]:
    """The modules shared in shape by the img2img and InstructPix2Pix pipelines."""
    return {
        "unet": _seeded(lambda: _sd_unet(unet_in_channels)),
        "vae": _seeded(_vae),
        "text_encoder": _seeded(lambda: CLIPTextModel(_text_config(_SD_TEXT_LAYERS))),
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
    components["unet"] = _seeded(_sd2_unet, seed=2)
    components["text_encoder"] = _seeded(
        lambda: CLIPTextModel(_text_config(_SD_TEXT_LAYERS, hidden_act="gelu"))
    )
    return _diffusers.StableDiffusionImg2ImgPipeline(scheduler=scheduler, **components)


def _sd2_unet() -> Any:
    """SD 2.x's UNet shape at toy size: linear projections in and out of attention, the head
    count per level (SD 2.x: 5, 10, 20, 20), SD's cross-attention width."""
    return _toy_unet(
        in_channels=4,
        cross_attention_dim=_HIDDEN,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
    )


def _sdxl_unet() -> Any:
    """SDXL's UNet shape at toy size (diffusers' own SDXL tests): conditioned on both encoders'
    joined hidden states and on "text_time", the pooled embedding beside the size numbers."""
    return _toy_unet(
        in_channels=4,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_SDXL_TIME_EMBED,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * _SDXL_TIME_EMBED + _SDXL_G_HIDDEN,
        cross_attention_dim=_HIDDEN + _SDXL_G_HIDDEN,
    )


def _sdxl_components(workdir: Path) -> dict[str, Any]:
    """The tiny SDXL modules: CLIP-L and bigG stand-ins over the same character tokenizer."""
    return {
        "unet": _seeded(_sdxl_unet),
        "vae": _seeded(_vae),
        "text_encoder": _seeded(lambda: CLIPTextModel(_text_config(_SD_TEXT_LAYERS))),
        "text_encoder_2": _seeded(
            lambda: CLIPTextModelWithProjection(_text_config(_SD_TEXT_LAYERS, _SDXL_G_HIDDEN)),
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
    config = T5Config(vocab_size=99, d_model=_HIDDEN, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    return T5EncoderModel(config)


def _flux_transformer(guidance_embeds: bool = True) -> Any:
    """Flux.1-dev's transformer shape at toy size (diffusers' own Flux tests): 2x2 latent
    patches packed into 16 channels, one double and one single block, embedded guidance
    (schnell's shape has none)."""
    return _diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_HIDDEN,
        pooled_projection_dim=_HIDDEN,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=[4, 4, 8],
    )


def _flux_vae() -> Any:
    """The four-block tiny VAE without quant convs and with a shift, as Flux's VAE is."""
    return _vae(
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.1159,
        scaling_factor=0.3611,
    )


def _flux_img2img(workdir: Path, schnell: bool = False) -> Any:
    """Flux.1 (dev-shaped, or schnell-shaped: no guidance input) as img2img, with its
    flow-matching scheduler config."""
    return _diffusers.FluxImg2ImgPipeline(
        transformer=_seeded(lambda: _flux_transformer(guidance_embeds=not schnell)),
        vae=_seeded(_flux_vae),
        text_encoder=_seeded(lambda: CLIPTextModel(_text_config())),
        tokenizer=_tokenizer(workdir),
        text_encoder_2=_seeded(_t5_encoder),
        tokenizer_2=_t5_tokenizer(),
        scheduler=_diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False),
    )


def _prior_transformer() -> Any:
    """A one-layer unCLIP prior; clip_std starts at 0, which would map every output to 0."""
    prior = _diffusers.PriorTransformer(
        num_attention_heads=2, attention_head_dim=12, embedding_dim=_HIDDEN, num_layers=1
    )
    with torch.no_grad():
        prior.clip_std.fill_(1.0)
    return prior


def _vision_config() -> Any:
    """A CLIP vision tower on 32x32 inputs in 8x8 patches."""
    return CLIPVisionConfig(
        hidden_size=_HIDDEN,
        projection_dim=_HIDDEN,
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
        image_processor=_image_processor(),
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


class _SafetyCheckerFolder:
    """A safety checker and its feature extractor, saved side by side as in the real repo."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def save_pretrained(self, folder: Path) -> None:
        checker = _seeded(self._checker)
        checker.save_pretrained(folder)
        _image_processor().save_pretrained(folder)

    def _checker(self) -> Any:
        config = CLIPConfig(
            text_config=_text_config().to_dict(),
            vision_config=_vision_config().to_dict(),
            projection_dim=_HIDDEN,
        )
        checker = StableDiffusionSafetyChecker(config)
        with torch.no_grad():
            checker.concept_embeds.normal_()
            checker.special_care_embeds.normal_()
            checker.concept_embeds_weights.fill_(self.threshold)
            checker.special_care_embeds_weights.fill_(self.threshold)
        return checker


def id_seed(kind: str, name: str) -> int:
    """A seed that depends only on the kind of add-on and its id."""
    digest = hashlib.sha256(f"{kind}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


def ensure_tiny_vae(target: Path, name: str) -> None:
    """Build the tiny VAE for id `name` into the folder `target` unless it is there."""
    _build_once(target, lambda _workdir: _seeded(_vae, id_seed("vae", name)))


def ensure_tiny_embedding(target: Path, name: str, family: Family = Family.SD) -> None:
    """Write the one-vector textual-inversion embedding for id `name` to the file `target`:
    SD's `{name: vector}`, or SDXL's `clip_l` and `clip_g` vectors in one file."""
    if family == Family.SDXL:
        vectors = _seeded(
            lambda: torch.randn(1, _HIDDEN + _SDXL_G_HIDDEN), id_seed("embedding", name)
        )
        clip_l, clip_g = vectors[:, :_HIDDEN].clone(), vectors[:, _HIDDEN:].clone()
        _write_once(target, {"clip_l": clip_l, "clip_g": clip_g})
        return
    vector = _seeded(lambda: torch.randn(1, _HIDDEN), id_seed("embedding", name))
    _write_once(target, {name: vector})


#: Tiny LoRA ids starting with this are written in kohya / A1111 format, as model sites ship them.
KOHYA_PREFIX = "kohya-"


def ensure_tiny_lora(target: Path, name: str, family: Family = Family.SD) -> None:
    """Write a rank-4 LoRA for the attention of the tiny img2img model of `family`, for id
    `name`, to `target`: diffusers (PEFT) format, or kohya format for ids with `KOHYA_PREFIX`
    (SD and SDXL: the UNet's part and, as model sites ship them, the text encoders')."""
    if target.exists():
        return
    if family == Family.FLUX and name.startswith(KOHYA_PREFIX):
        _write_once(target, flux_lora("kohya", id_seed("lora", name)))
        return
    if family == Family.FLUX:
        layers = _seeded(
            lambda: _lora_state_dict(_flux_transformer(), "transformer"), id_seed("lora", name)
        )
        _write_once(target, layers)
        return
    unet = _sdxl_unet if family == Family.SDXL else lambda: _sd_unet(4)
    layers = _seeded(lambda: _lora_state_dict(unet(), "unet"), id_seed("lora", name))
    if name.startswith(KOHYA_PREFIX):
        text = kohya_text_encoder_lora(family, id_seed("lora-te", name))
        layers = kohya_lora(layers) | text
    _write_once(target, layers)


def _lora_state_dict(model: Any, prefix: str) -> dict[str, torch.Tensor]:
    """The diffusers-format state dict of a random (not zero-initialised) attention LoRA of
    `model`, its keys under `prefix` as `load_lora_weights` expects."""
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    model.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    )
    layers = get_peft_model_state_dict(model)
    return {f"{prefix}.{key}": value.contiguous() for key, value in layers.items()}


def kohya_lora(layers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers-format UNet LoRA in kohya's layout: `lora_unet_<module path with _>` with
    `.lora_down.weight` (A), `.lora_up.weight` (B) and `.alpha` (the rank: scale 1)."""
    kohya: dict[str, torch.Tensor] = {}
    for key, value in layers.items():
        module, _, matrix = key.removeprefix("unet.").rpartition(".lora_")
        stem = "lora_unet_" + module.replace(".", "_")
        kohya[f"{stem}.{'lora_down' if matrix.startswith('A') else 'lora_up'}.weight"] = value
        if matrix.startswith("A"):
            kohya[f"{stem}.alpha"] = torch.tensor(float(value.shape[0]))
    return kohya


#: The tiny Flux transformer's layers a Flux LoRA adapts, in Black Forest Labs' naming, with
#: (inputs, outputs) and the diffusers modules they are: a fused q/k/v layer is three modules.
_FLUX_INNER = 32  # attention heads x head width of `_flux_transformer`
_FLUX_LORA_LAYERS: dict[str, tuple[int, int, tuple[str, ...]]] = {
    "double_blocks.0.img_attn.qkv": (
        _FLUX_INNER, 3 * _FLUX_INNER,
        tuple(f"transformer_blocks.0.attn.to_{x}" for x in "qkv"),
    ),
    "double_blocks.0.img_attn.proj": (
        _FLUX_INNER, _FLUX_INNER, ("transformer_blocks.0.attn.to_out.0",),
    ),
    "double_blocks.0.txt_attn.qkv": (
        _FLUX_INNER, 3 * _FLUX_INNER,
        tuple(f"transformer_blocks.0.attn.add_{x}_proj" for x in "qkv"),
    ),
    # The single block's output layer reads the attention and the 4x wider MLP side by side.
    "single_blocks.0.linear2": (
        5 * _FLUX_INNER, _FLUX_INNER, ("single_transformer_blocks.0.proj_out",),
    ),
}  # fmt: skip
#: The layouts Flux LoRAs are distributed in (`flux_lora`).
FLUX_LORA_LAYOUTS = ("diffusers", "kohya", "comfyui", "bfl")


def flux_lora(layout: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random rank-4 LoRA of the tiny Flux transformer, the same weights in any `layout`:
    `diffusers` (`transformer.<module>.lora_A/B.weight`), `kohya` (sd-scripts:
    `lora_unet_double_blocks_0_img_attn_qkv.lora_down/up.weight` + `.alpha`), `comfyui`
    (`diffusion_model.double_blocks.0.img_attn.qkv.lora_down/up.weight` + `.alpha`) or `bfl`
    (Black Forest Labs': `diffusion_model.<layer>.lora_A/B.weight`). A fused q/k/v layer has one
    down matrix and q, k and v's up matrices stacked, as kohya's and BFL's files have."""
    if layout not in FLUX_LORA_LAYOUTS:
        raise ValueError(f"No Flux LoRA layout {layout!r}; expected one of {FLUX_LORA_LAYOUTS}.")
    generator = torch.Generator().manual_seed(seed)
    lora: dict[str, torch.Tensor] = {}
    for layer, (inputs, outputs, modules) in _FLUX_LORA_LAYERS.items():
        down = 0.3 * torch.randn(4, inputs, generator=generator)
        up = 0.3 * torch.randn(outputs, 4, generator=generator)
        if layout == "diffusers":
            for module, part in zip(modules, up.chunk(len(modules)), strict=True):
                lora[f"transformer.{module}.lora_A.weight"] = down.clone()  # saved once each
                lora[f"transformer.{module}.lora_B.weight"] = part.contiguous()
            continue
        stem = {
            "kohya": "lora_unet_" + layer.replace(".", "_"),
            "comfyui": f"diffusion_model.{layer}",
            "bfl": f"diffusion_model.{layer}",
        }[layout]
        names = ("lora_A", "lora_B") if layout == "bfl" else ("lora_down", "lora_up")
        lora |= {f"{stem}.{names[0]}.weight": down, f"{stem}.{names[1]}.weight": up}
        if layout != "bfl":
            lora[f"{stem}.alpha"] = torch.tensor(4.0)
    return lora


#: kohya's prefix of each text encoder's LoRA layers, per family: SD's one encoder, SDXL's two.
_KOHYA_TEXT_ENCODERS: dict[str, tuple[tuple[str, int], ...]] = {
    Family.SD: (("lora_te_", _HIDDEN),),
    Family.SDXL: (("lora_te1_", _HIDDEN), ("lora_te2_", _SDXL_G_HIDDEN)),
}


def kohya_text_encoder_lora(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random rank-4 LoRA of the attention projections of the tiny `family` model's CLIP text
    encoders, in kohya's layout as A1111 LoRAs ship it: `lora_te_text_model_encoder_layers_N_
    self_attn_q_proj.lora_down.weight` (SDXL: `lora_te1_` for CLIP-L, `lora_te2_` for bigG)."""
    generator = torch.Generator().manual_seed(seed)
    lora: dict[str, torch.Tensor] = {}
    for prefix, width in _KOHYA_TEXT_ENCODERS[family]:
        for layer in range(_SD_TEXT_LAYERS):
            for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
                stem = f"{prefix}text_model_encoder_layers_{layer}_self_attn_{projection}"
                lora[f"{stem}.lora_down.weight"] = 0.1 * torch.randn(4, width, generator=generator)
                lora[f"{stem}.lora_up.weight"] = 0.1 * torch.randn(width, 4, generator=generator)
                lora[f"{stem}.alpha"] = torch.tensor(4.0)
    return lora


def _write_once(target: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save `tensors` to the safetensors file `target` atomically, unless it exists."""
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}")
    save_file(tensors, str(staging))
    os.replace(staging, target)


def write_sd_checkpoint(folder: Path, target: Path) -> None:
    """Write the SD 1.x, SD 2.x or SDXL pipeline folder `folder` as one original-layout file, as
    model sites distribute checkpoints (`worker.models.checkpoints`): `.safetensors`, or a
    `.ckpt` (a torch zip archive holding `{"state_dict": ...}`, as the original code saved)."""
    pipe = _diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    state = sd_checkpoint(pipe)
    if target.suffix != ".ckpt":
        _write_once(target, state)
        return
    if target.exists():
        return
    staging = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}")
    torch.save({"state_dict": state}, staging)
    os.replace(staging, target)


def _sdxl_refiner_img2img(workdir: Path) -> Any:
    """The SDXL refiner's shape: only the bigG encoder, a UNet conditioned on its hidden states
    and on five numbers (sizes and the aesthetic score) beside its pooled embedding."""
    unet = _seeded(
        lambda: _toy_unet(
            in_channels=4,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=_SDXL_TIME_EMBED,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=5 * _SDXL_TIME_EMBED + _SDXL_G_HIDDEN,
            cross_attention_dim=_SDXL_G_HIDDEN,
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
    _build_once(target, TINY_VARIANTS[variant])
