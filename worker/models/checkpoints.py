"""Write a diffusers Stable Diffusion 1.x pipeline as one checkpoint in the original layout.

Model sites distribute SD 1.x models as single `.safetensors` files in the layout of the
original (CompVis / A1111) code: `model.diffusion_model.*` (the UNet in LDM naming),
`first_stage_model.*` (the VAE), `cond_stage_model.transformer.*` (CLIP, in transformers'
naming). The tiny preset writes its model in that layout so that the tests load a single file
through the real path (`from_single_file(config=...)`, which converts these names back).

The renaming is derived from the UNet's and VAE's configs (block counts, layers per block), so
any size converts, the tiny one included.
"""

from __future__ import annotations

from typing import Any

import torch

_RESNET_PARTS = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def sd_checkpoint(pipe: Any) -> dict[str, torch.Tensor]:
    """The state dict of an SD 1.x pipeline's UNet, VAE and text encoder in the original layout."""
    unet = {
        f"model.diffusion_model.{_unet_name(key, pipe.unet.config)}": value
        for key, value in pipe.unet.state_dict().items()
    }
    vae = _vae_state(pipe.vae)
    text = {
        f"cond_stage_model.transformer.{_clip_name(key)}": value
        for key, value in pipe.text_encoder.state_dict().items()
    }
    return {key: value.contiguous() for key, value in {**unet, **vae, **text}.items()}


def _clip_name(key: str) -> str:
    """A CLIP text encoder parameter under `text_model.`, where the original layout keeps it
    (transformers 5.6 flattened `CLIPTextModel`, dropping that prefix)."""
    return key if key.startswith("text_model.") else f"text_model.{key}"


def _unet_name(key: str, config: Any) -> str:
    """One diffusers UNet parameter's name in LDM's `input_blocks` / `output_blocks` naming."""
    for prefix, original in _UNET_TOP.items():
        if key.startswith(prefix + "."):
            return original + key[len(prefix) :]
    parts = key.split(".")
    per_level = int(config.layers_per_block) + 1  # resnets (+ a down/upsampler) per level
    if parts[0] == "mid_block":
        index = 1 if parts[1] == "attentions" else 2 * int(parts[2])
        return _resnet(f"middle_block.{index}", parts[3:], parts[1])
    level, kind, number = int(parts[1]), parts[2], int(parts[3])
    if parts[0] == "down_blocks":
        if kind == "downsamplers":  # downsamplers.0.conv.* -> input_blocks.N.0.op.*
            return f"input_blocks.{(level + 1) * per_level}.0.op." + ".".join(parts[5:])
        block = f"input_blocks.{1 + level * per_level + number}"
    else:
        has_attention = "Attn" in config.up_block_types[level]
        if kind == "upsamplers":  # upsamplers.0.conv.* -> output_blocks.N.(1|2).conv.*
            place = f"output_blocks.{level * per_level + per_level - 1}.{2 if has_attention else 1}"
            return place + "." + ".".join(parts[4:])
        block = f"output_blocks.{level * per_level + number}"
    return _resnet(f"{block}.{1 if kind == 'attentions' else 0}", parts[4:], kind)


def _resnet(place: str, rest: list[str], kind: str) -> str:
    """`place` + the parameter's own path, with a resnet's layers renamed."""
    name = ".".join(rest)
    if kind == "resnets":
        for new, old in _RESNET_PARTS:
            if name.startswith(new + "."):
                name = old + name[len(new) :]
    return f"{place}.{name}"


def _vae_state(vae: Any) -> dict[str, torch.Tensor]:
    """The VAE's parameters as `first_stage_model.*`, its mid attention as 1x1 convolutions."""
    levels = len(vae.config.block_out_channels)
    state = {}
    for key, value in vae.state_dict().items():
        name = _vae_name(key, levels)
        if ".mid.attn_1." in f".{name}" and name.endswith(".weight") and value.dim() == 2:
            value = value.reshape(*value.shape, 1, 1)
        state[f"first_stage_model.{name}"] = value
    return state


def _vae_name(key: str, levels: int) -> str:
    """One diffusers AutoencoderKL parameter's name in the original `down.i.block.j` naming."""
    parts = key.split(".")
    if parts[1] == "down_blocks":
        kind, rest = parts[3], parts[4:]
        if kind == "downsamplers":
            return f"{parts[0]}.down.{parts[2]}.downsample." + ".".join(parts[5:])
        return f"{parts[0]}.down.{parts[2]}.block.{rest[0]}." + _vae_resnet(rest[1:])
    if parts[1] == "up_blocks":
        level, kind, rest = levels - 1 - int(parts[2]), parts[3], parts[4:]
        if kind == "upsamplers":
            return f"{parts[0]}.up.{level}.upsample." + ".".join(parts[5:])
        return f"{parts[0]}.up.{level}.block.{rest[0]}." + _vae_resnet(rest[1:])
    if parts[1] == "mid_block":
        if parts[2] == "resnets":
            return f"{parts[0]}.mid.block_{int(parts[3]) + 1}." + _vae_resnet(parts[4:])
        attention = {
            "group_norm": "norm",
            "to_q": "q",
            "to_k": "k",
            "to_v": "v",
            "to_out": "proj_out",
        }
        layer = attention[parts[4]]
        tail = parts[6:] if parts[4] == "to_out" else parts[5:]
        return f"{parts[0]}.mid.attn_1.{layer}." + ".".join(tail)
    if parts[1] == "conv_norm_out":
        return f"{parts[0]}.norm_out." + ".".join(parts[2:])
    return key


def _vae_resnet(rest: list[str]) -> str:
    name = ".".join(rest)
    return (
        "nin_shortcut" + name[len("conv_shortcut") :] if name.startswith("conv_shortcut") else name
    )
