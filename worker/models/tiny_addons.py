"""Tiny add-ons and single files, as an operator installs them: LoRAs, textual-inversion
embeddings, VAEs, and a tiny pipeline written as one original-layout checkpoint.

Add-ons named by a request are built lazily, one per id, seeded from a hash of the id
(`id_seed`): the same id always gives the same weights, different ids give different weights.
LoRAs come in the layouts model sites ship them in: diffusers (PEFT), kohya / A1111 (ids starting
with `KOHYA_PREFIX`, text-encoder parts included) and, for Flux, kohya, ComfyUI and Black Forest
Labs' own (`flux_lora`). Each adapts the tiny UNet or transformer of `worker.models.tiny_shapes`,
the same one the tiny pipeline of its family holds.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any

import diffusers
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from darkroom.identities import Family
from worker.models import tiny_shapes as shapes
from worker.models.checkpoints import sd_checkpoint

# diffusers wraps its constructors in an untyped decorator: treat the library as untyped here.
_diffusers: Any = diffusers


def id_seed(kind: str, name: str) -> int:
    """A seed that depends only on the kind of add-on and its id."""
    digest = hashlib.sha256(f"{kind}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


def ensure_tiny_vae(target: Path, name: str) -> None:
    """Build the tiny VAE for id `name` into the folder `target` unless it is there."""
    shapes.build_once(target, lambda _workdir: shapes.seeded(shapes.vae, id_seed("vae", name)))


def ensure_tiny_embedding(target: Path, name: str, family: Family = Family.SD) -> None:
    """Write the one-vector textual-inversion embedding for id `name` to the file `target`:
    SD's `{name: vector}`, or SDXL's `clip_l` and `clip_g` vectors in one file."""
    if family == Family.SDXL:
        vectors = shapes.seeded(
            lambda: torch.randn(1, shapes.HIDDEN + shapes.SDXL_G_HIDDEN), id_seed("embedding", name)
        )
        clip_l, clip_g = vectors[:, : shapes.HIDDEN].clone(), vectors[:, shapes.HIDDEN :].clone()
        shapes.write_once(target, {"clip_l": clip_l, "clip_g": clip_g})
        return
    vector = shapes.seeded(lambda: torch.randn(1, shapes.HIDDEN), id_seed("embedding", name))
    shapes.write_once(target, {name: vector})


#: Tiny LoRA ids starting with this are written in kohya / A1111 format, as model sites ship them.
KOHYA_PREFIX = "kohya-"


def ensure_tiny_lora(target: Path, name: str, family: Family = Family.SD) -> None:
    """Write a rank-4 LoRA for the attention of the tiny img2img model of `family`, for id
    `name`, to `target`: diffusers (PEFT) format, or kohya format for ids with `KOHYA_PREFIX`
    (SD and SDXL: the UNet's part and, as model sites ship them, the text encoders')."""
    if target.exists():
        return
    if family == Family.FLUX and name.startswith(KOHYA_PREFIX):
        shapes.write_once(target, flux_lora("kohya", id_seed("lora", name)))
        return
    if family == Family.FLUX:
        layers = shapes.seeded(
            lambda: _lora_state_dict(shapes.flux_transformer(), "transformer"),
            id_seed("lora", name),
        )
        shapes.write_once(target, layers)
        return
    unet = shapes.sdxl_unet if family == Family.SDXL else lambda: shapes.sd_unet(4)
    layers = shapes.seeded(lambda: _lora_state_dict(unet(), "unet"), id_seed("lora", name))
    if name.startswith(KOHYA_PREFIX):
        text = kohya_text_encoder_lora(family, id_seed("lora-te", name))
        layers = kohya_lora(layers) | text
    shapes.write_once(target, layers)


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
_FLUX_INNER = 32  # attention heads x head width of `shapes.flux_transformer`
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
    Family.SD: (("lora_te_", shapes.HIDDEN),),
    Family.SDXL: (("lora_te1_", shapes.HIDDEN), ("lora_te2_", shapes.SDXL_G_HIDDEN)),
}


def kohya_text_encoder_lora(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random rank-4 LoRA of the attention projections of the tiny `family` model's CLIP text
    encoders, in kohya's layout as A1111 LoRAs ship it: `lora_te_text_model_encoder_layers_N_
    self_attn_q_proj.lora_down.weight` (SDXL: `lora_te1_` for CLIP-L, `lora_te2_` for bigG)."""
    generator = torch.Generator().manual_seed(seed)
    lora: dict[str, torch.Tensor] = {}
    for prefix, width in _KOHYA_TEXT_ENCODERS[family]:
        for layer in range(shapes.SD_TEXT_LAYERS):
            for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
                stem = f"{prefix}text_model_encoder_layers_{layer}_self_attn_{projection}"
                lora[f"{stem}.lora_down.weight"] = 0.1 * torch.randn(4, width, generator=generator)
                lora[f"{stem}.lora_up.weight"] = 0.1 * torch.randn(width, 4, generator=generator)
                lora[f"{stem}.alpha"] = torch.tensor(4.0)
    return lora


def write_sd_checkpoint(folder: Path, target: Path) -> None:
    """Write the SD 1.x, SD 2.x or SDXL pipeline folder `folder` as one original-layout file, as
    model sites distribute checkpoints (`worker.models.checkpoints`): `.safetensors`, or a
    `.ckpt` (a torch zip archive holding `{"state_dict": ...}`, as the original code saved)."""
    pipe = _diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    state = sd_checkpoint(pipe)
    if target.suffix != ".ckpt":
        shapes.write_once(target, state)
        return
    if target.exists():
        return
    staging = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}")
    torch.save({"state_dict": state}, staging)
    os.replace(staging, target)
