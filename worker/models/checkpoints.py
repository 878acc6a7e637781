"""Write a diffusers Stable Diffusion 1.x, 2.x or SDXL pipeline as one checkpoint in the
original layout.

Model sites distribute these models as single `.safetensors` (or `.ckpt`) files in the layout of
the original (CompVis / Stability / A1111) code: `model.diffusion_model.*` (the UNet in LDM
naming), `first_stage_model.*` (the VAE), and the text encoders: SD 1.x's CLIP ViT-L as
`cond_stage_model.transformer.*` (transformers' naming), SD 2.x's OpenCLIP ViT-H as
`cond_stage_model.model.*` (OpenCLIP's naming), SDXL's pair as `conditioner.embedders.0/1.*`.
The tiny preset writes its models in that layout so that the tests load a single file through
the real path (`from_single_file(config=...)`, which converts these names back).

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
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's pooled text + size embedding
    "add_embedding.linear_2": "label_emb.0.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def sd_checkpoint(pipe: Any) -> dict[str, torch.Tensor]:
    """The state dict of an SD 1.x, 2.x or SDXL pipeline's UNet, VAE and text encoders in the
    original layout (SDXL: CLIP-L as `conditioner.embedders.0.transformer.`, bigG in OpenCLIP's
    naming as `conditioner.embedders.1.model.`; SD 2.x: ViT-H as `cond_stage_model.model.`)."""
    unet = {
        f"model.diffusion_model.{_unet_name(key, pipe.unet.config)}": value
        for key, value in pipe.unet.state_dict().items()
    }
    state = {**unet, **_vae_state(pipe.vae), **_text_state(pipe)}
    return {key: value.contiguous() for key, value in state.items()}


def _text_state(pipe: Any) -> dict[str, torch.Tensor]:
    """The text encoders under their original prefixes, each in its original naming."""
    if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL
        clip_l = _clip_state(pipe.text_encoder, "conditioner.embedders.0.transformer.")
        return clip_l | _open_clip_state(pipe.text_encoder_2, "conditioner.embedders.1.model.")
    if is_open_clip(pipe.text_encoder):  # SD 2.x
        return _open_clip_state(pipe.text_encoder, "cond_stage_model.model.")
    return _clip_state(pipe.text_encoder, "cond_stage_model.transformer.")


def is_open_clip(encoder: Any) -> bool:
    """Whether a CLIP text encoder stands for an OpenCLIP one (SD 2.x's ViT-H, SDXL's bigG):
    those use GELU, OpenAI's CLIP (SD 1.x's ViT-L) its quick GELU approximation."""
    return str(encoder.config.hidden_act) == "gelu"


def _clip_state(encoder: Any, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text encoder in transformers' naming under `prefix`."""
    return {f"{prefix}{_clip_name(key)}": value for key, value in encoder.state_dict().items()}


_OPEN_CLIP_LAYER_PARTS = (
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
    ("self_attn.out_proj", "attn.out_proj"),
)


def _open_clip_state(encoder: Any, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text encoder in OpenCLIP's naming: `transformer.resblocks.N.*` with q, k and v
    joined as `attn.in_proj_*`, and the projection transposed. SD 2.x's `CLIPTextModel` has no
    projection; its file has OpenCLIP's (unused), whose width tells the loader how q, k and v
    were joined, so an identity stands in for it."""
    state = {_clip_name(key): value for key, value in encoder.state_dict().items()}
    hidden = int(encoder.config.hidden_size)
    projection = state.pop("text_model.text_projection.weight", None)
    if projection is None:
        projection = torch.eye(hidden)
    out = {
        f"{prefix}positional_embedding": state.pop(
            "text_model.embeddings.position_embedding.weight"
        ),
        f"{prefix}token_embedding.weight": state.pop(
            "text_model.embeddings.token_embedding.weight"
        ),
        f"{prefix}ln_final.weight": state.pop("text_model.final_layer_norm.weight"),
        f"{prefix}ln_final.bias": state.pop("text_model.final_layer_norm.bias"),
        f"{prefix}text_projection": projection.T,
    }
    for layer in range(int(encoder.config.num_hidden_layers)):
        ours, theirs = (
            f"text_model.encoder.layers.{layer}.",
            f"{prefix}transformer.resblocks.{layer}.",
        )
        for kind in ("weight", "bias"):
            joined = [state.pop(f"{ours}self_attn.{q}_proj.{kind}") for q in "qkv"]
            out[f"{theirs}attn.in_proj_{kind}"] = torch.cat(joined)
            for new, old in _OPEN_CLIP_LAYER_PARTS:
                out[f"{theirs}{old}.{kind}"] = state.pop(f"{ours}{new}.{kind}")
    return out


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


#: Black Forest Labs' Flux LoRAs name their layers as the original transformer does, under
#: `diffusion_model.`, with PEFT's `lora_A` / `lora_B`: diffusers converts that naming only for
#: BFL's control LoRAs and otherwise loads nothing, silently. ComfyUI's naming of the same
#: layers (`lora_down` / `lora_up`) it converts, so such files are renamed to it (no `.alpha`:
#: scale 1, as PEFT reads a file without one).
_BFL_PREFIX = "diffusion_model."
_BFL_TO_COMFYUI = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}


def lora_in_convertible_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA's tensors with Black Forest Labs' naming renamed to ComfyUI's, which diffusers'
    `load_lora_weights` converts; any other layout unchanged."""
    if not any(key.startswith(_BFL_PREFIX) and ".lora_A." in key for key in state):
        return state
    if any("query_norm.scale" in key for key in state):  # a control LoRA: diffusers' own path
        return state
    renamed = {}
    for key, value in state.items():
        for bfl, comfyui in _BFL_TO_COMFYUI.items():
            if key.endswith(bfl):
                key = key[: -len(bfl)] + comfyui
        renamed[key] = value
    return renamed


#: A Flux transformer's top-level layers: diffusers' name, then Black Forest Labs' (whose
#: `flux1-dev.safetensors` and most Flux fine-tunes hold the transformer alone, in this naming).
_FLUX_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
}
_FLUX_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
_FLUX_SINGLE = {
    "norm.linear": "modulation.lin",
    "proj_out": "linear2",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
}
#: Joined projections: the original layer, and diffusers' layers in the order they are joined.
_FLUX_DOUBLE_JOINED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_FLUX_SINGLE_JOINED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}


def flux_checkpoint(transformer: Any) -> dict[str, torch.Tensor]:
    """A diffusers `FluxTransformer2DModel`'s state dict in the original (Black Forest Labs)
    layout, as `flux1-dev.safetensors` holds it: the transformer alone, no prefix. Norm scales
    are `.scale`, not `.weight`; q, k and v (and a single block's MLP input) are one layer; the
    output norm's modulation is stored shift-then-scale, diffusers' scale-then-shift."""
    state = dict(transformer.state_dict())
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _FLUX_TOP.items():
        for kind in ("weight", "bias"):
            if f"{ours}.{kind}" in state:
                out[f"{theirs}.{kind}"] = state.pop(f"{ours}.{kind}")
    for kind in ("weight", "bias"):
        scale, shift = state.pop(f"norm_out.linear.{kind}").chunk(2)
        out[f"final_layer.adaLN_modulation.1.{kind}"] = torch.cat([shift, scale])
    blocks = (
        ("transformer_blocks", "double_blocks", _FLUX_DOUBLE, _FLUX_DOUBLE_JOINED),
        ("single_transformer_blocks", "single_blocks", _FLUX_SINGLE, _FLUX_SINGLE_JOINED),
    )
    for ours_prefix, theirs_prefix, renamed, joined in blocks:
        for index in range(_count_blocks(state, ours_prefix)):
            ours, theirs = f"{ours_prefix}.{index}.", f"{theirs_prefix}.{index}."
            for original, parts in joined.items():
                for kind in ("weight", "bias"):
                    pieces = [state.pop(f"{ours}{part}.{kind}") for part in parts]
                    out[f"{theirs}{original}.{kind}"] = torch.cat(pieces)
            for new, old in renamed.items():
                for kind in ("weight", "bias"):
                    if f"{ours}{new}.{kind}" in state:
                        suffix = "scale" if old.endswith("_norm") else kind
                        out[f"{theirs}{old}.{suffix}"] = state.pop(f"{ours}{new}.{kind}")
    if state:
        raise ValueError(f"Flux parameters with no original name: {sorted(state)[:5]}")
    return {key: value.contiguous() for key, value in out.items()}


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    """How many `prefix.N.` blocks the state dict holds."""
    indices = {int(key.split(".")[1]) for key in state if key.startswith(prefix + ".")}
    return max(indices) + 1 if indices else 0
